"""An export-ready LLaMA decoder: the ``text_decoder`` method of the ExecuTorch program.

``ExportLlama(llm)`` shares the weights (the same ``nn.Parameter`` objects) of our transformers
``LlamaForCausalLM`` and computes the same function, written for ``torch.export`` + XNNPACK:

- ``forward(embeds (1, S, hidden) float, input_pos (1,) int64) -> logits (1, vocab)`` of the last position
  (the signature ExecuTorch's ``MultimodalRunner`` calls; S is dynamic for prefill, 1 for decode).
- The KV cache is a pair of buffers per layer, ``(1, max_context_len, kv_heads, head_dim)``, written in
  place by ExecuTorch's ``llama::update_cache`` and read by ``llama::custom_sdpa`` (causal, GQA-aware) --
  the custom ops of ExecuTorch's own llama/llava examples, which run ~4x faster than a graph of
  index_put/mask/expand ops after lowering.
- Everything stays in the ``(batch, seq, heads, head_dim)`` layout those ops use, so there are no KV-cache
  transposes to begin with (``RemoveRedundantTransposes`` still runs, for the ones quantization adds).

- ``kv_cache="int8"`` stores keys and values as int8 with a float scale and an int8 zero point per
  position and head (asymmetric, per token), written by the same ``llama::update_cache`` and read by
  ``llama::custom_quantized_sdpa``, which attends over the int8 cache without dequantizing it (the query
  is quantized per token too). A quarter of the cache's memory and of the bytes attention reads per
  decoded token; the logits move by the rounding (checked against eager with a tolerance, not exactly).

Quantization replaces this module's Linear weights (``quantize_`` swaps the parameter), never the
original model's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  (registers the ops)

from mobilemllm.export.modules import TokenEmbedding, VisionEncoder  # noqa: F401  (the other two methods)
from mobilemllm.quantization import KV_CACHE_DTYPES
from mobilemllm.runtime.executorch_runner import load_kernels


def _load_custom_ops() -> None:
    """Register llama::custom_sdpa / llama::update_cache / llama::custom_quantized_sdpa and the
    quantized_decomposed ops (eager kernels + export meta functions)."""
    load_kernels()  # llama::* ops, and the quantized .out variants the int8 KV cache's ops lower to


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 values, float32 scales and int8 zero points of ``x``, asymmetric per vector of the last dim."""
    scale, zero = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = torch.ops.quantized_decomposed.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
    return q, scale.to(torch.float32), zero.to(torch.int8)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm computed as transformers does (in fp32, then cast), sharing ``weight``."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _linear(src: nn.Linear) -> nn.Linear:
    lin = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, device="meta")
    lin.weight = src.weight
    if src.bias is not None:
        lin.bias = src.bias
    return lin


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (max_positions, head_dim) for transformers' default (non-interleaved, rotate_half) RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Block(nn.Module):
    def __init__(self, layer, cfg, max_context_len: int, kv_cache: str = "fp32"):
        super().__init__()
        self.kv_int8 = kv_cache == "int8"
        attn, mlp = layer.self_attn, layer.mlp
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(layer.input_layernorm.weight, cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        self.wq, self.wk, self.wv, self.wo = (_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj),
                                              _linear(attn.o_proj))
        self.w_gate, self.w_up, self.w_down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
        shape = (1, max_context_len, self.n_kv, self.head_dim)
        if self.kv_int8:
            qshape = (1, max_context_len, self.n_kv, 1)
            for name in ("k", "v"):
                self.register_buffer(f"{name}_cache", torch.zeros(shape, dtype=torch.int8), persistent=False)
                self.register_buffer(f"{name}_scales", torch.ones(qshape), persistent=False)
                self.register_buffer(f"{name}_zero_points", torch.zeros(qshape, dtype=torch.int8), persistent=False)
        else:
            self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, h: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = h.shape
        x = self.attn_norm(h)
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kv_int8:
            out = self._attend_int8(q, k, v, start)
        else:
            torch.ops.llama.update_cache(k, self.k_cache, start)
            torch.ops.llama.update_cache(v, self.v_cache, start)
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True)
        h = h + self.wo(out.reshape(bsz, seqlen, self.n_heads * self.head_dim))
        x = self.mlp_norm(h)
        return h + self.w_down(nn.functional.silu(self.w_gate(x)) * self.w_up(x))


    def _attend_int8(self, q, k, v, start: int) -> torch.Tensor:
        for name, x in (("k", k), ("v", v)):
            xq, scale, zero = quantize_per_token(x)
            torch.ops.llama.update_cache(xq, getattr(self, f"{name}_cache"), start)
            torch.ops.llama.update_cache(scale, getattr(self, f"{name}_scales"), start)
            torch.ops.llama.update_cache(zero, getattr(self, f"{name}_zero_points"), start)
        qq, q_scale, q_zero = quantize_per_token(q)
        return torch.ops.llama.custom_quantized_sdpa(
            qq, self.k_cache, self.v_cache, start, None, 0.0, True, None, q_zero, q_scale,
            self.k_zero_points, self.k_scales, self.v_zero_points, self.v_scales, False)


class ExportLlama(nn.Module):
    """text_decoder(embeds, input_pos) -> last-position logits, with a static KV cache in buffers."""

    def __init__(self, llm, cfg, max_context_len: int | None = None, kv_cache: str = "fp32"):
        super().__init__()
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache {kv_cache!r}; expected one of {KV_CACHE_DTYPES}")
        _load_custom_ops()
        self.cfg = cfg
        self.kv_cache = kv_cache
        self.max_context_len = int(max_context_len or cfg.max_position_embeddings)
        base = llm.model
        self.layers = nn.ModuleList(Block(layer, cfg, self.max_context_len, kv_cache) for layer in base.layers)
        self.norm = RMSNorm(base.norm.weight, cfg.rms_norm_eps)
        self.lm_head = _linear(llm.lm_head)
        cos, sin = rope_tables(cfg.head_dim, self.max_context_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()
            if layer.kv_int8:
                for name in ("k", "v"):
                    getattr(layer, f"{name}_scales").fill_(1.0)
                    getattr(layer, f"{name}_zero_points").zero_()

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        seqlen = embeds.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + seqlen <= self.max_context_len)
        cos = self.rope_cos.narrow(0, start, seqlen).view(1, seqlen, 1, -1)
        sin = self.rope_sin.narrow(0, start, seqlen).view(1, seqlen, 1, -1)
        h = embeds
        for layer in self.layers:
            h = layer(h, start, cos, sin)
        return self.lm_head(self.norm(h[:, -1, :]))
