"""One training loop for a CPU, one GPU, and many GPUs launched with ``torchrun`` (DDP, or FSDP2).

- The *global batch* is fixed by the recipe; each step every process takes its share of the step's
  samples and accumulates gradients over micro-batches. Losses are normalised by the global number
  of loss units (tokens or pairs), so 1 process x 4 micro-batches and 2 processes x 2 give the same
  update (up to float summation order).
- The data order is a pure function of (seed, epoch), so the *data position* is just the step.
  ``group_by_length`` (after transformers' option of that name) sorts each run of 64 global batches of the
  shuffled order into coarse length buckets (a factor of 4 apart; the shuffled order is kept inside a
  bucket) and shuffles the batches, so one-line questions are not padded to a conversation's length;
  ``micro_batch_tokens`` cuts each global batch, longest first, into micro-batches of a bounded padded size.
- A *curriculum* (``curriculum_steps`` and the samples it draws from, e.g. the short questions of a stage
  whose data also holds captions) makes the first steps use only those samples, in their own seeded
  order; the later steps then go through the whole data set as usual. Still a pure function of the step.
- AdamW, cosine schedule with linear warm-up, gradient clipping, bf16 autocast on GPU, optional
  gradient checkpointing.
- Resumable state (trainable weights, optimizer, scheduler, RNG, step) goes to ``run_dir/last/``
  every ``save_every`` steps, without pickle (safetensors + JSON, :mod:`mobilemllm.training.resume_state`),
  written aside and swapped in (:mod:`mobilemllm.atomic`). ``resume=True`` picks it up, so an interrupted
  run ends with the same weights as an uninterrupted one. A resumed run must have the same settings (all
  but the cosmetic ones in :data:`COSMETIC`); ``resume_changed=True`` continues with the new ones and
  records the change in the first metrics line after the resume and in the summary.
- A NaN/inf loss stops the run before the optimizer step with :class:`TrainingDiverged`, naming the
  step; the last good resumable state is kept.
- Metrics go to ``run_dir/metrics.jsonl`` (one JSON object per logged step, each written whole) and a
  progress bar (loss, lr, steps/s, tokens/s, CPU threads).
- On a CPU, inside :func:`~mobilemllm.training.threads.adaptive_threads` (the pipeline's ``num_threads:
  auto``) and without a fixed ``num_threads``, the loop re-measures the other processes' CPU use every few
  seconds and adapts torch's thread count (:class:`~mobilemllm.training.threads.ThreadTuner`).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from mobilemllm.atomic import OutputKind, abort_dir, atomic_dir, commit_dir, probe_dir
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.training.distributed import DistEnv, all_reduce_sum, barrier, dist_env, init_distributed, pick_device
from mobilemllm.training.resume_state import (append_line, has_state, log, plain, read_state, saved_step, trim_metrics,
                                              write_state)
from mobilemllm.training.threads import ThreadTuner, adaptive

STATE_DIR = "last"
STATE_KIND = OutputKind.json_marker("resumable training state", "step.json", "step", writer="training run")
METRICS_FILE = "metrics.jsonl"
PRECISIONS = ("auto", "fp32", "bf16")
# TrainConfig fields that do not change what a run computes: a resumed run may change them freely.
COSMETIC = frozenset({"log_every", "num_threads", "save_every", "grad_checkpointing"})


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 1


@dataclass
class TrainConfig:
    """Optimisation settings of one training run (a recipe stage section sets them)."""

    lr: float = 1e-3
    connector_lr: float | None = None  # a separate lr for the connector (MobileVLM v2 style)
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.95-0.98: faster to follow a changing gradient scale)
    global_batch: int = 64
    micro_batch: int = 16
    # when set, a global batch is cut, longest samples first, into micro-batches of at most micro_batch rows
    # whose padded size (rows x the longest row) stays within this many tokens: short questions go 64 at a
    # time, long captions fewer, and little is spent on padding (the same gradient: losses are normalised
    # over the global batch)
    micro_batch_tokens: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    warmup_ratio: float = 0.03
    # overrides warmup_ratio when set: a run with other max_steps then keeps the same first learning rates
    # (and, with the same data order, the same first steps)
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    seed: int = 0
    grad_checkpointing: bool = False
    fsdp: bool = False  # FSDP2 fully_shard over the decoder layers (multi-GPU runs under torchrun)
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    save_every: int = 0  # steps between resumable states (0: about 10 per run)
    log_every: int = 1
    num_threads: int | None = None  # CPU threads per process (None: leave torch's default)
    group_by_length: bool = False  # batch samples of similar length together (the dataset must have `lengths`)
    curriculum_steps: int = 0  # the first steps draw only from the trainer's `curriculum` samples

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(names))})")
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "train config") -> None:
        errors = []
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr}")
        if self.global_batch < 1 or self.micro_batch < 1:
            errors.append("global_batch and micro_batch must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            errors.append(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.max_steps is None and not self.epochs > 0:
            errors.append(f"epochs must be > 0, got {self.epochs}")
        if self.curriculum_steps < 0:
            errors.append(f"curriculum_steps must be >= 0, got {self.curriculum_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            errors.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.precision not in PRECISIONS:
            errors.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if errors:
            raise ConfigError(f"{where}: " + "; ".join(errors))


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The lr multiplier at ``step`` (0-based): linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing in every transformers sub-model (LLM, vision tower)."""
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: shard every decoder / encoder layer, then the root (for models that do not fit one GPU)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("DecoderLayer") or name.endswith("EncoderLayer"):
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model


