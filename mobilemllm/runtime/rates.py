"""Rates and time to first token: the one home of every tokens/s figure (runners, `generate`, `bench`).

Convention: a rate that cannot be made (no tokens, or no positive time to divide by) is ``None`` -- JSON
``null``, "—" in tables, "n/a" in a runner's report line -- never 0.0, which would read as "infinitely slow".

Definitions (from ExecuTorch runner stats, all in ms since an arbitrary origin):
- time to first token (TTFT) = first_token - inference_start (tokenizing, image encoding, prefill);
- prefill tokens/s = prompt_tokens / (prompt_eval_end - inference_start);
- decode tokens/s = generated_tokens / (inference_end - prompt_eval_end), where generated_tokens are the
  tokens after the first (the first comes out of prefill).

The runner's stats tick in whole milliseconds; a tiny model on a fast machine prefills and decodes in less
than one tick, so :func:`wall_rates` times the same spans from per-token callbacks (``perf_counter``, µs)
and only falls back to the stats where a span is long enough for ms resolution to be accurate.
"""

from __future__ import annotations

from typing import Any


def tokens_per_second(count: float, seconds: float | None) -> float | None:
    """``count / seconds``; None when there is nothing to count or no positive time (no rate can be made)."""
    if seconds is None or seconds <= 0 or count <= 0:
        return None
    return float(count) / seconds


def rates(stats: dict[str, Any]) -> dict[str, float | None]:
    """TTFT (s), prefill and decode tokens/s from an ExecuTorch ``Stats`` JSON dict (None where unknown)."""
    if not stats:
        return {"ttft_s": None, "prefill_tokens_per_s": None, "decode_tokens_per_s": None}
    scale = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000) or 1000)
    start = stats.get("inference_start_ms", 0)
    prompt_end = stats.get("prompt_eval_end_ms", start)
    first = stats.get("first_token_ms", prompt_end)
    end = stats.get("inference_end_ms", prompt_end)
    return {
        "ttft_s": (first - start) / scale,
        "prefill_tokens_per_s": tokens_per_second(stats.get("prompt_tokens", 0), (prompt_end - start) / scale),
        "decode_tokens_per_s": tokens_per_second(stats.get("generated_tokens", 0), (end - prompt_end) / scale),
    }


MS_RESOLUTION_OK_S = 0.05  # a span of >= 50 ms read from ms ticks is within 2 %


def wall_rates(stats: dict[str, Any], t0: float, stamps: list[float], t1: float) -> dict[str, float | None]:
    """Like :func:`rates`, but TTFT and decode from the wall clock: ``t0`` before generate, ``stamps`` at
    each token callback (the first is the prefill's token), ``t1`` after generate (all ``perf_counter``)."""
    r = rates(stats)
    if not stamps:
        return r
    ttft = max(stamps[0] - t0, 1e-9)
    r["ttft_s"] = ttft
    r["decode_tokens_per_s"] = tokens_per_second(len(stamps) - 1, stamps[-1] - stamps[0])
    prefill_span = (stats.get("prompt_eval_end_ms", 0) - stats.get("inference_start_ms", 0)) / float(
        stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000) or 1000) if stats else 0.0
    if prefill_span < MS_RESOLUTION_OK_S:  # too coarse: the first token's wall time bounds the prefill
        r["prefill_tokens_per_s"] = tokens_per_second(stats.get("prompt_tokens", 0) if stats else 0, ttft)
    return r
