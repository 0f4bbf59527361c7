"""Bundle folders: write them atomically, and load + validate their ``manifest.json``.

A bundle is what every consumer downstream of export reads (the apps, ``mobilemllm generate``, the
benchmark). The layout is format-neutral::

    bundle/
      manifest.json          schema: mobilemllm/schemas/manifest.schema.json (schema_version 1)
      model.pte              (executorch) | *.onnx (onnx) | *.mlpackage/ (coreml)
      tokenizer/tokenizer.json ...

``manifest["files"]`` lists every other file with its size and sha256; :func:`load_manifest` checks the
schema and, by default, every checksum, so a truncated or swapped file is caught before it is run.

Writers build the folder in a staging directory and hand it to :func:`finish_bundle`, which fills in
``files``, validates, writes ``manifest.json`` and renames the staging folder over the target::

    staging = new_bundle_dir(out)
    ... write model files into staging ...
    finish_bundle(staging, out, manifest)

or, for files already on disk, :func:`write_bundle(out, manifest, {"model.pte": path, ...})`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from mobilemllm.errors import UserError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMATS = ("executorch", "onnx", "coreml")
QUESTION = "{question}"  # placeholder in prompt text segments


class BundleError(UserError):
    """A bundle folder that is missing, incomplete, corrupt or of another schema version."""


# ---- schema ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The JSON schema every manifest.json is validated against (shipped in mobilemllm/schemas/)."""
    from importlib.resources import files

    return json.loads(files("mobilemllm").joinpath("schemas", "manifest.schema.json").read_text())


