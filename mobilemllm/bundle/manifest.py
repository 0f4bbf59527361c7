"""Read and validate a bundle's ``manifest.json`` (schema, then the size and sha256 of every file).

``manifest["files"]`` lists every file but the manifest with its size and sha256; :func:`load_manifest`
checks the schema and, by default, every checksum, so a truncated or swapped file is caught before it is run.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from mobilemllm.bundle.layout import MANIFEST_NAME, SCHEMA_VERSION, TOKENIZER_DIR
from mobilemllm.errors import UserError


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
