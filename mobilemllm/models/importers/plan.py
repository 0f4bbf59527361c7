"""Names shared by the importer's modules, and the plan one import fills: our config, our tensors and their
origins."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch


SOURCE_LAYOUTS = ("auto", "mobilevlm", "llava-hf", "llama")
# MobileVLM's mm_projector_type -> our connector kind
PROJECTORS = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu"}
IMPORT_INFO_NAME = "import.json"
TEMPLATE = "vicuna_v1"

# Buffers some older files carry that our modules recompute.
IGNORED = (re.compile(r"\.position_ids$"), re.compile(r"rotary_emb\.inv_freq$"))
# A CLIP/SigLIP folder may hold a whole CLIPModel: only its vision half is used.
TOWER_IGNORED = (re.compile(r"^(text_model|text_projection|visual_projection|logit_scale)"),
                 re.compile(r"^(vision_model\.)?head\."))

V = "vision.model."
MOBILEVLM_TOWER = "model.vision_tower.vision_tower."


@dataclass
class Plan:
    """What one import will write: our config, our tensors (by our names) and where each came from."""

    fmt: str
    name: str
    vision: Any = None  # VisionConfig
    connector: str = ""
    llm: Any = None  # LLMConfig
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # our key -> "source-file-key"
    notes: list[str] = field(default_factory=list)
    vision_source: str = ""
