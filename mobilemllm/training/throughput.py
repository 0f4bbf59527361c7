"""Training throughput of a preset's shapes: tokens/s per device and peak memory, through the real trainer.

``mobilemllm train-bench --preset mobilevlm-v2-1.7b --steps 200`` builds the preset with random weights
(no checkpoint needed), makes fixed-length synthetic samples (one image, a prompt, an answer), and runs
the pretrain or instruct stage's freezing with :class:`~mobilemllm.training.trainer.Trainer` — the same
loop, precision (bf16 autocast on GPU), gradient checkpointing and optimizer as ``mobilemllm train``. The
first ``--warmup`` steps (allocator growth, kernel autotuning) are left out of the rate.

Reported, per device (``torchrun`` runs report the rank-0 view; every rank holds the same batch size):

- ``tokens_per_s``: sequence tokens (text + visual tokens, what the LLM processes) per second;
- ``text_tokens_per_s``: the same without visual tokens (comparable with LM pretraining figures such as
  MobileLLaMA-1.4B's 18,800 tokens/s per A100);
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS on CPU;
- ``model_tflops_per_s``: an estimate, 6 x trainable + 2 x frozen parameters per LLM token (backward of
  frozen layers under trainable ones is counted as forward-only, which under-counts) plus the vision tower
  and connector per patch of each image, by the same rule; attention's quadratic term is left out.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mobilemllm.bundle.layout import IGNORE_INDEX, IMAGE_TOKEN_ID
from mobilemllm.config import ModelConfig
from mobilemllm.data.dataset import Sample, collate
from mobilemllm.errors import UserError
from mobilemllm.models.vlm import MobileVLM
from mobilemllm.procmem import peak_rss_bytes, reset_peak_rss
from mobilemllm.training.distributed import dist_env, pick_device
from mobilemllm.training.losses import LMObjective
from mobilemllm.training.stages import get_stage, trainable_parts
from mobilemllm.training.trainer import TrainConfig, Trainer

STAGES = ("pretrain", "instruct")


def synthetic_samples(config, n: int, text_tokens: int, answer_tokens: int, seed: int = 0) -> list:
    """``n`` samples of exactly ``1 + visual + text_tokens`` ids: BOS, the image, a prompt, an answer."""
    if not 1 <= answer_tokens <= text_tokens:
        raise UserError(f"--answer-tokens must be between 1 and --text-tokens ({text_tokens}); got {answer_tokens}")
    g = torch.Generator().manual_seed(seed)
    vocab = config.llm.vocab_size
    vis = config.num_visual_tokens
    views = config.vision.num_views
    size = config.vision.image_size
    prompt_len = text_tokens - answer_tokens
    out = []
    for _ in range(n):
        text = torch.randint(3, vocab, (text_tokens,), generator=g).tolist()
        ids = [1] + [IMAGE_TOKEN_ID] * vis + text
        labels = [IGNORE_INDEX] * (1 + vis + prompt_len) + text[prompt_len:]
        pix = torch.randn((views, 3, size, size) if views > 1 else (3, size, size), generator=g)
        out.append(Sample(ids, labels, pix))
    return out


def _flops_per_token(model, config, stage_parts: dict[str, bool]) -> tuple[float, float]:
    """(FLOPs per LLM token, FLOPs per image for the connector and vision tower)."""
    counts = model.parameter_counts()
    llm_flops = (6 if stage_parts["llm"] else 2) * counts["llm"]
    # the vision tower and the connector (its MLP dominates) run on every patch of every view of an image
    patches = config.vision.num_patches * config.vision.num_views
    per_image = ((6 if stage_parts["vision"] else 2) * counts["vision"]
                 + (6 if stage_parts["connector"] else 2) * counts["connector"]) * patches
    return llm_flops, per_image


def measure(preset: str = "tiny", *, stage: str = "instruct", steps: int = 50, warmup: int = 5, micro_batch: int = 4,
            global_batch: int | None = None, text_tokens: int = 128, answer_tokens: int = 32,
            grad_checkpointing: bool = True, precision: str = "auto", lr: float = 2e-5,
            run_dir: str | Path | None = None, progress: bool = True, overrides: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Train ``steps`` optimizer steps of ``stage`` on ``preset``'s shapes (random weights); return the rates."""
    config, seq = _bench_config(preset, stage, steps, warmup, text_tokens, overrides)
    env = dist_env()
    device = pick_device(env)
    global_batch = global_batch or micro_batch * env.world_size
    model, parts = _random_model(config, stage, device)
    samples = synthetic_samples(config, global_batch, text_tokens, answer_tokens)
    cfg = TrainConfig(lr=lr, global_batch=global_batch, micro_batch=micro_batch, max_steps=steps,
                      warmup_ratio=0.0, grad_checkpointing=grad_checkpointing, precision=precision,
                      save_every=steps + 1, log_every=steps + 1)
    clock = _StepClock(device)
    with tempfile.TemporaryDirectory(prefix="mobilemllm-train-bench-") as tmp:
        trainer = Trainer(model, LMObjective(), samples, lambda items: collate(items, 0), cfg,
                          Path(run_dir) if run_dir else Path(tmp), progress=progress, desc=f"{stage} ({preset})")
        summary = trainer.fit(resume=False, on_step=clock.on_step)
    n, elapsed = clock.timed(warmup)
    per_device_batch = global_batch // env.world_size
    rates = _rates(model, config, parts, seq * per_device_batch, per_device_batch, n, elapsed)
    peak, device_name = clock.peak_memory()
    return {
        "preset": preset, "stage": stage, "device": device_name, "world_size": env.world_size,
        "precision": "bf16 autocast" if trainer.autocast_dtype is not None else "fp32",
        "grad_checkpointing": grad_checkpointing, "parameters": model.parameter_counts(),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "micro_batch": micro_batch, "global_batch": global_batch, "sequence_tokens": seq,
        "visual_tokens": config.num_visual_tokens, "text_tokens": text_tokens,
        "steps": steps, "warmup_steps": warmup, "timed_steps": n, "timed_s": round(elapsed, 6),
        "step_s": round(elapsed / n, 6),
        "tokens_per_s": round(rates["tokens_per_s"], 2),
        "text_tokens_per_s": round(text_tokens * per_device_batch * n / elapsed, 2),
        "model_tflops_per_s": round(rates["tflops"], 2), "peak_memory_bytes": peak,
        "final_loss": summary.get("final_loss"),
        "torch": torch.__version__,
    }


