"""mobilemllm: train, quantize, export and benchmark small MobileVLM-style multimodal LLMs for phones.

Importing the package is cheap; heavy modules (torch, transformers, executorch) load on first use.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": ("mobilemllm.config", "ModelConfig"),
    "PRESETS": ("mobilemllm.config", "PRESETS"),
    "load": ("mobilemllm.api", "load"),
    "answer": ("mobilemllm.inference", "answer"),
    "MobileVLM": ("mobilemllm.models.vlm", "MobileVLM"),
    "save_checkpoint": ("mobilemllm.models.checkpoint", "save_checkpoint"),
    "load_checkpoint": ("mobilemllm.models.checkpoint", "load_checkpoint"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mobilemllm' has no attribute {name!r}")
