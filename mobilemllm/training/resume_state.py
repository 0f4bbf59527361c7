"""The trainer's resumable state on disk without pickle: tensors in safetensors, everything else in JSON.

The state folder (``<run>/last/``) holds

- ``tensors.safetensors``: trainable weights, optimizer moments, torch/CUDA RNG states (uint8 tensors);
- ``state.json``: step, settings, optimizer hyper-parameters, scheduler, Python and numpy RNG states, each
  tensor referred to by its name in the safetensors file;
- ``step.json``: ``{"step": 4, "total_steps": 6}`` (also what marks the folder as a resumable state).

Resuming is the default, so a run folder from elsewhere is opened without being asked for: ``torch.load`` of
a pickle would run whatever code the file names; JSON and safetensors hold data only. The trainer writes
the folder aside and swaps it in (:mod:`mobilemllm.atomic`), so a crash during a save leaves the previous
state. The metrics log (``metrics.jsonl``) is appended one whole line per ``write`` call; an unreadable
line (a crash of an older version, a full disk) is dropped on resume with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mobilemllm.errors import UserError

STATE_JSON = "state.json"
TENSORS = "tensors.safetensors"
STEP_JSON = "step.json"
LEGACY_PICKLE = "state.pt"  # the pickle written by earlier versions: never loaded
FORMAT = 1
# What a JSON state may name as an array type (numpy's RNG keys are uint32): numbers only.
_NDARRAY_KINDS = "biuf"

log = logging.getLogger("mobilemllm.training")


# ------------------------------------------------------------------------------------------ codec
def pack(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """``obj`` as JSON-able data; each tensor moves to ``tensors`` (under its path) and leaves a reference.

    Tuples and dicts with non-string keys (optimizer state is keyed by parameter index) are tagged so
    :func:`unpack` gives back the same types."""
    if isinstance(obj, torch.Tensor):
        name = key or "tensor"
        while name in tensors:
            name += "'"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: pack(v, tensors, f"{key}/{k}") for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors), pack(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key or 'state'}: a {type(obj).__name__} cannot be saved in the resumable state")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack` (raises KeyError/TypeError/ValueError on a malformed file)."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(unpack(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in _NDARRAY_KINDS:
            raise ValueError(f"array type {obj['dtype']!r} is not a number type")
        return np.asarray(obj["__ndarray__"], dtype=dtype)
    if "__items__" in obj:
        return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in obj["__items__"]}
    return {k: unpack(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise TypeError(f"a {type(key).__name__} cannot be a dict key")
    return key


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from the JSON state (tuples become tagged lists): for comparing settings."""
    return json.loads(json.dumps(pack(obj, {})))


# ------------------------------------------------------------------------------------------ files
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


def write_state(folder: Path, step: int, state: dict[str, Any], total_steps: int) -> None:
    """Write ``state`` (nested dicts/lists/tuples of tensors, arrays and JSON values) after ``step`` into the new
    ``folder`` (a temporary one that the caller swaps in when this returns)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT, "state": pack(state, tensors)}
    _save_tensors(tensors, folder / TENSORS)
    _write_json(folder / STATE_JSON, meta)
    _write_json(folder / STEP_JSON, {"step": step, "total_steps": total_steps})


def has_state(folder: Path) -> bool:
    """Whether ``folder`` holds a resumable state (or the old pickle, which :func:`read_state` refuses)."""
    return (folder / STEP_JSON).exists() or (folder / LEGACY_PICKLE).exists()


def saved_step(folder: Path) -> int | None:
    """The step of the state in ``folder``, or None."""
    try:
        step = json.loads((folder / STEP_JSON).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _cannot_read(folder: Path, why: str) -> UserError:
    return UserError(f"cannot read the resumable state in {folder} ({why}); delete {folder} to start this "
                     "stage over, or run with --no-resume")


def read_state(folder: Path, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The state saved in ``folder``. ``check(state without tensors)`` runs before the tensors load, so a
    settings mismatch is reported without reading gigabytes of optimizer state."""
    if not (folder / STATE_JSON).exists() and (folder / LEGACY_PICKLE).exists():
        raise UserError(f"{folder / LEGACY_PICKLE} is a resumable state in the pickle format of earlier versions, "
                        "which is not loaded because a pickle can run code; delete the folder to start this "
                        "stage over, or run with --no-resume")
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{STATE_JSON} is not a format-{FORMAT} state")
        if check is not None:
            check(unpack(meta["state"], _NoTensors()))
        return unpack(meta["state"], load_file(str(folder / TENSORS)))
    except UserError:
        raise
    except Exception as e:  # anything a damaged or foreign file can raise: one line, not a traceback
        raise _cannot_read(folder, f"{type(e).__name__}: {e}") from None


class _NoTensors(dict):
    """Stands in for the tensors while only the settings are read."""

    def __missing__(self, key: str) -> None:
        return None


# ---------------------------------------------------------------------------------------- metrics
def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line in a single ``write`` on an O_APPEND file: a crash leaves the whole line
    or none of it, and a reader never sees half of one."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites the later ones); drop unreadable lines with a
    warning (a half-written last line from a crash). Rewritten under a temporary name, then renamed."""
    if not path.exists():
        return
    keep, bad = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        s = row.get("step") if isinstance(row, dict) else None
        if not isinstance(s, int):
            bad += 1
        elif s <= step:
            keep.append(line)
    if bad:
        log.warning(f"{path}: dropped {bad} unreadable line(s) (a run stopped while writing them)")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