def schema_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Every schema violation in ``manifest``, as 'path: message' lines (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{where}: {err.message}")
    return errors


def validate_manifest(manifest: Mapping[str, Any], source: str = "manifest") -> None:
    if not isinstance(manifest, Mapping):
        raise BundleError(f"{source} is not a JSON object")
    version = manifest.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        raise BundleError(f"{source} has schema_version {version!r}; this mobilemllm reads version {SCHEMA_VERSION}. "
                          "Re-export the bundle with `mobilemllm export`")
    errors = schema_errors(manifest)
    if errors:
        shown = "; ".join(errors[:6]) + (f" ... (+{len(errors) - 6} more)" if len(errors) > 6 else "")
        raise BundleError(f"{source} does not match the manifest schema: {shown}")
    if "methods" not in manifest and "graphs" not in manifest:
        raise BundleError(f"{source} lists neither 'methods' (executorch) nor 'graphs' (onnx/coreml)")


# ---- checksums --------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(folder: str | Path, roles: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256, role}} for every file under ``folder`` except manifest.json."""
    folder = Path(folder)
    roles = dict(roles or {})
    table: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entry: dict[str, Any] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        role = roles.get(rel) or next((r for prefix, r in roles.items() if rel.startswith(prefix.rstrip("/") + "/")),
                                      None)
        if role is None and rel.startswith(TOKENIZER_DIR + "/"):
            role = "tokenizer"
        if role:
            entry["role"] = role
        table[rel] = entry
    return table


def verify_files(bundle_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Check every listed file exists with the listed size and sha256; name each problem."""
    bundle_dir = Path(bundle_dir)
    problems = []
    for rel, entry in manifest["files"].items():
        p = bundle_dir / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != entry["size"]:
            problems.append(f"{rel} is {p.stat().st_size} bytes, manifest says {entry['size']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel} has a different sha256 than the manifest (modified or corrupt)")
    if problems:
        raise BundleError(f"bundle {bundle_dir} is damaged: " + "; ".join(problems) +
                          ". Re-export it with `mobilemllm export ... --out " + str(bundle_dir) + "`")


# ---- reading ------------------------------------------------------------------------------------
def load_manifest(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and validate ``bundle_dir/manifest.json``; with ``verify`` also check every file's checksum."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist; make one with "
                          "`mobilemllm export --model CKPT --target android --out DIR`")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        present = ", ".join(sorted(p.name for p in bundle_dir.iterdir())) or "nothing"
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (it has: {present})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    validate_manifest(manifest, str(path))
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


# ---- writing ------------------------------------------------------------------------------------
def new_bundle_dir(out_dir: str | Path) -> Path:
    """A fresh staging folder beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    from mobilemllm.models.checkpoint import atomic_dir

    return atomic_dir(out_dir)


def discard(staging: str | Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuse to replace a folder that is neither empty nor a bundle (so a typo cannot delete a project)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file; give a folder path for the bundle")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
            raise UserError(f"--out {out_dir} is a non-empty folder that is not a bundle; "
                            "choose a new or empty folder (an existing bundle is replaced)")
    return out_dir


def finish_bundle(staging: str | Path, out_dir: str | Path, manifest: dict[str, Any],
                  roles: Mapping[str, str] | None = None) -> Path:
    """Fill in ``files``, validate, write manifest.json into ``staging`` and rename it over ``out_dir``.

    On any error the staging folder is removed and ``out_dir`` is left as it was.
    """
    from mobilemllm.models.checkpoint import commit_dir

    staging = Path(staging)
    try:
        manifest = dict(manifest)
        manifest.setdefault("schema_version", SCHEMA_VERSION)
        manifest.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        manifest["files"] = file_table(staging, roles)
        validate_manifest(manifest, "the new manifest")
        tmp = staging / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        tmp.replace(staging / MANIFEST_NAME)
        return commit_dir(staging, check_out_dir(out_dir))
    except BaseException:
        discard(staging)
        raise


def write_bundle(out_dir: str | Path, manifest: dict[str, Any], files: Mapping[str, str | Path | bytes],
                 roles: Mapping[str, str] | None = None, move: bool = False) -> Path:
    """Write a bundle from ready files: ``files`` maps a relative path to a source file/folder or bytes.

    Sources are copied (or moved with ``move=True``); the bundle appears at ``out_dir`` only once complete.
    """
    check_out_dir(out_dir)
    staging = new_bundle_dir(out_dir)
    try:
        for rel, src in files.items():
            dest = staging / rel
            if rel == MANIFEST_NAME or ".." in Path(rel).parts or Path(rel).is_absolute():
                raise UserError(f"bad bundle file name {rel!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, (bytes, bytearray)):
                dest.write_bytes(src)
            elif Path(src).is_dir():
                (shutil.move if move else shutil.copytree)(str(src), str(dest))
            elif move:
                shutil.move(str(src), str(dest))
            else:
                shutil.copy2(src, dest)
    except BaseException:
        discard(staging)
        raise
    return finish_bundle(staging, out_dir, manifest, roles)


# ---- manifest pieces shared by every format ------------------------------------------------------
def prompt_section(config, tokenizer) -> dict[str, Any]:
    """How to build the prompt exactly as training did: BOS, then text / image / text segments.

    BOS handling: ExecuTorch's C++ HF tokenizer ignores its ``bos`` argument but parses special-token
    text, so when the prompt starts with text, that first segment starts with the BOS token's text
    (``bos_text``, e.g. ``<s>``) and tokenizes to ``bos_id`` first. When it starts with the image,
    ``bos_id`` is prefilled as a token before it (MultimodalRunner does this for ``num_bos=1``).
    """
    from mobilemllm.data.templates import IMAGE, get_template

    tpl = get_template(config.template)
    marker = "\x00Q\x00"
    segments: list[dict[str, str]] = []
    for text, _ in tpl.prompt_segments(marker):
        if text == IMAGE:
            segments.append({"type": "image"})
        elif text:
            # The template strips the question; apps substitute the stripped question for {question}.
            segments.append({"type": "text", "text": text.replace(marker, QUESTION)})
    add_bos = tokenizer.bos_token_id is not None
    bos_text = tokenizer.bos_token if add_bos else None
    bos_in_text = bool(add_bos and segments and segments[0]["type"] == "text")
    if bos_in_text:
        segments[0] = {"type": "text", "text": bos_text + segments[0]["text"]}
    return {
        "template": tpl.name,
        "add_bos": add_bos,
        "bos_text": bos_text,
        "bos_in_first_text": bos_in_text,
        "segments": segments,
        "num_visual_tokens": config.num_visual_tokens,
    }


def fill_prompt(prompt: Mapping[str, Any], question: str) -> list[dict[str, str]]:
    """The manifest's segments with the question filled in: [{"type": "text", "text": ...}, {"type": "image"}]."""
    out = []
    for seg in prompt["segments"]:
        if seg["type"] == "text":
            out.append({"type": "text", "text": seg["text"].replace(QUESTION, question.strip())})
        else:
            out.append(dict(seg))
    return out


def needs_bos_token(prompt: Mapping[str, Any]) -> bool:
    """True when the runner must prefill BOS as a token (the prompt starts with the image)."""
    return bool(prompt["add_bos"] and not prompt.get("bos_in_first_text", False))


def prompt_token_ids(prompt: Mapping[str, Any], tokenizer, question: str, bos_id: int | None) -> list[int]:
    """Token ids the manifest's prompt gives, with IMAGE_TOKEN_ID (-200) at the visual-token positions."""
    from mobilemllm.models.vlm import IMAGE_TOKEN_ID

    ids: list[int] = [bos_id] if needs_bos_token(prompt) and bos_id is not None else []
    for seg in fill_prompt(prompt, question):
        if seg["type"] == "image":
            ids += [IMAGE_TOKEN_ID] * prompt["num_visual_tokens"]
        else:
            ids += tokenizer.encode(seg["text"], add_special_tokens=False)
    return ids


def preprocessing_section(vision_cfg, input_dtype: str = "uint8", normalize_in_graph: bool = True) -> dict[str, Any]:
    """What the app does to an image before the vision encoder (geometry only when normalize_in_graph)."""
    from mobilemllm.data.images import RESAMPLE

    s = vision_cfg.image_size
    return {
        "image_size": s,
        "aspect": vision_cfg.image_aspect,
        "pad_color": [int(round(m * 255)) for m in vision_cfg.image_mean],
        "resample": RESAMPLE,
        "hires": vision_cfg.hires,
        "tile_grid": list(vision_cfg.tile_grid),
        "views": vision_cfg.num_views,
        "input_dtype": input_dtype,
        "input_layout": "NCHW",
        "input_shape": [vision_cfg.num_views, 3, s, s],
        "normalize_in_graph": normalize_in_graph,
        "mean": list(vision_cfg.image_mean),
        "std": list(vision_cfg.image_std),
    }


def tokenizer_section(tokenizer, vocab_size: int) -> dict[str, Any]:
    from mobilemllm.data.tokenizer import eos_ids

    return {"dir": TOKENIZER_DIR, "bos_id": tokenizer.bos_token_id, "eos_ids": eos_ids(tokenizer),
            "vocab_size": vocab_size}


def model_section(model, source: str | None = None) -> dict[str, Any]:
    cfg = model.config.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
    out = {"name": cfg.name, "config": json.loads(json.dumps(cfg.to_dict())),
           "parameters": model.parameter_counts()}
    if source:
        out["source"] = str(source)
    return out


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the bundle."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mobilemllm", "torch", "executorch", "torchao", "transformers", "onnx", "onnxruntime", "coremltools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
