"""Vision towers: our VisionConfig from a transformers config, a tower folder, or (OpenAI CLIP) the weights alone."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mobilemllm.config import VisionConfig
from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.configs import preprocessing
from mobilemllm.models.importers.files import read_weights
from mobilemllm.models.importers.keys import map_keys
from mobilemllm.models.importers.plan import TOWER_IGNORED, V
from mobilemllm.models.vision import hf_vision_config, vision_config_from_hf


def vision_from_hf(hf_cfg, where: str, errors: list[str], **extra):
    """Our VisionConfig from a transformers CLIP/SigLIP vision config, refusing what we cannot rebuild."""
    name = type(hf_cfg).__name__.lower()
    if "clip" not in name and "siglip" not in name:
        errors.append(f"{where}: vision model {type(hf_cfg).__name__} is not supported (CLIP or SigLIP only)")
        return None
    vcfg = vision_config_from_hf(hf_cfg, **extra)
    ours = hf_vision_config(vcfg)
    for attr in ("hidden_act", "layer_norm_eps", "num_channels"):
        theirs, mine = getattr(hf_cfg, attr, None), getattr(ours, attr, None)
        if theirs is not None and theirs != mine:
            errors.append(f"{where}: vision {attr} {theirs!r} is not supported (our {vcfg.kind} tower uses {mine!r})")
    return vcfg


# OpenAI CLIP ViT width -> head count (64-dim heads in all): ViT-B/16 and B/32 (768), ViT-L/14 and L/14-336 (1024).
OPENAI_CLIP_HEADS = {768: 12, 1024: 16}


def vision_from_weights(state: dict[str, torch.Tensor], where: str, tower_name: str = "", **extra):
    """Infer an OpenAI CLIP tower's config from its weights (``vision.model.*`` keys).

    Shapes give everything but the head count, which is known only for the published OpenAI CLIP widths; any
    other width is refused rather than guessed (a wrong head count computes different features silently).
    """
    needed = [V + "embeddings.patch_embedding.weight", V + "embeddings.position_embedding.weight",
              V + "encoder.layers.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{where}: the vision tower weights are incomplete (no "
                              f"{', '.join(a[len(V):] for a in absent)}); pass --vision-tower CLIP_FOLDER")
    hidden, channels, patch, _ = state[needed[0]].shape
    positions = state[needed[1]].shape[0] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise CheckpointError(f"{where}: the vision tower has {positions} patch positions, not a square grid")
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(V) + r"encoder\.layers\.(\d+)\.", k))}
    if hidden not in OPENAI_CLIP_HEADS:
        folder = f"put the tower's folder at {tower_name!r} (the path mm_vision_tower names; its config.json is read " \
                 "and the checkpoint's weights kept) or " if tower_name else ""
        raise CheckpointError(
            f"{where}: the embedded vision tower is {hidden} wide, which matches no OpenAI CLIP "
            f"({' or '.join(map(str, OPENAI_CLIP_HEADS))}), so its head count cannot be known from the weights; "
            f"{folder}pass --vision-tower TOWER_FOLDER (its config.json and weights are used)")
    return VisionConfig(kind="clip", image_size=grid * patch, patch_size=patch, hidden_size=hidden,
                        num_layers=len(layers), num_heads=OPENAI_CLIP_HEADS[hidden],
                        intermediate_size=state[needed[2]].shape[0], **extra)


def tower_folder_config(folder: Path, errors: list[str], **extra):
    """Our VisionConfig from a tower folder's ``config.json`` (heads, layers, sizes, LayerNorm eps, activation) and
    ``preprocessor_config.json`` (mean/std), as upstream's ``CLIPVisionConfig.from_pretrained(mm_vision_tower)``."""
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise CheckpointError(f"vision tower folder {folder} has no config.json; download the tower "
                              "(e.g. `hf download openai/clip-vit-large-patch14-336 --local-dir clip`) and pass it")
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read the vision tower config in {folder}: {e}") from None
    hf_cfg = getattr(hf_cfg, "vision_config", hf_cfg)
    extra = {**preprocessing([folder]), **extra}
    return vision_from_hf(hf_cfg, str(folder / "config.json"), errors, **extra)


def load_tower_folder(folder: Path, errors: list[str], **extra):
    """(VisionConfig, our-keyed state, origin) from a local CLIP/SigLIP folder (vision-only or whole model)."""
    vcfg = tower_folder_config(folder, errors, **extra)
    if vcfg is None:
        return None, {}, {}, []
    rules = [("vision_model.", V), ("", V)]
    state, origin, unexpected = map_keys(read_weights(folder), rules, str(folder), ignore=TOWER_IGNORED)
    return vcfg, state, {k: f"{folder.name}:{v}" for k, v in origin.items()}, unexpected


def is_openai_clip(name: str) -> bool:
    """``openai/clip-vit-...`` hub ids, or a local copy keeping the hub folder name."""
    return name.startswith("openai/") or "/openai/" in name or Path(name).name.startswith("clip-vit-")