def sample_lengths(dataset) -> list[int]:
    """Each sample's (approximate) length, from the dataset's ``lengths`` (ConcatDataset: its parts')."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [n for part in dataset.datasets for n in sample_lengths(part)]
    if not hasattr(dataset, "lengths"):
        raise ConfigError(f"group_by_length needs sample lengths, which a {type(dataset).__name__} does not "
                          "provide; set group_by_length=false for this stage")
    return list(dataset.lengths)


def sample_tokens(sample) -> int:
    """A sample's padded row length: its token ids (a preference pair: the longer answer, both rows pad to it)."""
    if isinstance(sample, (tuple, list)):
        return max(sample_tokens(s) for s in sample) * len(sample)
    return len(sample.input_ids)


# what a run saved before a setting existed ran with (so adding a setting does not block old resumes)
_DEFAULT_SETTINGS = {f.name: f.default for f in fields(TrainConfig)}


class Trainer:
    """Train ``model``'s trainable parameters on ``dataset`` with ``objective``.

    ``collate_fn(samples) -> batch dict``; ``objective`` has ``units(batch)`` and ``loss(model, batch)``
    (see :mod:`mobilemllm.training.losses`). ``run_dir`` receives ``metrics.jsonl`` and ``last/``.
    ``run_keys``: what else decides the result besides ``cfg`` (data files, template, ...); a resumed run
    compares them with the saved ones, as it does the config.
    """

    def __init__(self, model: nn.Module, objective, dataset, collate_fn: Callable, cfg: TrainConfig,
                 run_dir: str | Path, *, progress: bool = True, desc: str = "train",
                 param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 curriculum: Iterable[int] | None = None, run_keys: dict[str, Any] | None = None):
        self.cfg = cfg
        self.env: DistEnv = dist_env()
        self.device = pick_device(self.env)
        init_distributed(self.env, self.device)
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        self.adapt_threads = self.device.type == "cpu" and not cfg.num_threads and adaptive()
        self.model = model.to(self.device)
        self.objective = objective
        if hasattr(objective, "reference"):
            objective.reference.to(self.device)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.run_dir = Path(run_dir)
        self.progress = progress and self.env.is_main
        self.desc = desc
        self._param_groups = param_groups

        n = len(dataset)
        per_step = self.env.world_size * cfg.micro_batch
        if cfg.global_batch % per_step:
            raise ConfigError(
                f"global_batch {cfg.global_batch} is not a multiple of world_size x micro_batch = "
                f"{self.env.world_size} x {cfg.micro_batch}; change global_batch or micro_batch")
        self.accum = cfg.global_batch // per_step
        if n < cfg.global_batch:
            raise ConfigError(f"the data set has {n} samples, fewer than global_batch {cfg.global_batch}; "
                              "lower global_batch or add data")
        self.steps_per_epoch = n // cfg.global_batch
        if cfg.group_by_length:
            sample_lengths(dataset)  # fail now, not at the first step, if the data set cannot say
        self.curriculum = torch.as_tensor(sorted(set(curriculum or [])), dtype=torch.long)
        if cfg.curriculum_steps and len(self.curriculum) < cfg.global_batch:
            raise ConfigError(f"curriculum_steps={cfg.curriculum_steps} needs at least global_batch "
                              f"{cfg.global_batch} curriculum samples, got {len(self.curriculum)}")
        if len(self.curriculum) and not (0 <= int(self.curriculum[0]) and int(self.curriculum[-1]) < n):
            raise ConfigError(f"curriculum sample indices must lie in [0, {n})")
        self._orders: dict[tuple[str, int], torch.Tensor] = {}
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else int(round(cfg.warmup_ratio * self.total_steps)))
        self.save_every = cfg.save_every or max(1, self.total_steps // 10)
        self.autocast_dtype = torch.bfloat16 if (
            self.device.type == "cuda" and cfg.precision in ("auto", "bf16")) else None
        self.run_keys = {**(run_keys or {}), "samples": n, "curriculum_samples": len(self.curriculum)}
        self.resume_changes: dict[str, list] = {}

    # ---- data order ----------------------------------------------------------------------------
    GROUP_BATCHES = 64  # global batches sorted together by length when group_by_length is on

    def epoch_order(self, epoch: int, phase: str = "main") -> torch.Tensor:
        """The sample indices of ``epoch`` in the order they are used (a pure function of seed and epoch).

        ``phase="curriculum"``: an epoch over the curriculum samples only (its own seeded order)."""
        key = (phase, epoch)
        if key not in self._orders:
            pool = self.curriculum if phase == "curriculum" else torch.arange(len(self.dataset))
            salt = 7_919 if phase == "curriculum" else 0
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch + salt * 1_000_000_007)
            order = pool[torch.randperm(len(pool), generator=g)]
            if self.cfg.group_by_length:
                order = self._group(order, g)
            self._orders = {key: order}  # one epoch at a time is all the loop needs
        return self._orders[key]

    def _group(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        gb = self.cfg.global_batch
        n_batches = len(order) // gb
        lengths = torch.as_tensor(sample_lengths(self.dataset), dtype=torch.long)
        used = order[:n_batches * gb]
        chunks = []
        # Coarse buckets (lengths within a factor of 4 share one), shuffled order kept inside a bucket:
        # sorting by exact length would make batches of one question type each (each type has its
        # own length), and steps that each see one task learn none of them.
        buckets = torch.floor(torch.log2(lengths.clamp(min=1).double()) / 2).long()
        for i in range(0, len(used), gb * self.GROUP_BATCHES):
            chunk = used[i:i + gb * self.GROUP_BATCHES]
            chunks.append(chunk[torch.sort(buckets[chunk], descending=True, stable=True).indices])
        batches = torch.cat(chunks).view(n_batches, gb)
        return batches[torch.randperm(n_batches, generator=g)].flatten()

    def step_indices(self, step: int) -> list[int]:
        """The global batch of sample indices used at ``step`` (a pure function of seed and step)."""
        gb = self.cfg.global_batch
        c = self.cfg.curriculum_steps
        if step < c:
            epoch, k = divmod(step, len(self.curriculum) // gb)
            return self.epoch_order(epoch, "curriculum")[k * gb:(k + 1) * gb].tolist()
        epoch, k = divmod(step - c, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * gb:(k + 1) * gb].tolist()

    def epoch_at(self, steps_done: int) -> float:
        """Passes over the data the steps draw from: curriculum epochs during the curriculum, then epochs
        of the whole data set counted from the end of the curriculum."""
        c = self.cfg.curriculum_steps
        if steps_done <= c:
            return round(steps_done / (len(self.curriculum) // self.cfg.global_batch), 4)
        return round((steps_done - c) / self.steps_per_epoch, 4)

    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        mine = self.step_indices(step)[self.env.rank::self.env.world_size]
        samples = [self.dataset[j] for j in mine]
        out = []
        for part in self._split(samples):
            batch = self.collate_fn(part)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def _split(self, samples: list) -> list[list]:
        """A process's share of the global batch as micro-batches: ``micro_batch`` rows each in data order, or,
        with ``micro_batch_tokens``, longest first, each within that padded size."""
        mb, budget = self.cfg.micro_batch, self.cfg.micro_batch_tokens
        if budget is None:
            return [samples[i:i + mb] for i in range(0, len(samples), mb)]
        samples = sorted(samples, key=sample_tokens, reverse=True)
        parts: list[list] = []
        for s in samples:
            part = parts[-1] if parts else None
            # the part's first sample is its longest: rows x that length is the padded size
            if part is None or len(part) == mb or (len(part) + 1) * sample_tokens(part[0]) > budget:
                parts.append([s])
            else:
                part.append(s)
        return parts

    # ---- state ---------------------------------------------------------------------------------
    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if self.cfg.fsdp and self.env.distributed:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in full.items() if k in names}
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _optim_state(self) -> dict:
        if self.cfg.fsdp and self.env.distributed:
            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def settings(self) -> dict[str, Any]:
        """What decides this run's result: the config less :data:`COSMETIC`, and ``run_keys`` (as saved in JSON)."""
        return plain({**{k: v for k, v in asdict(self.cfg).items() if k not in COSMETIC}, **self.run_keys})

    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def save_state(self, step: int) -> None:
        """Write the resumable state after ``step`` completed steps (aside, then swapped in; main process)."""
        state = {"step": step, "model": self._trainable_state(self.model), "optimizer": self._optim_state(),
                 "scheduler": self.scheduler.state_dict(), "rng": self._rng_state(), "settings": self.settings(),
                 "config": asdict(self.cfg), "world_size": self.env.world_size, "extra": self.extra_state()}
        if self.env.is_main:
            tmp = atomic_dir(self.run_dir / STATE_DIR, STATE_KIND)
            try:
                write_state(tmp, step, state, self.total_steps)
                commit_dir(tmp, self.run_dir / STATE_DIR, STATE_KIND)
            except BaseException:
                abort_dir(tmp)
                raise
        barrier(self.env)

    def extra_state(self) -> dict[str, Any]:
        """What a subclass's loop carries between steps besides the weights and optimizer (PPO: its KL
        coefficient); saved in the resumable state, given back by :meth:`load_extra_state`."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _setting_changes(self, saved: dict[str, Any], allow: bool) -> dict[str, list]:
        """The settings that differ from the saved state's: ``{key: [old, new]}``; refused unless ``allow``."""
        new = self.settings()
        # a state saved before a setting existed ran with its default
        old = {**{k: v for k, v in _DEFAULT_SETTINGS.items() if k in new}, **(saved.get("settings") or {})}
        changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if changes and not allow:
            listed = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
            raise ConfigError(
                f"{self.run_dir / STATE_DIR} was saved by a run with other settings ({listed}); rerun with the "
                f"same settings, pass --resume-changed to continue from step {saved.get('step')} with the new ones, "
                "or --no-resume to start over")
        return changes

    def load_state(self, resume_changed: bool = False) -> int:
        """Load ``run_dir/last`` into the model, optimizer, scheduler and RNGs; returns its step. With
        ``resume_changed`` a state saved with other settings continues under this run's settings."""
        folder = self.run_dir / STATE_DIR
        changes: dict[str, list] = {}
        state = read_state(folder, lambda saved: changes.update(self._setting_changes(saved, resume_changed)))
        try:
            self._apply_state(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"the resumable state in {folder} does not fit this model ({type(e).__name__}: {e}); "
                            f"delete {folder} to start this stage over, or run with --no-resume") from None
        if changes:
            self._use_new_settings()
            log.warning(f"{self.desc}: resuming at step {state['step']} with changed settings: "
                        + ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items()))
        self.resume_changes = changes
        return int(state["step"])

    def _apply_state(self, state: dict[str, Any]) -> None:
        if self.cfg.fsdp and self.env.distributed:
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for name, value in state["model"].items():
                    params[name].copy_(value.to(params[name].device))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state.get("extra") or {})
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _use_new_settings(self) -> None:
        """--resume-changed: the optimizer's hyper-parameters and the lr schedule follow this run's settings
        (the loaded state brought the saved ones); moments, RNG and step stay as saved."""
        for group, fresh in zip(self.optimizer.param_groups, self._fresh_groups):
            group.update(fresh)
        sched = self.scheduler
        sched.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, lam in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---- the loop ------------------------------------------------------------------------------
    def _build_optimizer(self, model: nn.Module) -> None:
        groups = self._param_groups(model) if self._param_groups else [{"params": self.trainable_params()}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           betas=(0.9, self.cfg.adam_beta2),
                                           foreach=False if self.cfg.fsdp else None)
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        total, warm, floor = self.total_steps, self.warmup_steps, self.cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, total, warm, floor))
        # this run's hyper-parameters per group, which a state loaded with --resume-changed gives back
        self._fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def _wrap(self) -> nn.Module:
        """The model as the loop calls it: FSDP2-sharded, DDP-wrapped, or itself."""
        if self.cfg.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.env.distributed and self.cfg.fsdp:
            return apply_fsdp(self.model)
        if self.env.distributed:
            return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.model

    def _start(self, resume: bool, resume_changed: bool) -> int:
        """The step to start from: the saved state's (resume), or 0 after clearing an earlier run's log and state."""
        folder, metrics = self.run_dir / STATE_DIR, self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_main:
            probe_dir(folder, STATE_KIND)  # puts back a state folder a crash left aside mid-swap
        barrier(self.env)
        start = 0
        if resume and has_state(folder):
            start = self.load_state(resume_changed)
        elif self.env.is_main:
            metrics.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        if self.env.is_main:
            trim_metrics(metrics, start)
        barrier(self.env)
        return start

    def fit(self, resume: bool = True, on_step: Callable[[int, dict], None] | None = None,
            resume_changed: bool = False) -> dict[str, Any]:
        """Run to the last step; returns a summary (steps, final loss, tokens/s, wall time).

        ``resume``: continue from ``run_dir/last`` if it exists; ``resume_changed``: even when it was saved
        with other settings (which are then replaced by this run's, and listed in the summary)."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        wrapped = self._wrap()
        self._build_optimizer(self.model)
        start = self._start(resume, resume_changed)
        self.model.train()
        bar = _Bar(self.desc, self.total_steps, start) if self.progress else None
        tuner = ThreadTuner(env.world_size) if self.adapt_threads else None
        t_run, cpu0 = time.perf_counter(), time.process_time()
        tokens_total, last = 0, {}
        try:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                last, tokens = self._step(step, wrapped)
                dt = time.perf_counter() - t0
                tokens_total += tokens
                last.update({"tokens_per_s": tokens / dt, "steps_per_s": round(1 / dt, 4),
                             "elapsed_s": round(time.perf_counter() - t_run, 3)})
                if self.device.type == "cpu":
                    last["threads"] = torch.get_num_threads()
                if step == start and self.resume_changes:
                    last["resume_changes"] = self.resume_changes
                self._after_step(step, last, bar, on_step)
                if tuner is not None:
                    tuner.step()
        finally:
            if bar:
                bar.close()
        self.model.eval()
        elapsed = time.perf_counter() - t_run
        summary = {"steps": self.total_steps, "resumed_from": start, "final_loss": last.get("loss"),
                   "tokens_per_s": tokens_total / elapsed if elapsed > 0 else None, "train_s": round(elapsed, 2),
                   "cpu_s": round(time.process_time() - cpu0, 2), "world_size": env.world_size, "last_metrics": last}
        if self.resume_changes:
            summary["resume_changes"] = self.resume_changes
        return summary

    def _after_step(self, step: int, row: dict, bar, on_step) -> None:
        """Log, show, save and report step ``step``'s results."""
        if self.env.is_main and ((step + 1) % self.cfg.log_every == 0 or step + 1 == self.total_steps):
            append_line(self.run_dir / METRICS_FILE, row)
        if bar:
            bar.update(row)
        if (step + 1) % self.save_every == 0 and step + 1 < self.total_steps:
            self.save_state(step + 1)
        if on_step is not None:
            on_step(step + 1, row)

    def _step(self, step: int, wrapped: nn.Module) -> tuple[dict[str, Any], int]:
        """One optimizer step over the step's global batch: (its metrics row, tokens processed by all ranks)."""
        env = self.env
        batches = self._micro_batches(step)
        units = torch.tensor([float(sum(self.objective.units(b) for b in batches))], device=self.device)
        all_reduce_sum(units, env)
        n_units = max(units.item(), 1.0)
        loss_total = torch.zeros((), device=self.device)
        metric_totals: dict[str, torch.Tensor] = {}
        tokens = torch.tensor([float(sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                         else b["input_ids"].numel() for b in batches))], device=self.device)
        for k, batch in enumerate(batches):
            sync = not (env.distributed and not self.cfg.fsdp and k < len(batches) - 1)
            ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
            amp = torch.autocast(self.device.type, dtype=self.autocast_dtype) \
                if self.autocast_dtype else contextlib.nullcontext()
            with ctx:
                with amp:
                    loss_sum, msums = self.objective.loss(wrapped, batch)
                (loss_sum * (env.world_size / n_units)).backward()
            loss_total += loss_sum.detach().float()
            for key, v in msums.items():
                metric_totals[key] = metric_totals.get(key, 0) + v.detach().float()
        keys = sorted(metric_totals)
        packed = torch.stack([loss_total] + [metric_totals[k] for k in keys]).to(self.device)
        all_reduce_sum(packed, env)
        all_reduce_sum(tokens, env)
        loss = packed[0].item() / n_units
        if not math.isfinite(loss):
            self._diverged(step, loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), self.cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "epoch": self.epoch_at(step + 1), "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm)}
        row.update({k: packed[i + 1].item() / n_units for i, k in enumerate(keys)})
        return row, int(tokens.item())

    def _diverged(self, step: int, loss: float) -> None:
        where = self.run_dir / STATE_DIR
        done = saved_step(where)
        kept = f"the last good state (step {done}) is kept in {where}" if done is not None \
            else "no resumable state was saved yet"
        raise TrainingDiverged(
            f"{self.desc}: the loss became {loss} at step {step + 1}/{self.total_steps}; {kept}. "
            f"Lower the learning rate (now {self.cfg.lr:g}) or check the data, then rerun")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (gathered from every rank under FSDP: call on all ranks)."""
        if self.cfg.fsdp and self.env.distributed:
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def cleanup(self) -> None:
        """Remove the resumable state once the final checkpoint is written (metrics stay)."""
        if self.env.is_main:
            shutil.rmtree(self.run_dir / STATE_DIR, ignore_errors=True)


class _Bar:
    """A rich progress bar with loss, lr, steps/s (smoothed over the last steps), tokens/s and CPU threads."""

    def __init__(self, desc: str, total: int, start: int):
        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                          transient=False)
        self.p.start()
        self.task = self.p.add_task(desc, total=total, completed=start, info="")
        self.rate: float | None = None

    def update(self, m: dict) -> None:
        # an exponential average: fast enough to show a slowdown within a few steps, steady enough to read
        self.rate = m["steps_per_s"] if self.rate is None else 0.8 * self.rate + 0.2 * m["steps_per_s"]
        info = f"loss {m['loss']:.4f} lr {m['lr']:.2e} {self.rate:.2f} steps/s {m['tokens_per_s']:,.0f} tok/s"
        if "threads" in m:
            info += f" {m['threads']} thr"
        if "rewards/accuracies" in m:
            info += f" acc {m['rewards/accuracies']:.2f} margin {m['rewards/margins']:.3f}"
        self.p.update(self.task, completed=m["step"], info=info)

    def close(self) -> None:
        self.p.stop()
