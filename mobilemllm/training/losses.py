"""Training objectives: next-token loss on answers (pretrain, instruct) and DPO (alignment).

An objective has two methods the trainer calls:

- ``units(batch) -> int``: how many loss units the batch holds (labelled tokens for LM, pairs for DPO),
  counted before the forward pass so the trainer can normalise by the *global* batch exactly, whatever
  the number of processes and micro-batches (1 process x 4 micro-batches == 2 processes x 2).
- ``loss(model, batch) -> (loss_sum, metric_sums)``: the summed loss over those units and summed
  metrics (the trainer divides both by the global unit count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobilemllm.bundle.layout import IGNORE_INDEX


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask") if k in batch}


def labelled_nll(model, batch: dict[str, torch.Tensor], lean: bool = False) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T-1) of the batch's shifted labels; 0 where labels are ignored.

    ``lean`` (``model`` a :class:`~mobilemllm.models.vlm.MobileVLM`): the same numbers from a forward that runs
    the prompt text all rows share once and the LM head only where a label is read (see its ``forward``)."""
    if not lean:
        return token_nll(model(**_model_inputs(batch)).logits, batch["labels"])
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    logits = model(**_model_inputs(batch), share_prefix=True, logits_at=F.pad(keep, (0, 1))).logits
    nll = F.cross_entropy(logits.float(), target[keep], reduction="none")
    return torch.zeros(target.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T-1) of the shifted labels; 0 where labels are ignored."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp(min=0), reduction="none")
    return nll.view(target.shape) * (target != IGNORE_INDEX)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (B,) of each row's labelled tokens (the answer, with its EOS)."""
    return -token_nll(logits, labels).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) on summed answer log-probs.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), per pair. Returns (losses, chosen
    rewards, rejected rewards); a reward is beta * (pi - ref), detached (as trl logs them).
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class LMObjective:
    """Next-token cross-entropy on labelled tokens (answers; captions in pretraining).

    ``lean``: the model is a :class:`~mobilemllm.models.vlm.MobileVLM` and takes its leaner forward (the
    same loss; :func:`labelled_nll`)."""

    name = "lm"

    def __init__(self, lean: bool = False):
        self.lean = lean

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return labelled_nll(model, batch, self.lean).sum(), {}


class DPOObjective:
    """DPO against a frozen reference model. A batch is ``collate(chosen + rejected)``: rows [0, n) are
    the chosen answers and rows [n, 2n) the rejected ones, for the same prompts and images."""

    name = "dpo"

    def __init__(self, reference, beta: float = 0.1, rpo_alpha: float = 0.0, lean: bool = False):
        self.lean = lean  # both models are MobileVLMs: their leaner forward (the same numbers)
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.beta = beta
        self.rpo_alpha = rpo_alpha

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["input_ids"].shape[0] // 2
        nll = labelled_nll(model, batch, self.lean)
        logps = -nll.sum(-1)
        with torch.no_grad():
            ref = -labelled_nll(self.reference, batch, self.lean).sum(-1)
        losses, rc, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
        metrics = {
            "rewards/chosen": rc.sum(),
            "rewards/rejected": rr.sum(),
            "rewards/accuracies": (rc > rr).float().sum(),
            "rewards/margins": (rc - rr).sum(),
            "logps/chosen": logps[:n].detach().sum(),
            "logps/rejected": logps[n:].detach().sum(),
        }
        if self.rpo_alpha:
            # RPO (Pang et al. 2024; trl's rpo_alpha): plus the chosen answer's mean token NLL. DPO pushes
            # down the tokens where the rejected answer departs from the chosen one; in caption pairs those
            # are a sentence of the words every caption uses ("is in the"), which the captions then lose
            # elsewhere too. The NLL term keeps the chosen answer likely
            tokens = (batch["labels"][:n, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
            chosen_nll = nll[:n].sum(-1) / tokens
            losses = losses + self.rpo_alpha * chosen_nll
            metrics["nll/chosen"] = chosen_nll.detach().sum()
        return losses.sum(), metrics


OBJECTIVES = {"lm": LMObjective, "dpo": DPOObjective}
