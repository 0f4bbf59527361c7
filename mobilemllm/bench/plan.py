"""Turn the command line into a list of cases (backend + bundle/checkpoint), checked before any weights load.

Order (row 1 is the reference of the ratios): ``--model`` cases (eager pytorch) first, then each
``--bundle`` in the order given, with every ``--backend`` that reads its format (or, without
``--backend``, the format's default: executorch -> ``executorch``, onnx -> ``onnxruntime``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mobilemllm.bench.backends import BACKENDS, DEFAULT_FOR_FORMAT, backend_format, check_backend
from mobilemllm.bench.backends.llamacpp import split_pair
from mobilemllm.bundle import load_manifest
from mobilemllm.config import PRESETS
from mobilemllm.errors import BackendUnavailable, ConfigError, UserError
from mobilemllm.models.checkpoint import check_checkpoint_dir


@dataclass(frozen=True)
class Case:
    backend: str
    target: str
    label: str


# ExecuTorch delegates whose programs cannot run on this (Linux x86) host.
HOST_UNRUNNABLE = {"coreml": "Core ML programs run only on Apple hardware (macOS / iOS)",
                   "qnn": "QNN programs run only on Qualcomm devices (use --device adb)"}


def _bundle_format(path: str, device: str) -> str:
    manifest = load_manifest(path, verify=False)
    delegate = (manifest.get("export") or {}).get("backend")
    if device == "host" and manifest["format"] == "executorch" and delegate in HOST_UNRUNNABLE:
        raise BackendUnavailable(f"{path} was exported for {delegate}: {HOST_UNRUNNABLE[delegate]}; benchmark an "
                                 "xnnpack/portable bundle here")
    if device == "host" and manifest["format"] == "coreml":
        raise BackendUnavailable(f"{path} is a Core ML bundle: Core ML prediction runs only on macOS / iOS")
    return manifest["format"]


def check_model(target: str) -> None:
    """A checkpoint folder that loads, or a preset name; one UserError otherwise (before anything loads)."""
    p = Path(target)
    if p.is_dir():
        check_checkpoint_dir(p)
    elif target not in PRESETS:
        raise UserError(f"--model {target}: no such checkpoint folder, and not a preset "
                        f"(presets: {', '.join(sorted(PRESETS))})")


def _gguf_case(pair: str) -> Case:
    """A bare GGUF pair (``MODEL.gguf,MMPROJ.gguf``), checked for files before anything loads."""
    text, mmproj = split_pair(pair)
    if mmproj is None:
        raise UserError(f"--gguf {pair}: the benchmark encodes an image; give MODEL.gguf,MMPROJ.gguf")
    missing = [str(p) for p in (text, mmproj) if not p.is_file()]
    if missing:
        raise UserError(f"--gguf: no such file: {', '.join(missing)}")
    return Case("llamacpp", f"{text},{mmproj}", text.name)


def plan_cases(bundles: Sequence[str], models: Sequence[str], backends: Sequence[str], device: str = "host",
               ggufs: Sequence[str] = ()) -> list[Case]:
    for b in backends:
        check_backend(b)
    if "pytorch" in backends and not models:
        raise UserError("--backend pytorch runs a checkpoint: add --model CKPT (a checkpoint folder or a preset name)")
    gguf_cases = [_gguf_case(g) for g in ggufs]
    if gguf_cases and device != "host":
        raise UserError(f"--gguf runs llama.cpp on this host, not on --device {device}")
    if gguf_cases and not bundles and not models:
        return gguf_cases
    if not bundles and not models:
        raise UserError("nothing to benchmark: give --bundle DIR (an exported bundle) and/or --model CKPT "
                        "(a checkpoint folder or preset, run eagerly with --backend pytorch)")
    cases: list[Case] = []
    for m in models:
        check_model(m)
        cases.append(Case("pytorch", m, Path(m).name if Path(m).is_dir() else m))
    bundle_backends = [b for b in backends if backend_format(b) is not None]
    for b in bundles:
        fmt = _bundle_format(b, device)
        fitting = [x for x in bundle_backends if backend_format(x) == fmt]
        if not bundle_backends:
            default = DEFAULT_FOR_FORMAT.get(fmt)
            if default is None:
                raise UserError(f"{b} is a {fmt} bundle, which no benchmark backend runs on this machine "
                                f"(backends: {', '.join(BACKENDS)})")
            fitting = [default]
        elif not fitting:
            raise UserError(f"{b} is a {fmt} bundle; none of --backend {', '.join(bundle_backends)} reads it "
                            f"(use one of: {', '.join(n for n in BACKENDS if backend_format(n) == fmt)})")
        for x in fitting:
            cases.append(Case(x, b, Path(b).resolve().name))
    cases += gguf_cases
    if device != "host":
        bad = [c for c in cases if c.backend != "executorch"]
        if bad:
            raise UserError(f"--device {device} runs ExecuTorch bundles with the phone's runner binary; "
                            f"{', '.join(f'{c.label} ({c.backend})' for c in bad)} cannot run there")
    return cases
