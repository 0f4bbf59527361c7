"""The reward model of the ``rm`` stage: the policy's own VLM (vision tower, connector, LLM) with a scalar
head on the last token's hidden state, trained on preference pairs with the Bradley-Terry loss.

A reward-model folder is a plain checkpoint folder (``config.json``, ``model.safetensors``, tokenizer,
``training_state.json``) plus ``reward_head.safetensors``; :func:`load_reward_model` reads it back.
The ``ppo`` stage scores its rollouts with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mobilemllm.data.dataset import collate
from mobilemllm.errors import UserError
from mobilemllm.models.checkpoint import load_checkpoint

HEAD_NAME = "reward_head.safetensors"


def last_hidden(vlm, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None):
    """(logits, last hidden states) of the VLM in one pass: the heads (reward, value) read the hidden states."""
    if position_ids is None and attention_mask is not None:  # left-padded rollouts count from their first token
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    emb = vlm.embed(input_ids, pixel_values)
    out = vlm.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids,
                  output_hidden_states=True, use_cache=False)
    return out.logits, out.hidden_states[-1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token (right-padded rows: its EOS)."""
    n = attention_mask.shape[1]
    pos = torch.arange(n, device=attention_mask.device).expand_as(attention_mask)
    return (pos * attention_mask.long()).max(1).values


class RewardModel(nn.Module):
    """``vlm`` + a linear head: ``forward`` returns one scalar score per row, read at its last token."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.config = vlm.config
        self.head = nn.Linear(vlm.config.llm.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (vlm.config.llm.hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def set_trainable(self, **parts: bool) -> None:
        """Parts of the VLM as :meth:`MobileVLM.set_trainable`; the head always trains."""
        self.vlm.set_trainable(**parts)
        self.head.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _, hidden = last_hidden(self.vlm, input_ids, pixel_values, attention_mask)
        idx = last_token_index(attention_mask)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss ``-log sigmoid(r_chosen - r_rejected)`` (InstructGPT's reward-model loss)."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective:
    """Bradley-Terry on preference pairs. A batch is ``collate(chosen + rejected)`` like DPO's: rows [0, n)
    are the chosen answers, rows [n, 2n) the rejected ones."""

    name = "rm"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].shape[0] // 2
        scores = model(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"])
        c, r = scores[:n], scores[n:]
        metrics = {"rewards/chosen": c.detach().sum(), "rewards/rejected": r.detach().sum(),
                   "rewards/accuracies": (c > r).float().sum(), "rewards/margins": (c - r).detach().sum()}
        return bradley_terry_loss(c, r).sum(), metrics


# ------------------------------------------------------------------------------------------ files
def save_reward_head(model: RewardModel, folder: str | Path) -> None:
    """Write the head beside the VLM checkpoint (atomically: a temporary name, then renamed)."""
    folder = Path(folder)
    tmp = folder / (HEAD_NAME + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    tmp.replace(folder / HEAD_NAME)


def load_reward_model(folder: str | Path) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) from an ``rm`` stage folder."""
    folder = Path(folder)
    if not (folder / HEAD_NAME).is_file():
        raise UserError(f"{folder} is not a reward model (no {HEAD_NAME}); train one with "
                        "`mobilemllm train --stage rm`, or point ppo.reward_model at an rm stage folder")
    vlm, tok = load_checkpoint(folder)
    rm = RewardModel(vlm)
    try:
        rm.head.load_state_dict(load_file(str(folder / HEAD_NAME)))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{folder / HEAD_NAME} does not fit the model in {folder}: {e}") from None
    return rm.eval(), tok


@torch.no_grad()
def pair_accuracy(model: RewardModel, dataset, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out preference pairs: the share the reward model ranks right, and the mean margin."""
    model.eval()
    device = next(model.parameters()).device
    right, margin, n = 0, 0.0, 0
    for s in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(s, min(len(dataset), s + batch_size))]
        batch = collate([c for c, _ in items] + [r for _, r in items], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = model(batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"]).float()
        k = len(items)
        right += int((scores[:k] > scores[k:]).sum())
        margin += float((scores[:k] - scores[k:]).sum())
        n += k
    return {"n": n, "pair_accuracy": right / max(1, n), "mean_margin": margin / max(1, n)}
