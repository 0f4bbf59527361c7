"""Read and validate a bundle's ``manifest.json`` (schema, then the size and sha256 of every file).

``manifest["files"]`` lists every file but the manifest with its size and sha256; :func:`load_manifest`
checks the schema and, by default, every checksum, so a truncated or swapped file is caught before it is run.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from mobilemllm.bundle.layout import FORMATS, MANIFEST_NAME, PROGRAM_NAME, SCHEMA_VERSION, TOKENIZER_DIR
from mobilemllm.errors import UserError


class BundleError(UserError):
    """A bundle folder that is missing, incomplete, corrupt or of another schema version."""


MAX_MANIFEST_BYTES = 16 << 20  # real manifests are a few kB; the model config inside is the largest part


# ---- schema ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The JSON schema every manifest.json is validated against (shipped in mobilemllm/schemas/)."""
    return json.loads(resources.files("mobilemllm").joinpath("schemas", "manifest.schema.json").read_text())


def schema_errors(manifest: Mapping[str, Any]) -> list[str]:
    """Every schema violation in ``manifest``, as 'path: message' lines (empty when valid)."""
    import jsonschema  # lazy: a tenth of a second to load, and `mobilemllm --help` loads this module

    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{where}: {err.message}")
    return errors


def validate_manifest(manifest: Mapping[str, Any], source: str = "manifest") -> None:
    """Schema, paths and format of ``manifest`` (no files are read); a :class:`BundleError` names the problems."""
    if not isinstance(manifest, Mapping):
        raise BundleError(f"{source} is not a JSON object")
    version = manifest.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        raise BundleError(f"{source} has schema_version {version!r}; this mobilemllm reads version {SCHEMA_VERSION}. "
                          "Re-export the bundle with `mobilemllm export`")
    bad = [f"{what} {rel!r} {why}" for what, rel in manifest_paths(manifest) if (why := path_problem(rel))]
    if bad:
        raise BundleError(f"{source} names paths outside the bundle: " + "; ".join(bad[:6]) +
                          ". Re-export the bundle with `mobilemllm export`")
    errors = schema_errors(manifest)
    if errors:
        shown = "; ".join(errors[:6]) + (f" ... (+{len(errors) - 6} more)" if len(errors) > 6 else "")
        raise BundleError(f"{source} does not match the manifest schema: {shown}")
    if "methods" not in manifest and "graphs" not in manifest:
        raise BundleError(f"{source} lists neither 'methods' (executorch) nor 'graphs' (onnx/coreml)")
    check_format_files(manifest, source)


