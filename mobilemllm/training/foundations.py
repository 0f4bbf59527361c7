"""Foundations for a model that has no pretrained weights (the tiny default).

Real MLLMs start from a pre-aligned image encoder (CLIP/SigLIP) and a pretrained LLM. There is
nothing to download here, so the tiny recipe builds both, quickly, from the training data:

1. **Language-model pretraining** of the LLM on the data's text (``corpus.txt``, or the captions and
   answers of the LLaVA files), packed into fixed-length blocks.
2. **Contrastive (CLIP-style) pretraining** of the vision tower against a small text encoder on
   image-caption pairs (``pretrain.json``): symmetric InfoNCE with a learnable temperature. Image
   features are the tower's patch features averaged per quadrant of the patch grid (so *where* things
   are survives the pooling; ``image_features="quadrant_mean"``) or all patch features concatenated
   (``"patches"``: the layout inside each quadrant survives too, so the tower must encode shapes, not
   only colours: a linear probe reads the tiny tower's shape kind at 96 % instead of 64 %); the text
   encoder is a small transformer that is thrown away afterwards.

Both run through the same :class:`~mobilemllm.training.trainer.Trainer` as the other stages.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mobilemllm.data.dataset import Sample, check_image_name, collate, image_path, read_records, validate_conversation
from mobilemllm.data.images import load_image, preprocess
from mobilemllm.errors import DataError
from mobilemllm.training.losses import LMObjective
from mobilemllm.training.trainer import TrainConfig, Trainer


# ---------------------------------------------------------------------------- language modelling
class TextBlocks(torch.utils.data.Dataset):
    """Lines of text, each as ``<s> line </s>``, concatenated and cut into blocks of ``seq_len``."""

    def __init__(self, lines: list[str], tokenizer, seq_len: int = 128, seed: int = 0):
        lines = [ln.strip() for ln in lines if ln.strip()]
        if not lines:
            raise DataError("no text to pretrain the language model on")
        random.Random(seed).shuffle(lines)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        stream: list[int] = []
        enc = tokenizer(lines, add_special_tokens=False)["input_ids"]
        for ids in enc:
            stream += ([bos] if bos is not None else []) + ids + [eos]
        self.blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        if not self.blocks:
            raise DataError(f"the text is shorter than one block of {seq_len} tokens")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Sample:
        ids = self.blocks[i]
        return Sample(list(ids), list(ids), None)


def corpus_text(data_dir: Path) -> list[str]:
    """``corpus.txt`` if the data folder has one, else every caption/answer of its LLaVA files."""
    corpus = data_dir / "corpus.txt"
    if corpus.exists():
        return corpus.read_text(encoding="utf-8").splitlines()
    lines: list[str] = []
    for name in ("pretrain.json", "instruct.json"):
        if (data_dir / name).exists():
            for i, r in enumerate(read_records(data_dir / name)):
                for turn in validate_conversation(r, f"{data_dir / name}: record {i}"):
                    lines.extend(t.replace("<image>", "").strip() for t in turn)
    return lines


# --------------------------------------------------------------------------------- contrastive
class TextEncoder(nn.Module):
    """A small transformer over caption tokens, mean-pooled (CLIP's text tower, in miniature)."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = 96):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask.bool())
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ContrastiveModel(nn.Module):
    """Vision tower + quadrant pooling + projection, and a text encoder + projection."""

    def __init__(self, vision: nn.Module, vision_hidden: int, vocab_size: int, embed_dim: int = 128,
                 image_features: str = "quadrant_mean", num_patches: int = 4):
        super().__init__()
        self.vision = vision
        self.image_features = image_features
        width = (num_patches if image_features == "patches" else 4) * vision_hidden
        self.image_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self.text = TextEncoder(vocab_size)
        self.text_proj = nn.Linear(128, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vision(pixel_values)  # (B, P, D) patch features
        b, p, d = feats.shape
        if self.image_features == "patches":
            return F.normalize(self.image_proj(feats.reshape(b, p * d)), dim=-1)
        g = math.isqrt(p)
        grid = feats.view(b, g, g, d).permute(0, 3, 1, 2)
        quads = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(b, 4 * d)
        return F.normalize(self.image_proj(quads), dim=-1)

    def forward(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, attention_mask: torch.Tensor, **_):
        img = self.image_embeds(pixel_values)
        txt = F.normalize(self.text_proj(self.text(text_ids, attention_mask)), dim=-1)
        return self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()


class ContrastiveObjective:
    """Symmetric InfoNCE over the batch (the whole global batch must be one micro-batch)."""

    name = "contrastive"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["text_ids"].shape[0]

    def loss(self, model, batch: dict[str, torch.Tensor]):
        logits = model(**batch)
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        acc = (logits.argmax(-1) == target).float().sum()
        return loss * logits.shape[0], {"clip_acc": acc}


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs from a LLaVA caption file (``pretrain.json``)."""

    def __init__(self, path: Path, image_folder: Path | None, tokenizer, vision_cfg, max_len: int = 96,
                 allow_outside_images: bool = False):
        self.records = read_records(path)
        self.image_folder = image_folder or path.parent / "images"
        self.allow_outside_images = allow_outside_images
        self.texts = []
        for i, r in enumerate(self.records):
            turns = validate_conversation(r, f"{path}: record {i}")
            if "image" not in r:
                raise DataError(f"{path}: record {i} has no image; contrastive pretraining needs image-caption pairs")
            check_image_name(r["image"], f"{path}: record {i}", allow_outside=allow_outside_images)
            self.texts.append(turns[0][1])
        self.ids = [ids[:max_len] for ids in tokenizer(self.texts, add_special_tokens=False)["input_ids"]]
        self.vision_cfg = vision_cfg
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        if i not in self._cache:
            path = image_path(self.image_folder, self.records[i]["image"], f"record {i}",
                              allow_outside=self.allow_outside_images)
            self._cache[i] = preprocess(load_image(path), self.vision_cfg)[0]
        return self._cache[i], self.ids[i]


def collate_pairs(items, pad_id: int = 0) -> dict[str, torch.Tensor]:
    n = max(len(ids) for _, ids in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for r, (_, t) in enumerate(items):
        ids[r, : len(t)] = torch.tensor(t)
        mask[r, : len(t)] = 1
    return {"pixel_values": torch.stack([p for p, _ in items]), "text_ids": ids, "attention_mask": mask}


CONTRASTIVE_NAME = "contrastive.safetensors"


def save_contrastive(model, folder: str | Path) -> None:
    """The foundations stage's contrastive text tower and projections (the vision tower is in the checkpoint)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("vision.")}
    tmp = folder / (CONTRASTIVE_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"image_features": model.image_features})
    tmp.replace(folder / CONTRASTIVE_NAME)


# ------------------------------------------------------------------------------------- driver
def train_foundations(model, tokenizer, data_dir: str | Path, run_dir: str | Path, text_cfg: TrainConfig,
                      vision_cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
                      resume_changed: bool = False,
                      caption_file: str = "pretrain.json", image_folder: str | Path | None = None,
                      seq_len: int = 128, image_features: str = "quadrant_mean",
                      allow_outside_images: bool = False) -> dict[str, Any]:
    """Pretrain ``model.llm`` on the data's text, then ``model.vision`` contrastively. In place."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    summary: dict[str, Any] = {}

    model.set_trainable(vision=False, connector=False, llm=True)
    text = TextBlocks(corpus_text(data_dir), tokenizer, seq_len=seq_len, seed=text_cfg.seed)

    pad = tokenizer.pad_token_id
    t = Trainer(model, LMObjective(), text, lambda s: collate(s, pad), text_cfg, run_dir / "text",
                progress=progress, desc="foundations: text LM")
    summary["text"] = t.fit(resume=resume, resume_changed=resume_changed)

    model.set_trainable(vision=True, connector=False, llm=False)
    pairs = CaptionPairs(data_dir / caption_file, Path(image_folder) if image_folder else None, tokenizer,
                         model.config.vision, allow_outside_images=allow_outside_images)
    if vision_cfg.micro_batch != vision_cfg.global_batch:
        vision_cfg = TrainConfig(**{**vision_cfg.__dict__, "micro_batch": vision_cfg.global_batch})
    torch.manual_seed(vision_cfg.seed)
    clip = ContrastiveModel(model.vision, model.config.vision.hidden_size, len(tokenizer),
                            image_features=image_features, num_patches=model.config.vision.grid ** 2)
    t = Trainer(clip, ContrastiveObjective(), pairs, lambda s: collate_pairs(s, pad), vision_cfg,
                run_dir / "vision", progress=progress, desc="foundations: contrastive vision")
    summary["vision"] = t.fit(resume=resume, resume_changed=resume_changed)
    save_contrastive(clip, run_dir / "vision")  # the text tower too: `mobilemllm data filter` scores pairs with it
    model.set_trainable(vision=True, connector=True, llm=True)
    return summary
