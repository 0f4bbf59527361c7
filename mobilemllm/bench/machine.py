"""What the numbers were measured on: CPU model, cores, threads used, memory, OS and package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mobilemllm.bench.timing import cpu_threads_default

PACKAGES = ("mobilemllm", "torch", "executorch", "torchao", "transformers", "onnxruntime", "onnxruntime-genai",
            "llama_cpp_python", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def describe(threads: int | None = None, device: str = "host") -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": cpu_threads_default(),
        "threads": threads or cpu_threads_default(),
        "memory_bytes": memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "load_average": load,  # other work on the machine makes numbers noisy: this says how busy it was
        "versions": versions(),
    }