# ---- paths --------------------------------------------------------------------------------------
def path_problem(rel: str) -> str | None:
    """Why ``rel`` is not a plain relative path inside a bundle (None when it is).

    Manifest paths are data from a file anyone can edit: they are read, hashed and pushed to a phone, so
    they must stay inside the folder: no absolute paths, drive letters, backslashes, '..', empty or '.'
    segments, or control characters (which also keep shell and sha256sum output unambiguous).
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "holds a control character"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape: no file system can name it
        return "is not valid Unicode"
    if "\\" in rel or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "is absolute or uses backslashes"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def manifest_paths(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(what, relative path) for every path a manifest names: files, the tokenizer folder, model files.

    Tolerates any JSON (it runs before the schema check, so that a path problem is named as one).
    """
    def obj(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    out = [("file", rel) for rel in obj(manifest.get("files"))]
    tok_dir = obj(manifest.get("tokenizer")).get("dir")
    if isinstance(tok_dir, str) and tok_dir not in ("", "."):  # '' and '.': tokenizer files at the top level
        out.append(("tokenizer dir", tok_dir))
    for section in ("methods", "graphs"):
        for name, entry in obj(manifest.get(section)).items():
            if isinstance(obj(entry).get("file"), str):
                out.append((f"{section}.{name}.file", entry["file"]))
    return out


def confined_path(bundle_dir: str | Path, rel: str) -> Path:
    """``bundle_dir / rel``, refused unless it (after following symbolic links) stays inside ``bundle_dir``."""
    bundle_dir = Path(bundle_dir)
    why = path_problem(rel) if rel not in ("", ".") else None
    p = bundle_dir / rel
    try:
        inside = why is None and p.resolve().is_relative_to(bundle_dir.resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise BundleError(f"{bundle_dir}: cannot resolve {rel!r} ({e})") from None
    if not inside:
        raise BundleError(f"{bundle_dir}: {rel!r} leads outside the bundle folder "
                          f"({why or 'a symbolic link points out'}); refusing to read it")
    return p


def check_confined(bundle_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Every path the manifest names stays inside ``bundle_dir`` on disk (symbolic links included)."""
    for _, rel in manifest_paths(manifest):
        confined_path(bundle_dir, rel)


def check_format_files(manifest: Mapping[str, Any], source: str = "manifest") -> None:
    """The model files the manifest's ``format`` needs are among its ``files``.

    executorch: the program (model.pte) and a ``methods`` table; onnx: every graph's ``.onnx`` file; gguf:
    its ``.gguf`` files (text model, mmproj); coreml: every graph's ``.mlpackage`` folder (files under it).
    """
    fmt, files = manifest["format"], manifest["files"]
    problems = []
    if fmt == "executorch":
        if "methods" not in manifest:
            problems.append("no 'methods' table")
        if PROGRAM_NAME not in files:
            problems.append(f"no {PROGRAM_NAME} in files")
    else:
        graphs = manifest.get("graphs") or {}
        if not graphs:
            problems.append("no 'graphs' table")
        suffix = {"onnx": ".onnx", "gguf": ".gguf"}.get(fmt, ".mlpackage")
        for part, entry in sorted(graphs.items()):
            name = entry.get("file")
            if not isinstance(name, str) or not name.endswith(suffix):
                problems.append(f"graph {part} has no {suffix} file")
            elif fmt in ("onnx", "gguf") and name not in files:
                problems.append(f"graph {part}'s {name} is not in files")
            elif fmt == "coreml" and not any(rel.startswith(name + "/") for rel in files):
                problems.append(f"graph {part}'s {name} has no files")
    if problems:
        raise BundleError(f"{source} says format {fmt!r} but " + "; ".join(problems) +
                          ". Re-export the bundle with `mobilemllm export`")


def bundle_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a mobilemllm bundle (None when its manifest.json is ours and validates).

    Recognises a bundle by content (valid JSON, this schema_version, a known format, the schema), never by
    a file name alone: a web app's own manifest.json does not make its folder replaceable.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return f"it has no {MANIFEST_NAME}"
    try:
        manifest = read_manifest_file(path)
    except BundleError:
        return f"its {MANIFEST_NAME} is not JSON"
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        return f"its {MANIFEST_NAME} has no schema_version {SCHEMA_VERSION}"
    if manifest.get("format") not in FORMATS:
        return f"its {MANIFEST_NAME} has no bundle format ({', '.join(FORMATS)})"
    try:
        validate_manifest(manifest, MANIFEST_NAME)
    except BundleError as e:
        return f"its {MANIFEST_NAME} does not validate: {str(e)[:300]}"
    return None


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
        p = confined_path(bundle_dir, rel)
        try:
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != entry["size"]:
                problems.append(f"{rel} is {p.stat().st_size} bytes, manifest says {entry['size']}")
            elif sha256_file(p) != entry["sha256"]:
                problems.append(f"{rel} has a different sha256 than the manifest (modified or corrupt)")
        except OSError as e:
            problems.append(f"{rel} cannot be read ({e.strerror or e})")
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
        present = ", ".join(sorted(p.name for p in bundle_dir.iterdir())[:20]) or "nothing"
        raise BundleError(f"{bundle_dir} is not a bundle: no {MANIFEST_NAME} (it has: {present})")
    manifest = read_manifest_file(path)
    validate_manifest(manifest, str(path))
    check_confined(bundle_dir, manifest)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def read_manifest_file(path: Path) -> Any:
    """The parsed JSON of ``path``, or a BundleError (bad UTF-8, bad JSON, absurd nesting or numbers)."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSONDecodeError, huge ints
        raise BundleError(f"{path} is not valid JSON ({str(e)[:200]}); re-export the bundle") from None
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror or e})") from None
