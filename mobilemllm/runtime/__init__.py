"""Run exported bundles: one :class:`~mobilemllm.runtime.base.Runner` interface, one runner per format.

    from mobilemllm.runtime import open_runner
    runner = open_runner("bundles/tiny-android")      # ExecuTorch MultimodalRunner / ONNX Runtime, by manifest
    chat = runner.conversation("cat.png")
    print(chat.ask("What colour is the cat?").text)
    print(chat.ask("What is it sitting on?").text)    # a follow-up continues the KV cache

:func:`run_bundle` is the one-shot form ``mobilemllm generate --bundle`` uses (it prints the numbers).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from mobilemllm.runtime.base import (RUNNERS, ContextFull, Conversation, RunResult, Runner, Sampling, TextStream,
                                     bundle_views, open_runner)

__all__ = ["RUNNERS", "ContextFull", "Conversation", "RunResult", "Runner", "Sampling", "TextStream",
           "bundle_views", "open_runner", "run_bundle", "report_line"]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def report_line(result: RunResult, runner: Runner) -> str:
    """The numbers of one answer in one line (what `generate` and `chat` print to stderr)."""
    def rate(v: float | None) -> str:  # None: nothing to time (e.g. one generated token: no decode step)
        return f"{v:.1f} tok/s" if v else "n/a"

    reused = f" ({result.reused_tokens} from the cache)" if result.reused_tokens else ""
    return (f"[{result.prompt_tokens} prompt tokens{reused}, {result.generated_tokens} generated; time to first "
            f"token {(result.ttft_s or 0) * 1000:.0f} ms, prefill {rate(result.prefill_tokens_per_s)}, decode "
            f"{rate(result.decode_tokens_per_s)}; {runner.describe()}]")


def run_bundle(bundle_dir: str | Path, pil_image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
               on_text: Callable[[str], None] | None = None, image_path=None, report: bool = True,
               providers: list[str] | None = None, **sampling: Any) -> RunResult:
    """Answer ``prompt`` about ``pil_image`` with the bundle at ``bundle_dir`` (loads it for this one answer).

    With ``report``, notes a resized image and prints the numbers to stderr. ``sampling``: top_p, seed, stop.
    """
    runner = open_runner(bundle_dir, warn=_stderr if report else None, providers=providers or None)
    result = runner.generate(pil_image, prompt, on_text=on_text, image_path=image_path,
                             max_new_tokens=max_new_tokens, temperature=temperature, **sampling)
    if report:
        if on_text is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
        _stderr(report_line(result, runner))
    return result