def _bench_config(preset: str, stage: str, steps: int, warmup: int, text_tokens: int,
                  overrides: dict[str, Any] | None) -> tuple[ModelConfig, int]:
    """The preset's config (no pretrained weights) and the sequence length, checked before any model is
    built: a wrong stage, too few steps or a sample longer than the context is one line, not a crash later."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; train-bench measures one of: {', '.join(STAGES)}")
    if steps <= max(warmup, 1):
        raise UserError(f"--steps ({steps}) must be larger than --warmup ({warmup}) and than 1")
    config = ModelConfig.from_preset(preset, **(overrides or {}))
    config = config.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
    seq = 1 + config.num_visual_tokens + text_tokens
    if seq > config.llm.max_position_embeddings:
        raise UserError(f"{seq} tokens per sample ({config.num_visual_tokens} visual + {text_tokens} text + BOS) "
                        f"exceed {preset}'s context of {config.llm.max_position_embeddings}; lower --text-tokens")
    return config, seq


def _random_model(config: ModelConfig, stage: str, device: torch.device) -> tuple[MobileVLM, dict[str, bool]]:
    """The model with random weights, frozen as ``stage`` freezes it (the rate depends on what trains)."""
    torch.manual_seed(0)
    with torch.device(device):  # build on the GPU directly: a 1.7B model's random init on CPU takes minutes
        model = MobileVLM(config, load_weights=False)
    parts = trainable_parts(get_stage(stage))
    model.set_trainable(**parts)
    return model, parts


class _StepClock:
    """The end time of every optimizer step and the peak memory since it was made. On GPU each step is
    synchronized first, or the time would be when the kernels were queued, not when they finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()

    def on_step(self, step: int, _metrics: dict) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def timed(self, warmup: int) -> tuple[int, float]:
        """(steps, seconds) after the warm-up: timing starts at the end of the last warm-up step (or of the
        first step), so allocator growth and kernel autotuning stay out of the rate."""
        first = max(warmup, 1)
        timed = self.times[first:]
        return len(timed), timed[-1] - self.times[first - 1]

    def peak_memory(self) -> tuple[int, str]:
        """(peak bytes, device name): CUDA's allocator peak on GPU, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), torch.cuda.get_device_name(self.device)
        return int(peak_rss_bytes()), f"CPU ({torch.get_num_threads()} threads)"


def _rates(model, config, parts: dict[str, bool], tokens_per_step: int, images_per_step: int, n: int,
           elapsed: float) -> dict[str, float]:
    """Per-device tokens/s and the model TFLOP/s estimate (LLM tokens plus each image's tower and connector)."""
    tokens_per_s = tokens_per_step * n / elapsed
    images_per_s = images_per_step * n / elapsed
    llm_flops, image_flops = _flops_per_token(model, config, parts)
    return {"tokens_per_s": tokens_per_s, "tflops": (llm_flops * tokens_per_s + image_flops * images_per_s) / 1e12}


def print_report(r: dict[str, Any], console=None) -> None:
    console = console or Console()
    t = Table(title=f"train-bench: {r['stage']} on {r['preset']} ({r['device']}, {r['precision']})", show_header=False)
    rows = [
        ("trainable / total params", f"{r['trainable_parameters'] / 1e6:,.1f}M / {r['parameters']['total'] / 1e6:,.1f}M"),
        ("batch", f"{r['global_batch']} x {r['sequence_tokens']} tokens ({r['visual_tokens']} visual), "
                  f"micro-batch {r['micro_batch']}, world size {r['world_size']}"),
        ("timed", f"{r['timed_steps']} steps after {r['warmup_steps']} warm-up, {r['step_s'] * 1000:.1f} ms/step"),
        ("tokens/s per device", f"{r['tokens_per_s']:,.0f} (text only {r['text_tokens_per_s']:,.0f})"),
        ("model TFLOP/s (est.)", f"{r['model_tflops_per_s']:.2f}"),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("final loss", "-" if r["final_loss"] is None or not math.isfinite(r["final_loss"]) else f"{r['final_loss']:.3f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def write_json(r: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(r, indent=2) + "\n")
    tmp.replace(path)
