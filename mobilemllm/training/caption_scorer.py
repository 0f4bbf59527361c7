"""Image-caption scorers for ``mobilemllm data filter`` (:mod:`mobilemllm.data.filter`): a pair's score is the
cosine similarity of its image and caption embeddings.

- a **foundations** folder of this project (the ``foundations`` stage's checkpoint: its vision tower, plus
  ``contrastive.safetensors`` with the small text tower and projections it was trained against);
- a **transformers CLIP or SigLIP folder** (``config.json`` with ``model_type`` clip/siglip, weights and the
  processor files), read offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from mobilemllm.data.images import preprocess
from mobilemllm.errors import UserError
from mobilemllm.models.checkpoint import load_checkpoint
from mobilemllm.training.foundations import CONTRASTIVE_NAME, ContrastiveModel, collate_pairs


class FoundationsScorer:
    """The foundations stage's vision tower and text tower
    (:class:`~mobilemllm.training.foundations.ContrastiveModel`)."""

    def __init__(self, folder: Path):
        vlm, self.tok = load_checkpoint(folder)
        if self.tok is None:
            raise UserError(f"{folder} has no tokenizer; the caption scorer needs the one it was trained with")
        with safe_open(str(folder / CONTRASTIVE_NAME), "pt") as f:
            features = (f.metadata() or {}).get("image_features", "quadrant_mean")
        self.config = vlm.config
        self.model = ContrastiveModel(vlm.vision, vlm.config.vision.hidden_size, len(self.tok),
                                      image_features=features, num_patches=vlm.config.vision.grid ** 2)
        missing = self.model.load_state_dict(load_file(str(folder / CONTRASTIVE_NAME)), strict=False)
        if missing.unexpected_keys or any(not k.startswith("vision.") for k in missing.missing_keys):
            raise UserError(f"{folder / CONTRASTIVE_NAME} does not fit the model in {folder}")
        self.model.eval()
        self.name = str(folder)

    @torch.no_grad()
    def __call__(self, images: list, texts: list[str]) -> torch.Tensor:
        ids = [t[:96] for t in self.tok(texts, add_special_tokens=False)["input_ids"]]
        pix = [preprocess(im, self.config.vision)[0] for im in images]
        b = collate_pairs(list(zip(pix, ids)), self.tok.pad_token_id or 0)
        img = self.model.image_embeds(b["pixel_values"])
        txt = F.normalize(self.model.text_proj(self.model.text(b["text_ids"], b["attention_mask"])), dim=-1)
        return (img * txt).sum(-1)


class TransformersScorer:
    """A local transformers CLIP/SigLIP folder (``AutoModel`` + ``AutoProcessor``, offline)."""

    def __init__(self, folder: Path):
        from transformers import AutoModel, AutoProcessor

        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        self.name = str(folder)

    @torch.no_grad()
    def __call__(self, images: list, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding="max_length",
                                truncation=True)
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(**{k: v for k, v in inputs.items() if k != "pixel_values"})
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def load_scorer(folder: str | Path) -> Callable[[list, list[str]], torch.Tensor]:
    """The scorer a folder holds: a foundations checkpoint (with ``contrastive.safetensors``) or a
    transformers CLIP/SigLIP folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"scorer folder {folder} does not exist; pass a foundations stage folder "
                        "(runs/tiny/foundations) or a local CLIP/SigLIP folder")
    if (folder / CONTRASTIVE_NAME).is_file():
        return FoundationsScorer(folder)
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in ("clip", "siglip", "siglip2"):
        return TransformersScorer(folder)
    raise UserError(f"{folder} holds no caption scorer: neither {CONTRASTIVE_NAME} (a foundations stage folder "
                    f"of this project) nor a transformers CLIP/SigLIP config.json (model_type {kind!r})")
