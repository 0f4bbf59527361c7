"""The ``ppo`` stage: RLHF with PPO (Ziegler et al. 2019, InstructGPT) on a vision-language model.

Each training step is one PPO iteration over the step's global batch of prompts (image + question):

1. **Rollouts**: answers sampled from the policy, batched with one KV cache
   (:func:`mobilemllm.evaluation.generate.sample_batch`), from a generator seeded by (seed, step), so a
   resumed run draws the same answers.
2. **Rewards**: the reward model's score at the end of the answer (its EOS; an answer cut at
   ``max_new_tokens`` gets ``missing_eos_penalty`` added when set), minus ``kl_coef * (log pi - log ref)`` at
   every answer token against the frozen reference (the starting policy). ``kl_coef`` is fixed or adaptive
   (the proportional controller of Ziegler et al.: towards ``target_kl`` over ``kl_horizon`` samples).
3. **GAE** (``gamma``, ``lam``) on a value head over the policy's last hidden states; advantages whitened.
4. ``ppo_epochs`` passes over the rollouts in minibatches of ``micro_batch``: clipped policy loss
   (``clip_range``), clipped value loss (``clip_range_value``, weight ``vf_coef``), one optimizer step each.

Logged per step: ``reward`` (RM score), ``kl`` (per answer, summed over its tokens), ``kl_coef``,
``entropy``, ``clipfrac``, ``approx_kl``, ``pg_loss``, ``vf_loss``, ``answer_tokens``.

Why not trl: its ``PPOTrainer`` drives text-only causal LMs (``generate(input_ids)``, a reward model it
calls through ``backbone``/``score``) and cannot pass the images our VLM needs; its PPO pieces are the few
formulas written out here (``masked_whiten``, the adaptive KL controller), so they are not worth a
dependency. The :class:`PPOTrainer` reuses the project's trainer (optimizer, schedule, metrics, exact
resume); the KL coefficient travels in the resumable state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mobilemllm.data.dataset import check_image_name, image_path, read_records, validate_conversation
from mobilemllm.data.images import load_image, preprocess
from mobilemllm.errors import ConfigError, DataError
from mobilemllm.evaluation.generate import sample_batch
from mobilemllm.inference import prompt_ids
from mobilemllm.templates import IMAGE
from mobilemllm.training.reward import last_hidden
from mobilemllm.training.trainer import Trainer

VALUE_HEAD_NAME = "value_head.safetensors"


@dataclass
class PPOConfig:
    """The PPO options of a ``ppo`` recipe section (the optimisation ones are its TrainConfig)."""

    kl_coef: float = 0.05
    adaptive_kl: bool = True
    target_kl: float = 1.0  # per answer (summed over its tokens)
    kl_horizon: int = 1000
    ppo_epochs: int = 2
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    max_new_tokens: int = 64
    missing_eos_penalty: float | None = None
    whiten_advantages: bool = True


# ------------------------------------------------------------------------------------------ models
class PolicyWithValue(nn.Module):
    """The policy VLM plus a value head on its last hidden states (trl's ``...WithValueHead`` layout)."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.config = vlm.config
        self.value_head = nn.Linear(vlm.config.llm.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def set_trainable(self, **parts: bool) -> None:
        self.vlm.set_trainable(**parts)
        self.value_head.requires_grad_(True)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, **_: Any):
        """(logits, values) per position."""
        logits, hidden = last_hidden(self.vlm, input_ids, pixel_values, attention_mask)
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


class AdaptiveKL:
    """KL coefficient: fixed, or Ziegler et al.'s proportional controller (as trl's AdaptiveKLController)."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


# -------------------------------------------------------------------------------------- math pieces
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens (B, L); the value after the last token is 0.
    Returns (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < rewards.shape[1] else 0)) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
               adv: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
               clip_value: float) -> dict[str, torch.Tensor]:
    """The clipped surrogate policy loss and the clipped value loss (PPO, as in trl), token-averaged."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return {"pg_loss": masked_mean(pg, mask), "vf_loss": masked_mean(vf, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask)}


# ------------------------------------------------------------------------------------------- prompts
class PromptDataset(torch.utils.data.Dataset):
    """Rollout prompts: preference records (``image``, ``prompt``) or conversations (the first question)."""

    def __init__(self, path: str | Path, image_folder: str | Path | None, tokenizer, config, template=None,
                 allow_outside_images: bool = False):
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder else self.path.parent / "images"
        self.tok, self.config, self.template = tokenizer, config, template
        self.allow_outside_images = allow_outside_images
        self.items: list[tuple[str, str]] = []
        for i, rec in enumerate(read_records(self.path)):
            where = f"{self.path}: record {i}"
            if not isinstance(rec, dict):
                raise DataError(f"{where} is not an object")
            if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                question = rec["prompt"]
            else:
                question = validate_conversation(rec, where)[0][0].replace(IMAGE, "").strip()
            if "image" not in rec:
                raise DataError(f"{where} has no image; ppo rollouts are answers about an image")
            check_image_name(rec["image"], where, allow_outside=allow_outside_images)
            self.items.append((rec["image"], question))
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, question = self.items[i]
        if name not in self._cache:
            where = f"{self.path}: record {i}"
            path = image_path(self.image_folder, name, where, allow_outside=self.allow_outside_images)
            self._cache[name] = preprocess(load_image(path), self.config.vision)
        return {"prompt_ids": prompt_ids(self.config, self.tok, question, self.template),
                "pixel_values": self._cache[name]}


# ---------------------------------------------------------------------------------------- the stage
class PPOObjective:
    """Holds the frozen reference and reward model and runs one PPO iteration (:meth:`iteration`)."""

    name = "ppo"

    def __init__(self, reference: nn.Module, reward_model: nn.Module, cfg: PPOConfig, pad_id: int,
                 eos_ids: list[int]):
        self.reference = reference.eval()
        self.reward_model = reward_model.eval()
        for p in list(self.reference.parameters()) + list(self.reward_model.parameters()):
            p.requires_grad_(False)
        self.cfg = cfg
        self.pad_id, self.eos_ids = pad_id, list(eos_ids)
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)

    def units(self, batch) -> int:  # the trainer's generic step is not used by PPO
        return len(batch)

    # ---- rollouts -------------------------------------------------------------------------------
    def rollout(self, policy: PolicyWithValue, items: list[dict], generator: torch.Generator,
                device: torch.device) -> dict[str, torch.Tensor]:
        """Sample answers and lay prompt + answer out as [left pad | prompt | answer | right pad]."""
        prompts = [it["prompt_ids"] for it in items]
        pix = torch.stack([it["pixel_values"] for it in items])
        policy.eval()
        answers = sample_batch(policy.vlm, prompts, pix, pad_id=self.pad_id, eos_ids=self.eos_ids,
                               max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                               generator=generator)
        policy.train()
        p, length = max(len(x) for x in prompts), max(1, max(len(a) for a in answers))
        ids = torch.full((len(items), p + length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ans_mask = torch.zeros((len(items), length))
        eos_hit = torch.zeros(len(items), dtype=torch.bool)
        for r, (q, a) in enumerate(zip(prompts, answers)):
            ids[r, p - len(q):p] = torch.tensor(q)
            ids[r, p:p + len(a)] = torch.tensor(a, dtype=torch.long)
            mask[r, p - len(q):p + len(a)] = 1
            ans_mask[r, :len(a)] = 1
            eos_hit[r] = bool(a) and a[-1] in self.eos_ids
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device),
                "answer_mask": ans_mask.to(device), "eos": eos_hit.to(device), "prompt_len": torch.tensor(p)}

    def answer_stats(self, model, ro: dict[str, torch.Tensor], with_values: bool = True):
        """(log-probs, values, entropies) of the answer tokens (B, L) under ``model``."""
        p = int(ro["prompt_len"])
        if with_values:
            logits, values = model(ro["input_ids"], ro["pixel_values"], ro["attention_mask"])
        else:
            logits, _ = last_hidden(model, ro["input_ids"], ro["pixel_values"], ro["attention_mask"])
            values = None
        length = ro["answer_mask"].shape[1]
        logits = logits[:, p - 1:p - 1 + length].float()
        target = ro["input_ids"][:, p:p + length]
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        vals = values[:, p - 1:p - 1 + length].float() if values is not None else None
        return logp, vals, entropy

    @torch.no_grad()
    def score(self, ro: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward model's score of each prompt + answer (read at its last token)."""
        return self.reward_model(ro["input_ids"], ro["pixel_values"], ro["attention_mask"]).float()

    # ---- one iteration --------------------------------------------------------------------------
    def iteration(self, trainer: "PPOTrainer", step: int, items: list[dict]) -> tuple[dict[str, Any], int]:
        cfg, device, model = self.cfg, trainer.device, trainer.model
        seed = trainer.cfg.seed * 1_000_003 + step
        gen = torch.Generator(device=device).manual_seed(seed)
        ro = self.rollout(model, items, gen, device)
        m = ro["answer_mask"]
        with torch.no_grad():
            old_logp, old_values, _ = self.answer_stats(model, ro)
            ref_logp, _, _ = self.answer_stats(self.reference, ro, with_values=False)
            scores = self.score(ro)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ro["eos"]).float()
        kl = (old_logp - ref_logp) * m
        rewards = -self.kl.value * kl
        last = (m.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(items), device=device), last] += scores
        adv, returns = gae(rewards, old_values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, m)
        sums: dict[str, float] = {}
        n_updates = 0
        order_gen = torch.Generator().manual_seed(seed)
        mb = trainer.cfg.micro_batch
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(items), generator=order_gen).tolist()
            for s in range(0, len(items), mb):
                idx = torch.tensor(perm[s:s + mb], device=device)
                sub = {k: (v[idx] if k != "prompt_len" else v) for k, v in ro.items()}
                logp, values, entropy = self.answer_stats(model, sub)
                out = ppo_losses(logp, old_logp[idx], values, old_values[idx], adv[idx], returns[idx], m[idx],
                                 cfg.clip_range, cfg.clip_range_value)
                loss = out["pg_loss"] + cfg.vf_coef * out["vf_loss"]
                if not math.isfinite(loss.item()):
                    trainer._diverged(step, loss.item())
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainer.trainable_params(), trainer.cfg.max_grad_norm)
                trainer.optimizer.step()
                out["loss"] = loss
                out["entropy"] = masked_mean(entropy.detach(), m[idx])
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_updates += 1
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        mean_kl = float(kl.sum(1).mean())
        row = {"step": step + 1, "epoch": trainer.epoch_at(step + 1), "lr": lr, "kl_coef": self.kl.value,
               "reward": float(scores.mean()), "kl": mean_kl, "answer_tokens": float(m.sum(1).mean()),
               "eos_rate": float(ro["eos"].float().mean()),
               **{k: v / max(1, n_updates) for k, v in sums.items()}}
        self.kl.update(mean_kl, len(items))
        return row, int(ro["attention_mask"].sum())


