"""Connectors (projectors) from vision features to LLM embeddings, registered by name.

Parameter layouts follow the published checkpoints so imports are a key rename:
- ``mlp2x_gelu`` (LLaVA-1.5): Linear, GELU, Linear.
- ``ldp`` (MobileVLM v1 "ldpnet"): MLP, then two MobileNetV3 inverted residual blocks (depthwise 3x3
  conv, LayerNorm, Hardswish, squeeze-excitation, 1x1 projection), the second with stride 2.
- ``ldpv2`` (MobileVLM v2 "ldpnetv2"): MLP, 2x2 average pooling over the patch grid, then a PEG
  (depthwise 3x3 conv with a residual).
- ``patch_merger`` (Qwen2-VL's merger): LayerNorm, each ``pool`` x ``pool`` block of neighbouring patches
  concatenated (space-to-depth), then an MLP. Unlike average pooling it keeps the layout *inside* the
  block, which is what tells shapes apart in the tiny model's 8-pixel patches.
- ``resampler``: learnable queries with cross-attention over the patch features (Q-Former-style).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mobilemllm.config import CONNECTOR_TOKENS, square_grid
from mobilemllm.errors import ConfigError


class MLP2xGelu(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (timm's LayerNormAct2d without act)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, act: bool):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            LayerNorm2d(cout, eps=1e-5),
        ]
        if act:
            layers.append(nn.Hardswish())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expansion 1: depthwise conv, SE, 1x1 projection (residual at stride 1)."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res = stride == 1
        self.block = nn.Sequential(
            _ConvNormAct(channels, channels, 3, stride, channels, act=True),
            SqueezeExcitation(channels, _make_divisible(channels // 4)),
            _ConvNormAct(channels, channels, 1, 1, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class LDP(nn.Module):
    """MobileVLM v1 Lightweight Downsample Projector: N patch tokens -> N/4 tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(out_dim, 1), InvertedResidual(out_dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = square_grid(n)
        x = self.mlp(x).transpose(1, 2).reshape(b, -1, h, h)
        x = self.mb_block(x)
        return x.flatten(2).transpose(1, 2)


class _FeatureMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = MLP2xGelu(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _PEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        return self.peg(x) + x


class LDPv2(nn.Module):
    """MobileVLM v2 projector: MLP, 2x2 average pooling, positional-encoding generator."""

    def __init__(self, in_dim: int, out_dim: int, pool: int = 2):
        super().__init__()
        self.mlp = _FeatureMLP(in_dim, out_dim)
        self.peg = _PEG(out_dim)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = square_grid(n)
        x = self.mlp(x).transpose(1, 2).reshape(b, -1, h, h)
        x = F.avg_pool2d(x, self.pool)
        x = self.peg(x)
        return x.flatten(2).transpose(1, 2)


def space_to_depth(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, N, D) patch features on a square grid -> (B, N / window^2, D * window^2): each window x window
    block's features concatenated (row-major inside the block), blocks in row-major order. Tensors stay at
    rank 4 or less (Core ML and QNN limit ranks)."""
    b, n, d = x.shape
    g = square_grid(n)
    h = g // window
    x = x.reshape(b * h, window, h, window * d)  # (block row, row in block, block column, (column in block, D))
    return x.permute(0, 2, 1, 3).reshape(b, h * h, window * window * d)


class PatchMerger(nn.Module):
    """Qwen2-VL-style merger: LayerNorm, concatenate each window x window block of patches, MLP."""

    def __init__(self, in_dim: int, out_dim: int, window: int = 2):
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(in_dim)
        merged = in_dim * window * window
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(space_to_depth(self.norm(x), self.window))


class Resampler(nn.Module):
    """A fixed set of learnable queries cross-attending to the patch features (token compression)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 64, num_heads: int = 8):
        super().__init__()
        if out_dim % num_heads:
            raise ConfigError(f"resampler: LLM hidden size {out_dim} is not divisible by num_heads {num_heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim)
        self.norm_q = nn.LayerNorm(out_dim)
        self.norm_kv = nn.LayerNorm(out_dim)
        self.attn = nn.MultiheadAttention(out_dim, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(out_dim)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(self.kv_proj(x))
        q = self.norm_q(self.queries).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.proj(self.norm_out(out + q))


def _build_mlp(cfg, in_dim: int, out_dim: int) -> nn.Module:
    return MLP2xGelu(in_dim, out_dim)


def _build_ldp(cfg, in_dim: int, out_dim: int) -> nn.Module:
    return LDP(in_dim, out_dim)


def _build_ldpv2(cfg, in_dim: int, out_dim: int) -> nn.Module:
    return LDPv2(in_dim, out_dim, cfg.pool)


def _build_patch_merger(cfg, in_dim: int, out_dim: int) -> nn.Module:
    return PatchMerger(in_dim, out_dim, cfg.pool)


def _build_resampler(cfg, in_dim: int, out_dim: int) -> nn.Module:
    return Resampler(in_dim, out_dim, cfg.num_queries, cfg.num_heads)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp2x_gelu": _build_mlp,
    "ldp": _build_ldp,
    "ldpv2": _build_ldpv2,
    "patch_merger": _build_patch_merger,
    "resampler": _build_resampler,
}
if set(_BUILDERS) != set(CONNECTOR_TOKENS):  # a connector is added in both places or in neither
    raise ImportError(f"connector modules {sorted(_BUILDERS)} do not match config.CONNECTOR_TOKENS "
                      f"{sorted(CONNECTOR_TOKENS)}")

# name -> (builder, function from patch count to output token count): the registry, checked at import
# against the names (and token arithmetic) in mobilemllm.config.CONNECTOR_TOKENS.
CONNECTORS: dict[str, tuple[Callable[..., nn.Module], Callable[[object, int], int]]] = {
    name: (_BUILDERS[name], CONNECTOR_TOKENS[name]) for name in CONNECTOR_TOKENS
}


def _entry(kind: str):
    if kind not in CONNECTORS:
        raise ConfigError(f"unknown connector {kind!r}; valid connectors: {', '.join(sorted(CONNECTORS))}")
    return CONNECTORS[kind]


class OutputNorm(nn.Module):
    """A connector followed by a LayerNorm on its tokens (``ConnectorConfig.output_norm``)."""

    def __init__(self, inner: nn.Module, out_dim: int, gain: float):
        super().__init__()
        self.inner = inner
        self.norm = nn.LayerNorm(out_dim)
        nn.init.constant_(self.norm.weight, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(x))


def build_connector(cfg, in_dim: int, out_dim: int) -> nn.Module:
    """Build the connector named by ``cfg.kind`` (a ConnectorConfig), with its output norm if asked."""
    module = _entry(cfg.kind)[0](cfg, in_dim, out_dim)
    if getattr(cfg, "output_norm", False):
        module = OutputNorm(module, out_dim, cfg.output_norm_gain)
    return module


def output_tokens(cfg, num_patches: int) -> int:
    """How many LLM tokens the connector makes from ``num_patches`` patch features."""
    return _entry(cfg.kind)[1](cfg, num_patches)
