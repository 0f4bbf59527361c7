"""Latency metrics, computed in one place for every runner and report.

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


def per_second(count: float, seconds: float) -> float:
    return float(count) / seconds if seconds > 0 else 0.0


def rates(stats: dict[str, Any]) -> dict[str, float]:
    """TTFT (s), prefill and decode tokens/s from an ExecuTorch ``Stats`` JSON dict."""
    if not stats:
        return {"ttft_s": 0.0, "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    scale = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000) or 1000)
    start = stats.get("inference_start_ms", 0)
    prompt_end = stats.get("prompt_eval_end_ms", start)
    first = stats.get("first_token_ms", prompt_end)
    end = stats.get("inference_end_ms", prompt_end)
    return {
        "ttft_s": (first - start) / scale,
        "prefill_tokens_per_s": per_second(stats.get("prompt_tokens", 0), (prompt_end - start) / scale),
        "decode_tokens_per_s": per_second(stats.get("generated_tokens", 0), (end - prompt_end) / scale),
    }


MS_RESOLUTION_OK_S = 0.05  # a span of >= 50 ms read from ms ticks is within 2 %


def wall_rates(stats: dict[str, Any], t0: float, stamps: list[float], t1: float) -> dict[str, float]:
    """Like :func:`rates`, but TTFT and decode from the wall clock: ``t0`` before generate, ``stamps`` at
    each token callback (the first is the prefill's token), ``t1`` after generate (all ``perf_counter``)."""
    r = rates(stats)
    if not stamps:
        return r
    ttft = max(stamps[0] - t0, 1e-9)
    r["ttft_s"] = ttft
    if len(stamps) > 1:
        r["decode_tokens_per_s"] = per_second(len(stamps) - 1, stamps[-1] - stamps[0])
    else:
        r["decode_tokens_per_s"] = 0.0
    prefill_span = (stats.get("prompt_eval_end_ms", 0) - stats.get("inference_start_ms", 0)) / float(
        stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000) or 1000) if stats else 0.0
    if prefill_span < MS_RESOLUTION_OK_S:  # too coarse: the first token's wall time bounds the prefill
        r["prefill_tokens_per_s"] = per_second(stats.get("prompt_tokens", 0) if stats else 0, ttft)
    return r
