"""Folders written atomically: build in a temporary sibling, then rename over the target."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def atomic_dir(target: str | Path) -> Path:
    """A fresh temporary folder beside ``target``; pass it to :func:`commit_dir` when complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, target: str | Path) -> Path:
    """Replace ``target`` with the completed ``tmp`` folder (old contents removed only after the swap)."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
