"""`mobilemllm train-bench`: training throughput (tokens/s per device, peak memory) of a preset's shapes.

    mobilemllm train-bench --preset mobilevlm-v2-1.7b --steps 200 --micro-batch 8   # one GPU, bf16
    torchrun --nproc-per-node 8 -m mobilemllm train-bench --preset mobilevlm-v2-1.7b  # per-GPU rate under DDP
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def train_bench(
    preset: str = typer.Option("tiny", "--preset", "-p", help="A model preset (tiny, bench, mobilevlm-v2-1.7b, "
                               "...); built with random weights, nothing is downloaded."),
    stage: str = typer.Option("instruct", "--stage", "-s", help="Which stage's freezing to time: pretrain "
                              "(connector only) or instruct (connector + LLM)."),
    steps: int = typer.Option(50, "--steps", help="Optimizer steps to run, warm-up included."),
    warmup: int = typer.Option(5, "--warmup", help="Leading steps left out of the rate (allocator, autotuning)."),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Samples per forward/backward on each device."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Samples per optimizer step over all "
                                               "devices (default: one micro-batch per device, no accumulation)."),
    text_tokens: int = typer.Option(128, "--text-tokens", help="Text tokens per sample (prompt + answer); the "
                                    "preset's visual tokens and BOS come on top."),
    answer_tokens: int = typer.Option(32, "--answer-tokens", help="Of the text tokens, how many carry the loss."),
    grad_checkpointing: bool = typer.Option(True, "--grad-checkpointing/--no-grad-checkpointing",
                                            help="Recompute activations in backward (as the shipped recipes do)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on GPU, fp32 on CPU), bf16 "
                                  "or fp32."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON to this file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Measure training speed: tokens/s per device, model TFLOP/s and peak memory, on random weights."""
    from mobilemllm.training.distributed import dist_env  # lazy: cli startup
    from mobilemllm.training.throughput import measure, print_report, write_json  # lazy: cli startup

    r = measure(preset, stage=stage, steps=steps, warmup=warmup, micro_batch=micro_batch, global_batch=global_batch,
                text_tokens=text_tokens, answer_tokens=answer_tokens, grad_checkpointing=grad_checkpointing,
                precision=precision, progress=progress)
    if dist_env().is_main:
        print_report(r)
        if json_out:
            write_json(r, json_out)
