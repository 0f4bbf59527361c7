"""This process's memory as the kernel reports it: current and peak resident set size.

Shared by the benchmark (per-case peaks) and training throughput (peak memory per step); it sits at the
bottom of the package so either may import it.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux ``clear_refs`` 5); False if unsupported.

    Lets a matrix run report each case's own peak instead of the largest case so far.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or since :func:`reset_peak_rss`)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def release_memory() -> None:
    """Return freed memory to the OS between cases (gc + glibc malloc_trim), so peaks do not carry over."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