class PPOTrainer(Trainer):
    """The project's trainer with a PPO iteration as its step (one process; the data order, optimizer,
    schedule, metrics and resumable state are the trainer's)."""

    def __init__(self, policy: PolicyWithValue, objective: PPOObjective, dataset, cfg, run_dir, **kwargs):
        super().__init__(policy, objective, dataset, lambda items: items, cfg, run_dir, **kwargs)
        if self.env.world_size > 1:
            raise ConfigError("ppo runs on one process for now; launch it without torchrun")
        if cfg.global_batch % cfg.micro_batch:
            raise ConfigError(f"ppo: global_batch {cfg.global_batch} (rollouts per step) must be a multiple of "
                              f"micro_batch {cfg.micro_batch} (the PPO minibatch)")
        objective.reward_model.to(self.device)

    def _step(self, step: int, wrapped: nn.Module) -> tuple[dict[str, Any], int]:
        items = [self.dataset[i] for i in self.step_indices(step)]
        return self.objective.iteration(self, step, items)

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.objective.kl.value}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        if "kl_coef" in extra:
            self.objective.kl.value = float(extra["kl_coef"])


def save_value_head(policy: PolicyWithValue, folder: str | Path) -> None:
    """The value head beside the policy checkpoint (not needed to run the policy; kept to continue PPO)."""
    folder = Path(folder)
    tmp = folder / (VALUE_HEAD_NAME + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.value_head.state_dict().items()}, str(tmp))
    tmp.replace(folder / VALUE_HEAD_NAME)
