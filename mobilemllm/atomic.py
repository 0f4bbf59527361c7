"""Output folders that survive crashes and concurrent writers: built aside, swapped in, under a lock.

A writer (a bundle export, a checkpoint save, the trainer's resumable state) builds the new folder in a
temporary sibling from :func:`atomic_dir`, then :func:`commit_dir` swaps it in:

1. rename the old folder aside (``.<name>.old-<pid>-<id>``),
2. rename the new folder into place,
3. delete the old one.

Both steps run under an advisory lock on ``.<name>.lock`` beside the target (``filelock``), held from
:func:`atomic_dir` until :func:`commit_dir` or :func:`abort_dir`. A second process that wants the same
folder meanwhile fails at once with one line ("another export is writing ..."); it does not wait, so
neither can silently overwrite the other. Within one process the lock is re-entrant.

Every claim first repairs what a killed writer left (the lock makes this safe): a target that is missing
while an ``.old-*`` exists gets it back (killed between steps 1 and 2); ``.old-*`` beside a present target
are deleted (killed between 2 and 3); ``.tmp-*`` folders whose process no longer runs on this machine are
deleted (the pid is part of the name).

An existing non-empty target is replaced only if its :class:`OutputKind` recognises it by content (a
bundle by a manifest that validates, a checkpoint by a config that loads), never by a file name: a
mistyped ``--out`` pointing at someone's project is refused, not deleted.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from mobilemllm.errors import UserError


class OutputBusy(UserError):
    """Another process holds the lock on the output folder."""

    exit_code = 1


@dataclass(frozen=True)
class OutputKind:
    """What a writer puts in its folder, and how to recognise an existing folder of that kind.

    ``problem(folder)`` says why a non-empty ``folder`` is *not* one of ours (None: it is, so replacing it
    is what the user asked for). ``writer`` names the job in the busy message ("export", "checkpoint save").
    """

    name: str
    problem: Callable[[Path], str | None]
    writer: str = "process"

    @classmethod
    def json_marker(cls, name: str, marker: str, key: str, writer: str = "process") -> "OutputKind":
        """A kind recognised by ``marker``, a JSON object holding ``key`` (e.g. ``step.json`` with ``step``)."""

        def problem(folder: Path) -> str | None:
            try:
                data = json.loads((folder / marker).read_text())
            except (OSError, ValueError, RecursionError):
                return f"it has no readable {marker}"
            return None if isinstance(data, dict) and key in data else f"its {marker} has no {key!r}"

        return cls(name, problem, writer)


# The default: only a missing or empty folder may be written (a writer that replaces names its kind).
NEW_FOLDER = OutputKind("new folder", lambda folder: "nothing may replace it")

_TMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]+$")
_HELD: dict[str, tuple[int, object]] = {}  # lock file -> (pid that took it, its FileLock)


def lock_path(target: str | Path) -> Path:
    """``.<name>.lock`` beside ``target`` (absolute, so one folder has one key however it is spelled)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


def _sibling(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a reused pid counts as alive: its folder is kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holds(target: str | Path) -> bool:
    """Whether this process holds the lock on ``target``."""
    held = _HELD.get(str(lock_path(target)))
    return held is not None and held[0] == os.getpid()


def _acquire(target: Path, kind: OutputKind, wait_s: float) -> None:
    """Take the lock on ``target`` (re-entrant in this process); one line if another process holds it."""
    key = str(lock_path(target))
    if holds(target):
        return
    _HELD.pop(key, None)  # taken before a fork: the parent's lock, not this process's
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(key, timeout=wait_s, thread_local=False, poll_interval=0.01)
        lock.acquire()
    except Timeout:
        raise OutputBusy(f"another {kind.writer} is writing {target} (it holds {key}); wait for it to finish "
                         "or choose another folder") from None
    except OSError as e:
        raise UserError(f"cannot write in {target.parent}: {e.strerror or e}") from None
    _HELD[key] = (os.getpid(), lock)


def release_dir(target: str | Path) -> None:
    """Give up the lock on ``target`` (no-op when this process does not hold it)."""
    key = str(lock_path(target))
    held = _HELD.pop(key, None)
    if held is None or held[0] != os.getpid():
        return
    with suppress(OSError):  # unlinked while still held: a waiter sees the stale inode and retries (filelock>=4)
        os.unlink(key)
    held[1].release()


def _recover(target: Path) -> None:
    """Undo what a killed writer left beside ``target`` (the caller holds the lock)."""
    parent, name = target.parent, glob.escape(target.name)
    olds = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    if olds and not target.exists() and not target.is_symlink():
        os.replace(olds.pop(), target)  # killed between the renames: the old folder is the last complete one
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{name}.tmp-*"):
        m = _TMP.search(tmp.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(target: Path, kind: OutputKind) -> None:
    if target.is_symlink():
        raise UserError(f"{target} is a symbolic link; give the path of a real folder")
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{target} is a file; give a folder path for the {kind.name}")
    if not any(target.iterdir()):
        return
    why = kind.problem(target)
    if why:
        raise UserError(f"{target} is a non-empty folder that is not a {kind.name} ({why}); nothing was written: "
                        f"choose a new or empty folder (an existing {kind.name} there is replaced)")


def claim_dir(target: str | Path, kind: OutputKind = NEW_FOLDER, wait_s: float = 0.0) -> Path:
    """Lock ``target``, repair leftovers of killed writers, and check it may be replaced; the lock stays held.

    ``wait_s`` > 0 waits that long for another process's lock before failing (0: fail at once).
    """
    target = Path(target)
    _acquire(target, kind, wait_s)
    try:
        _recover(target)
        _check_replaceable(target, kind)
    except BaseException:
        release_dir(target)
        raise
    return target


def probe_dir(target: str | Path, kind: OutputKind = NEW_FOLDER) -> Path:
    """The checks of :func:`claim_dir` at the start of a long job, without keeping the lock afterwards."""
    target = Path(target)
    if holds(target):
        _check_replaceable(target, kind)
        return target
    claim_dir(target, kind)
    release_dir(target)
    return target


def atomic_dir(target: str | Path, kind: OutputKind = NEW_FOLDER, wait_s: float = 0.0) -> Path:
    """A fresh temporary folder beside ``target`` (locked); pass it to :func:`commit_dir` when complete."""
    target = claim_dir(target, kind, wait_s)
    tmp = _sibling(target, "tmp")
    try:
        tmp.mkdir()
    except BaseException:
        release_dir(target)
        raise
    return tmp


def target_of(tmp: str | Path) -> Path:
    """The target a folder from :func:`atomic_dir` is for (``.name.tmp-<pid>-<id>`` -> ``name``)."""
    tmp = Path(tmp)
    m = _TMP.search(tmp.name)
    if not tmp.name.startswith(".") or not m:
        raise ValueError(f"{tmp} is not a folder made by atomic_dir")
    return tmp.parent / tmp.name[1:m.start()]


def abort_dir(tmp: str | Path) -> None:
    """Delete an unfinished folder from :func:`atomic_dir` and give up its target's lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    with suppress(ValueError):
        release_dir(target_of(tmp))


def commit_dir(tmp: Path, target: str | Path, kind: OutputKind = NEW_FOLDER) -> Path:
    """Replace ``target`` with the completed ``tmp`` folder and give up the lock.

    The target is either the old folder or the new one at every moment except between the two renames;
    a writer killed there leaves the old folder as ``.old-*``, which the next claim puts back.
    """
    target = claim_dir(target, kind)
    try:
        old = None
        if target.exists():
            old = _sibling(target, "old")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                with suppress(OSError):
                    os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        release_dir(target)
    return target
