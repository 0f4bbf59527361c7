"""Write bundle folders atomically.

Writers build the folder in a staging directory and hand it to :func:`finish_bundle`, which fills in
``files``, validates, writes ``manifest.json`` and renames the staging folder over the target::

    staging = new_bundle_dir(out)
    ... write model files into staging ...
    finish_bundle(staging, out, manifest)

or, for files already on disk, :func:`write_bundle(out, manifest, {"model.pte": path, ...})`.

The output folder is handled by :mod:`mobilemllm.atomic`: locked while the export writes it, replaced in
one rename, and replaced only if it is empty or a bundle (recognised by a manifest that validates).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any, Mapping

from mobilemllm.atomic import (OutputBusy, OutputKind, abort_dir, atomic_dir, commit_dir, holds, probe_dir,
                              target_of)
from mobilemllm.bundle.layout import MANIFEST_NAME, SCHEMA_VERSION
from mobilemllm.bundle.manifest import bundle_problem, file_table, path_problem, validate_manifest
from mobilemllm.errors import UserError


# ---- writing ------------------------------------------------------------------------------------
BUNDLE = OutputKind("bundle", bundle_problem, writer="export")
_SEEN: dict[str, tuple[int, int] | None] = {}  # --out -> the folder it was when the export checked it


def _key(out_dir: Path) -> str:
    return os.path.abspath(out_dir)


def _identity(out_dir: Path) -> tuple[int, int] | None:
    """Which folder sits at ``out_dir`` now: each commit puts a new one there (a new inode)."""
    try:
        st = out_dir.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def new_bundle_dir(out_dir: str | Path) -> Path:
    """A fresh staging folder beside ``out_dir`` (same filesystem, so the final rename is atomic).

    Locks ``out_dir`` until :func:`finish_bundle` or :func:`discard`: another export to it fails at once.
    """
    out_dir = Path(out_dir)
    staging = atomic_dir(out_dir, BUNDLE)
    _SEEN.setdefault(_key(out_dir), _identity(out_dir))
    return staging


def discard(staging: str | Path) -> None:
    """Delete an unfinished staging folder and unlock its ``--out``."""
    with suppress(ValueError):
        _SEEN.pop(_key(target_of(staging)), None)
    abort_dir(staging)


def check_out_dir(out_dir: str | Path) -> Path:
    """Check ``out_dir`` before an export starts: new, empty or a bundle (recognised by its manifest).

    Anything else non-empty is refused, so a typo cannot delete a project; another export writing it
    fails at once. The folder found here is remembered: if another export replaces it before this one
    commits, :func:`finish_bundle` refuses instead of silently overwriting that export's result.
    """
    out_dir = Path(out_dir)
    if holds(out_dir):  # finish_bundle's re-check, under this export's own lock
        probe_dir(out_dir, BUNDLE)
        return out_dir
    probe_dir(out_dir, BUNDLE)
    _SEEN[_key(out_dir)] = _identity(out_dir)
    return out_dir


def _commit(staging: Path, out_dir: Path) -> Path:
    """Rename ``staging`` over ``out_dir`` unless another export replaced ``out_dir`` since this one began."""
    check_out_dir(out_dir)
    seen = _SEEN.pop(_key(out_dir), _identity(out_dir))
    if _identity(out_dir) != seen:
        raise OutputBusy(f"another export replaced {out_dir} while this one was running; this export was not "
                         "written (run it again to replace that bundle)")
    return commit_dir(staging, out_dir, BUNDLE)


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
        return _commit(staging, Path(out_dir))
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
            if rel == MANIFEST_NAME or path_problem(rel):
                raise UserError(f"bad bundle file name {rel!r}: {path_problem(rel) or 'reserved'}")
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
