"""The benchmark's clock and measurements, shared by every backend and report: time to first token, peak
resident memory, sizes on disk, and the summary of repeated measurements (median, p10/p90, min/max).

Rates come from :mod:`mobilemllm.runtime.rates` (the one home of tokens/s for runners and the benchmark; "no
rate" is None), re-exported here so two backends can never disagree on what "decode tokens/s" means.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mobilemllm.procmem import peak_rss_bytes, release_memory, reset_peak_rss  # noqa: F401 (re-exported)
from mobilemllm.runtime.rates import tokens_per_second  # noqa: F401 (re-exported: the one rate helper)


def now() -> float:
    """A monotonic clock in seconds (the one every backend times with)."""
    return time.perf_counter()


def time_to_first_token(request_start: float, first_token_at: float) -> float:
    """Seconds from the start of a request (image + prompt handed over) to the first generated token."""
    if first_token_at < request_start:
        raise ValueError("the first token cannot come before the request started")
    return first_token_at - request_start


def prefill_tokens(text_tokens: int, visual_tokens: int) -> int:
    """Tokens the LLM consumes before the first generated token: the prompt's text plus the image's."""
    return int(text_tokens) + int(visual_tokens)


# ---- sizes ---------------------------------------------------------------------------------------
def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (a bundle, a checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
