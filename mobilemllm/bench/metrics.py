"""One helper per metric, shared by every backend and report: tokens/s, time to first token, peak
resident memory, sizes on disk, and the summary of repeated measurements (median, p10/p90, min/max).

Every rate and summary in a table, JSON file or plot comes from here, so two backends can never
disagree on what "decode tokens/s" means.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence


def now() -> float:
    """A monotonic clock in seconds (the one every backend times with)."""
    return time.perf_counter()


def tokens_per_second(tokens: int, seconds: float | None) -> float | None:
    """``tokens / seconds``; None when the time is unknown or not positive (a rate cannot be made)."""
    if seconds is None or seconds <= 0 or tokens <= 0:
        return None
    return tokens / seconds


def time_to_first_token(request_start: float, first_token_at: float) -> float:
    """Seconds from the start of a request (image + prompt handed over) to the first generated token."""
    if first_token_at < request_start:
        raise ValueError("the first token cannot come before the request started")
    return first_token_at - request_start


def prefill_tokens(text_tokens: int, visual_tokens: int) -> int:
    """Tokens the LLM consumes before the first generated token: the prompt's text plus the image's."""
    return int(text_tokens) + int(visual_tokens)


# ---- memory --------------------------------------------------------------------------------------
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


def current_rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or since :func:`reset_peak_rss`)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def release_memory() -> None:
    """Return freed memory to the OS between cases (gc + glibc malloc_trim), so peaks do not carry over."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# ---- sizes ---------------------------------------------------------------------------------------
def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (a bundle, a checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


# ---- summaries -----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100), numpy's default method."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Repeated measurements of one metric: never a single run."""

    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float
    mean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(values: Iterable[float | None]) -> Summary | None:
    """Median and spread of the known values (None values are skipped); None when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return Summary(n=len(xs), median=percentile(xs, 50), p10=percentile(xs, 10), p90=percentile(xs, 90),
                   min=min(xs), max=max(xs), mean=sum(xs) / len(xs))


def cpu_threads_default() -> int:
    """Threads a backend uses when not told: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
