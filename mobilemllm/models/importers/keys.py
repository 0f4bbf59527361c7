"""Renaming source tensors to ours by prefix rules, and naming the ones that do not fit."""

from __future__ import annotations

import re

import torch

from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.plan import IGNORED, V


def map_keys(source: dict[str, torch.Tensor], rules: list[tuple[str, str]], origin_label: str,
             ignore: tuple[re.Pattern, ...] = (), drop: tuple[str, ...] = ()) -> tuple[dict, dict, list[str]]:
    """Rename ``source`` keys by the first matching (source_prefix, our_prefix) rule.

    Returns (our state, our key -> source key, unexpected source keys). Keys starting with a ``drop``
    prefix are deliberately left out; keys matching ``ignore`` are recomputed buffers.
    """
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key in sorted(source):
        if any(p.search(key) for p in IGNORED + ignore) or key.startswith(drop):
            continue
        for src_prefix, dst_prefix in rules:
            if key.startswith(src_prefix):
                ours = dst_prefix + key[len(src_prefix):]
                if ours.startswith(V + "vision_model."):  # transformers<5 CLIPVisionModel wrapper
                    ours = V + ours[len(V + "vision_model."):]
                if ours in state:
                    raise CheckpointError(f"{origin_label}: {key} and {origin[ours]} both map to {ours}; the folder "
                                          "mixes two key layouts")
                state[ours] = source[key]
                origin[ours] = key
                break
        else:
            unexpected.append(key)
    return state, origin, unexpected


def shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def source_name(ours: str, rules: list[tuple[str, str]]) -> str:
    """The name a missing tensor would have in the source (first matching rule)."""
    for src_prefix, dst_prefix in rules:
        if ours.startswith(dst_prefix):
            return src_prefix + ours[len(dst_prefix):]
    return ours



def check_unexpected(unexpected: list[str], where: str) -> None:
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} tensor(s) this importer does not know where to put: "
                              f"{shown(unexpected)}")
