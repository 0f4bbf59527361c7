"""The vision tower: a transformers CLIP or SigLIP vision model that returns patch features.

Features come from a selectable hidden layer (default -2, as LLaVA and MobileVLM do), patch tokens
only (CLIP's CLS token is dropped). For high resolution, ``hires="tiles"`` feeds every tile and a
global view through the encoder (see ``mobilemllm.data.images``); the connector then runs per view.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from mobilemllm.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VisionConfig
from mobilemllm.errors import CheckpointError


def hf_vision_config(cfg: VisionConfig):
    """The transformers config object for a VisionConfig."""
    common = dict(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
    )
    if cfg.kind == "clip":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**common, hidden_act="quick_gelu")
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**common, vision_use_head=False)


def vision_config_from_hf(hf_cfg, **extra) -> VisionConfig:
    """A VisionConfig that matches a transformers CLIP/SigLIP vision config."""
    kind = "siglip" if "siglip" in type(hf_cfg).__name__.lower() else "clip"

    values = dict(
        kind=kind,
        image_size=hf_cfg.image_size,
        patch_size=hf_cfg.patch_size,
        hidden_size=hf_cfg.hidden_size,
        num_layers=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        intermediate_size=hf_cfg.intermediate_size,
        image_mean=CLIP_MEAN if kind == "clip" else SIGLIP_MEAN,
        image_std=CLIP_STD if kind == "clip" else SIGLIP_STD,
    )
    values.update(extra)
    return VisionConfig(**values)


def load_hf_vision_model(path: str | Path) -> nn.Module:
    """Load the vision model from a local CLIP/SigLIP folder (full model or vision-only), no network."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"vision tower folder {path} has no config.json; point at a local CLIP/SigLIP folder")
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    vision_cfg = getattr(hf_cfg, "vision_config", hf_cfg)
    klass = SiglipVisionModel if "siglip" in type(vision_cfg).__name__.lower() else CLIPVisionModel
    return klass.from_pretrained(path, local_files_only=True)


class VisionTower(nn.Module):
    """Images (B, 3, H, W), normalised -> patch features (B, num_patches, hidden)."""

    def __init__(self, cfg: VisionConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        if cfg.pretrained_path and load_weights:
            self.model = load_hf_vision_model(cfg.pretrained_path)
        else:
            from transformers import CLIPVisionModel, SiglipVisionModel

            klass = CLIPVisionModel if cfg.kind == "clip" else SiglipVisionModel
            self.model = klass(hf_vision_config(cfg))
        self.model.config._attn_implementation = "sdpa"

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @contextlib.contextmanager
    def attention(self, implementation: str):
        """Run the tower with transformers' ``implementation`` of attention ("eager", "sdpa") inside the block.

        Why: exported, SDPA decomposes into a "safe" softmax (eq / any / logical_not / where around softmax, for
        fully masked rows a vision tower never has) that XNNPACK does not delegate; on CLIP ViT-L/336 those
        ops were half of the ExecuTorch image encode. "eager" (matmul, softmax, matmul) is the same math."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = implementation
        try:
            yield self
        finally:
            config._attn_implementation = before

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.cfg.select_layer]
        if self.cfg.kind == "clip":
            feats = feats[:, 1:]  # drop CLS
        return feats
