"""Benchmark backends by name. Each lives in its own module, imported only when used.

- ``pytorch``: eager transformers on a checkpoint folder or a preset (random weights): the reference.
- ``executorch``: a bundle through ExecuTorch's C++ ``MultimodalRunner`` (what the apps run), with its stats.
- ``executorch-methods``: the same bundle's methods timed one by one through the ExecuTorch runtime.
- ``onnxruntime``: an ONNX bundle's graphs through ONNX Runtime.
- ``llamacpp``: a GGUF bundle (or a bare GGUF pair, ``--gguf``) through llama.cpp itself (llama-cpp-python).
"""

from __future__ import annotations

import importlib

from mobilemllm.errors import ConfigError

# name -> (module, class, bundle format it reads; None: a checkpoint folder or preset, not a bundle)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "executorch": ("mobilemllm.bench.backends.executorch", "ExecuTorchRunnerBackend", "executorch"),
    "executorch-methods": ("mobilemllm.bench.backends.executorch", "ExecuTorchMethodsBackend", "executorch"),
    "onnxruntime": ("mobilemllm.bench.backends.onnxruntime", "OnnxRuntimeBackend", "onnx"),
    "llamacpp": ("mobilemllm.bench.backends.llamacpp", "LlamaCppBackend", "gguf"),
    "pytorch": ("mobilemllm.bench.backends.pytorch", "PyTorchBackend", None),
}
# The backend a bundle gets when --backend is not given.
DEFAULT_FOR_FORMAT = {"executorch": "executorch", "onnx": "onnxruntime", "gguf": "llamacpp"}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def backend_format(name: str) -> str | None:
    return BACKENDS[check_backend(name)][2]


def make_backend(name: str, target: str, threads: int | None = None):
    module, cls, _ = BACKENDS[check_backend(name)]
    return getattr(importlib.import_module(module), cls)(target, threads=threads)
