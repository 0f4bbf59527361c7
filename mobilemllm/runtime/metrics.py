"""Latency metrics, computed in one place for every runner and report.

Definitions (from ExecuTorch runner stats, all in ms since an arbitrary origin):
- time to first token (TTFT) = first_token - inference_start (tokenizing, image encoding, prefill);
- prefill tokens/s = prompt_tokens / (prompt_eval_end - inference_start);
- decode tokens/s = generated_tokens / (inference_end - prompt_eval_end), where generated_tokens are the
  tokens after the first (the first comes out of prefill).
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
