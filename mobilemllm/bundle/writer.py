"""Write bundle folders atomically.

Writers build the folder in a staging directory and hand it to :func:`finish_bundle`, which fills in
``files``, validates, writes ``manifest.json`` and renames the staging folder over the target::

    staging = new_bundle_dir(out)
    ... write model files into staging ...
    finish_bundle(staging, out, manifest)

or, for files already on disk, :func:`write_bundle(out, manifest, {"model.pte": path, ...})`.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from mobilemllm.atomic import atomic_dir, commit_dir
from mobilemllm.bundle.layout import MANIFEST_NAME, SCHEMA_VERSION
from mobilemllm.bundle.manifest import file_table, validate_manifest
from mobilemllm.errors import UserError


# ---- writing ------------------------------------------------------------------------------------
def new_bundle_dir(out_dir: str | Path) -> Path:
    """A fresh staging folder beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
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
