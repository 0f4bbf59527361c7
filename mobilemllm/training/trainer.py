"""One training loop for a CPU, one GPU, and many GPUs launched with ``torchrun`` (DDP, or FSDP2).

- The *global batch* is fixed by the recipe; each step every process takes its share of the step's
  samples and accumulates gradients over micro-batches. Losses are normalised by the global number
  of loss units (tokens or pairs), so 1 process x 4 micro-batches and 2 processes x 2 give the same
  update (up to float summation order).
- The data order is a pure function of (seed, epoch), so the *data position* is just the step.
  ``group_by_length`` (after transformers' option of that name) sorts each run of 64 global batches of the
  shuffled order into coarse length buckets (a factor of 4 apart; the shuffled order is kept inside a
  bucket) and shuffles the batches, so one-line questions are not padded to a conversation's length.
- A *curriculum* (``curriculum_steps`` and the samples it draws from, e.g. the short questions of a stage
  whose data also holds captions) makes the first steps use only those samples, in their own seeded
  order; the later steps then go through the whole data set as usual. Still a pure function of the step.
- AdamW, cosine schedule with linear warm-up, gradient clipping, bf16 autocast on GPU, optional
  gradient checkpointing.
- Resumable state (trainable weights, optimizer, scheduler, RNG, step) goes to ``run_dir/last/``
  every ``save_every`` steps, written atomically (temp folder, then rename). ``resume=True`` picks it
  up, so an interrupted run ends with the same weights as an uninterrupted one.
- A NaN/inf loss stops the run before the optimizer step with :class:`TrainingDiverged`, naming the
  step; the last good resumable state is kept.
- Metrics go to ``run_dir/metrics.jsonl`` (one JSON object per logged step) and a progress bar.
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
from torch import nn

from mobilemllm.errors import ConfigError, UserError
from mobilemllm.atomic import atomic_dir, commit_dir
from mobilemllm.training.distributed import DistEnv, all_reduce_sum, barrier, dist_env, init_distributed, pick_device

STATE_DIR = "last"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""

    exit_code = 1


@dataclass
class TrainConfig:
    """Optimisation settings of one training run (a recipe stage section sets them)."""

    lr: float = 1e-3
    connector_lr: float | None = None  # a separate lr for the connector (MobileVLM v2 style)
    weight_decay: float = 0.0
    global_batch: int = 64
    micro_batch: int = 16
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    warmup_ratio: float = 0.03
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
        if self.max_steps is None and not self.epochs > 0:
            errors.append(f"epochs must be > 0, got {self.epochs}")
        if self.curriculum_steps < 0:
            errors.append(f"curriculum_steps must be >= 0, got {self.curriculum_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            errors.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
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
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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


class Trainer:
    """Train ``model``'s trainable parameters on ``dataset`` with ``objective``.

    ``collate_fn(samples) -> batch dict``; ``objective`` has ``units(batch)`` and ``loss(model, batch)``
    (see :mod:`mobilemllm.training.losses`). ``run_dir`` receives ``metrics.jsonl`` and ``last/``.
    """

    def __init__(self, model: nn.Module, objective, dataset, collate_fn: Callable, cfg: TrainConfig,
                 run_dir: str | Path, *, progress: bool = True, desc: str = "train",
                 param_groups: Callable[[nn.Module], list[dict]] | None = None,
                 curriculum: Iterable[int] | None = None):
        self.cfg = cfg
        self.env: DistEnv = dist_env()
        self.device = pick_device(self.env)
        init_distributed(self.env, self.device)
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
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
        self.warmup_steps = int(round(cfg.warmup_ratio * self.total_steps))
        self.save_every = cfg.save_every or max(1, self.total_steps // 10)
        self.autocast_dtype = torch.bfloat16 if (
            self.device.type == "cuda" and cfg.precision in ("auto", "bf16")) else None

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
        mb = self.cfg.micro_batch
        out = []
        for i in range(0, len(mine), mb):
            batch = self.collate_fn([self.dataset[j] for j in mine[i:i + mb]])
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    # ---- state ---------------------------------------------------------------------------------
    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {k: v for k, v in full.items() if k in names}
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _optim_state(self) -> dict:
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_state(self, step: int) -> None:
        """Write the resumable state after ``step`` completed steps (atomically, main process)."""
        state = {
            "step": step,
            "model": self._trainable_state(self.model),
            "optimizer": self._optim_state(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": asdict(self.cfg),
            "world_size": self.env.world_size,
        }
        if self.env.is_main:
            tmp = atomic_dir(self.run_dir / STATE_DIR)
            try:
                torch.save(state, tmp / STATE_FILE)
                (tmp / "step.json").write_text(json.dumps({"step": step, "total_steps": self.total_steps}))
                commit_dir(tmp, self.run_dir / STATE_DIR)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        barrier(self.env)

    def load_state(self) -> int:
        path = self.run_dir / STATE_DIR / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a corrupt file is a user-fixable problem: start over or delete it
            raise UserError(f"cannot read the resumable state {path} ({e}); delete {path.parent} or run with "
                            "--no-resume") from None
        if state.get("config", {}).get("global_batch") != self.cfg.global_batch:
            raise ConfigError(f"{path} was written with global_batch {state['config'].get('global_batch')}, "
                              f"this run uses {self.cfg.global_batch}; resume with the same recipe or use --no-resume")
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

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
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["step"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the last saved state by an interrupted run)."""
        path = self.run_dir / METRICS_FILE
        if not self.env.is_main or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))

    # ---- the loop ------------------------------------------------------------------------------
    def _build_optimizer(self, model: nn.Module) -> None:
        groups = self._param_groups(model) if self._param_groups else [{"params": self.trainable_params()}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           foreach=False if self.cfg.fsdp else None)
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        total, warm, floor = self.total_steps, self.warmup_steps, self.cfg.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, total, warm, floor))

    def fit(self, resume: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
        """Run to the last step; returns a summary (steps, final loss, tokens/s, wall time)."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        wrapped: nn.Module = self.model
        if env.distributed and cfg.fsdp:
            wrapped = apply_fsdp(self.model)
        elif env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._build_optimizer(self.model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume and (self.run_dir / STATE_DIR / STATE_FILE).exists():
            start = self.load_state()
        elif env.is_main:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / STATE_DIR, ignore_errors=True)
        self._truncate_metrics(start)
        barrier(env)

        self.model.train()
        bar = _Bar(self.desc, self.total_steps, start) if self.progress else None
        t_run = time.perf_counter()
        cpu0 = time.process_time()
        tokens_total, last = 0, {}
        try:
            for step in range(start, self.total_steps):
                t0 = time.perf_counter()
                batches = self._micro_batches(step)
                units = torch.tensor([float(sum(self.objective.units(b) for b in batches))], device=self.device)
                all_reduce_sum(units, env)
                n_units = max(units.item(), 1.0)
                loss_total = torch.zeros((), device=self.device)
                metric_totals: dict[str, torch.Tensor] = {}
                tokens = torch.tensor([float(sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                                 else b["input_ids"].numel() for b in batches))], device=self.device)
                for k, batch in enumerate(batches):
                    sync = not (env.distributed and not cfg.fsdp and k < len(batches) - 1)
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
                    where = self.run_dir / STATE_DIR
                    kept = f"the last good state (step {self._saved_step()}) is kept in {where}" \
                        if (where / STATE_FILE).exists() else "no resumable state was saved yet"
                    raise TrainingDiverged(
                        f"{self.desc}: the loss became {loss} at step {step + 1}/{self.total_steps}; {kept}. "
                        f"Lower the learning rate (now {cfg.lr:g}) or check the data, then rerun")
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params(), cfg.max_grad_norm)
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                tokens_total += int(tokens.item())
                last = {"step": step + 1, "epoch": self.epoch_at(step + 1), "loss": loss,
                        "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens.item() / dt,
                        "elapsed_s": round(time.perf_counter() - t_run, 3)}
                last.update({k: packed[i + 1].item() / n_units for i, k in enumerate(keys)})
                if env.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps):
                    with open(self.run_dir / METRICS_FILE, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if bar:
                    bar.update(last)
                if (step + 1) % self.save_every == 0 and step + 1 < self.total_steps:
                    self.save_state(step + 1)
                if on_step is not None:
                    on_step(step + 1, last)
        finally:
            if bar:
                bar.close()
        self.model.eval()
        elapsed = time.perf_counter() - t_run
        return {"steps": self.total_steps, "resumed_from": start, "final_loss": last.get("loss"),
                "tokens_per_s": tokens_total / elapsed if elapsed > 0 else None, "train_s": round(elapsed, 2),
                "cpu_s": round(time.process_time() - cpu0, 2),
                "world_size": env.world_size, "last_metrics": last}

    def _saved_step(self) -> int | None:
        try:
            return json.loads((self.run_dir / STATE_DIR / "step.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (gathered from every rank under FSDP: call on all ranks)."""
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def cleanup(self) -> None:
        """Remove the resumable state once the final checkpoint is written (metrics stay)."""
        if self.env.is_main:
            shutil.rmtree(self.run_dir / STATE_DIR, ignore_errors=True)


class _Bar:
    """A rich progress bar with loss, lr and tokens/s."""

    def __init__(self, desc: str, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                          transient=False)
        self.p.start()
        self.task = self.p.add_task(desc, total=total, completed=start, info="")

    def update(self, m: dict) -> None:
        info = f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['tokens_per_s']:,.0f} tok/s"
        if "rewards/accuracies" in m:
            info += f" acc {m['rewards/accuracies']:.2f} margin {m['rewards/margins']:.3f}"
        self.p.update(self.task, completed=m["step"], info=info)

    def close(self) -> None:
        self.p.stop()
