"""torchao quantization of export-ready modules, before ``torch.export`` (ExecuTorch programs).

The schemes (names, parts, bits, group sizes) are tabled in :mod:`mobilemllm.export.quantization` under
the ``torchao`` quantizer; this module applies them:

- linears (``text_decoder``, ``vision_encoder``): ``8da4w`` (int8 dynamic activations, int4 weights grouped
  by ``group_size``, 0 = per channel), ``8da8w`` (alias ``int8``), ``int8_weight`` (weight-only).
  Linears whose input width is not divisible by the group size fall back to per-channel int4 (8da4w),
  so no layer is silently left in fp32 -- the count of fallbacks is reported.
- embeddings (``token_embedding``): ``embedding8``, ``embedding4`` (weight-only, grouped).

The LM head counts as a decoder linear. XNNPACK runs all of these; ``portable`` runs them too, slowly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mobilemllm.errors import ConfigError
from mobilemllm import quantization as Q


def _granularity(group_size: int | None):
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if not group_size else PerGroup(group_size)


def quantize_linears(module: nn.Module, scheme: str, group_size: int | None = 32) -> dict[str, Any]:
    """Quantize every nn.Linear of ``module`` in place; returns what was done (for the manifest)."""
    if scheme == "fp32":
        return {"scheme": "fp32"}
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_

    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    info: dict[str, Any] = {"scheme": scheme, "linears": len(linears)}
    with torch.no_grad():
        if scheme == "8da4w":
            gs = group_size or 0
            fits = {n for n, m in linears if gs == 0 or m.in_features % gs == 0}
            quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                   weight_granularity=_granularity(gs)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in fits)
            rest = {n for n, _ in linears} - fits
            if rest:  # a width the group size does not divide: per-channel int4 instead
                quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                       weight_granularity=_granularity(0)),
                          filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in rest)
            info.update(group_size=gs, per_channel_fallback=len(rest))
        elif scheme in ("8da8w", "int8"):
            quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                   weight_granularity=_granularity(0)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
            info.update(scheme="8da8w", group_size=0)
        elif scheme == "int8_weight":
            quantize_(module, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=_granularity(0)),
                      filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
            info.update(group_size=0)
        else:
            raise ConfigError(f"unknown linear quantization scheme {scheme!r}; valid: "
                              f"{', '.join(Q.names('torchao', 'text_decoder'))}")
    return info


def quantize_embeddings(module: nn.Module, scheme: str, group_size: int | None = 32) -> dict[str, Any]:
    """Weight-only quantization of every nn.Embedding of ``module`` in place."""
    if scheme == "fp32":
        return {"scheme": "fp32"}
    if scheme not in Q.names("torchao", "token_embedding"):
        raise ConfigError(f"unknown embedding scheme {scheme!r}; valid: "
                          f"{', '.join(Q.names('torchao', 'token_embedding'))}")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_

    bits = 4 if scheme == "embedding4" else 8
    gs = group_size or 0
    embs = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if gs and any(m.embedding_dim % gs for m in embs):
        gs = 0
    with torch.no_grad():
        quantize_(module, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=_granularity(gs)),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return {"scheme": scheme, "group_size": gs}
