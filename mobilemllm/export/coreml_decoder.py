"""An export-ready LLaMA decoder for Core ML: explicit key/value cache buffers updated by slicing.

transformers' static cache does not convert to Core ML (``index_copy`` / ``alias`` are unsupported),
so ``CoreMLDecoder(llm, max_context)`` recomputes our ``LlamaForCausalLM`` with the same weights (the
same ``nn.Linear`` modules and norm weights, not copies) in a form ``torch.export`` + coremltools
handle: one ``(1, kv_heads, max_context, head_dim)`` buffer per layer for keys and one for values,
written with ``cache[:, :, past:end] = k``. coremltools turns mutated buffers into Core ML states
(``ct.StateType``, iOS 18 / macOS 15), so the cache lives on the device between calls.

Signature (what the app calls every step)::

    forward(inputs_embeds (1, n, D), causal_mask (1, 1, n, end)) -> logits (1, 1, V)

``end`` is the cache length after this call (past + n); ``causal_mask`` is additive (0 where a query
may attend, -inf/-1e4 elsewhere), so the app decides prefill (n = prompt length) and decode (n = 1)
with one function and the graph needs no data-dependent shapes. Only the last position's logits are
returned. Grouped KV heads are expanded by ``expand`` + ``reshape`` (not ``repeat_interleave``, which
does not convert on a flexible dimension).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MASK_MIN = -1e4  # additive mask value that is still finite in fp16


# The same RMSNorm and rotary helper as the ExecuTorch decoder (one implementation, shared weights).
from mobilemllm.export.export_llama import RMSNorm as _RMSNorm  # noqa: E402
from mobilemllm.export.export_llama import _rotate_half  # noqa: E402


class _Layer(nn.Module):
    def __init__(self, hf_layer, cfg, max_context: int, cache_dtype: torch.dtype):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        eps = cfg.rms_norm_eps
        self.input_norm = _RMSNorm(hf_layer.input_layernorm.weight, eps)
        self.post_norm = _RMSNorm(hf_layer.post_attention_layernorm.weight, eps)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        shape = (1, self.kv_heads, max_context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    def _qkv(self, x, cos, sin):
        n = x.shape[1]
        h = self.input_norm(x)
        q = self.q_proj(h).view(1, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _attend_and_mlp(self, x, q, keys, values, mask):
        n, length = x.shape[1], keys.shape[2]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        rep = self.heads // self.kv_heads
        if rep > 1:
            keys = keys[:, :, None].expand(1, self.kv_heads, rep, length, self.head_dim).reshape(
                1, self.heads, length, self.head_dim)
            values = values[:, :, None].expand(1, self.kv_heads, rep, length, self.head_dim).reshape(
                1, self.heads, length, self.head_dim)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.o_proj(att.transpose(1, 2).reshape(1, n, self.heads * self.head_dim))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x, cos, sin, mask, past: int, end: int):
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache[:, :, past:end, :] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, past:end, :] = v.to(self.v_cache.dtype)
        return self._attend_and_mlp(x, q, self.k_cache[:, :, :end, :], self.v_cache[:, :, :end, :], mask)

    def forward_at(self, x, cos, sin, mask, write, keep):
        """The same layer for a start position that is data, not a shape: the new keys/values go into the
        whole cache through a one-hot ``write`` (1, 1, C, n) (``keep`` = 1 - its row sums), and attention
        reads all C slots under ``mask`` (1, 1, n, C). Static shapes only, so Core ML can take it."""
        q, k, v = self._qkv(x, cos, sin)
        dt = self.k_cache.dtype
        keys = self.k_cache * keep.to(dt) + torch.matmul(write.to(dt), k.to(dt))
        values = self.v_cache * keep.to(dt) + torch.matmul(write.to(dt), v.to(dt))
        self.k_cache.copy_(keys)
        self.v_cache.copy_(values)
        return self._attend_and_mlp(x, q, keys, values, mask)


class CoreMLDecoder(nn.Module):
    """Our LLaMA's decoder with a stateful KV cache, for ``torch.export`` -> Core ML."""

    def __init__(self, llm, llm_cfg, max_context: int | None = None, cache_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.max_context = max_context or llm_cfg.max_position_embeddings
        inner = llm.model
        self.layers = nn.ModuleList(_Layer(layer, llm_cfg, self.max_context, cache_dtype) for layer in inner.layers)
        self.norm = _RMSNorm(inner.norm.weight, llm_cfg.rms_norm_eps)
        self.lm_head = llm.lm_head
        hd = llm_cfg.head_dim
        # RoPE angles are computed from the positions in the graph (a head_dim/2 vector, not a table), so
        # weight compression, which skips small constants, never quantizes them.
        inv_freq = 1.0 / (llm_cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        n = inputs_embeds.shape[1]
        end = causal_mask.shape[-1]
        past = end - n
        positions = torch.arange(n, dtype=torch.float32) + past
        freqs = positions.unsqueeze(1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat([freqs, freqs], dim=-1)
        cos = angles.cos().to(inputs_embeds.dtype)
        sin = angles.sin().to(inputs_embeds.dtype)
        mask = causal_mask.to(inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past, end)
        x = self.norm(x[:, -1:, :])
        return self.lm_head(x)


def causal_mask(past: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive mask (1, 1, n, past + n) for ``n`` new tokens after ``past`` cached ones."""
    q = torch.arange(past, past + n).unsqueeze(1)
    k = torch.arange(past + n).unsqueeze(0)
    return torch.where(k <= q, 0.0, MASK_MIN).to(dtype).view(1, 1, n, past + n)


class CoreMLRunnerDecoder(nn.Module):
    """The ``text_decoder`` method of an ExecuTorch program whose decoder runs in Core ML (``ios-coreml``).

    ``forward(embeds (1, n, D) float, start_pos (1,) int64) -> logits (1, V)``: the signature ExecuTorch's
    ``MultimodalRunner`` calls, like ``ExportLlama``. Core ML partitions cannot take a SymInt, so the start
    position stays a tensor: RoPE angles, the causal mask over all ``max_context`` cache slots and the one-hot
    cache write are computed from it with static shapes (``_Layer.forward_at``). The fp16 key/value buffers
    are mutable state that ExecuTorch's Core ML partitioner turns into Core ML states (iOS 18). Attention
    reads the whole cache every step (masked), the price of static shapes.
    """

    def __init__(self, llm, llm_cfg, max_context: int | None = None, cache_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.inner = CoreMLDecoder(llm, llm_cfg, max_context, cache_dtype)
        self.max_context = self.inner.max_context
        self.register_buffer("slots", torch.arange(self.max_context, dtype=torch.int64), persistent=False)

    def reset_cache(self) -> None:
        self.inner.reset_cache()

    def forward(self, embeds: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        pos = start_pos.reshape(1) + torch.arange(n, dtype=torch.int64)  # (n,) positions of the new tokens
        freqs = pos.to(torch.float32).unsqueeze(1) * self.inner.inv_freq.unsqueeze(0)
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos().to(embeds.dtype), angles.sin().to(embeds.dtype)
        hidden = (self.slots.unsqueeze(0) > pos.unsqueeze(1)).to(embeds.dtype)  # (n, C): 1 = a future slot
        # unsqueeze, not view: coremltools cannot reshape to a shape holding the symbolic n
        mask = (hidden * MASK_MIN).unsqueeze(0).unsqueeze(0)
        write = (self.slots.unsqueeze(1) == pos.unsqueeze(0)).to(embeds.dtype).unsqueeze(0).unsqueeze(0)
        keep = 1.0 - write.sum(dim=-1, keepdim=True)
        x = embeds
        for layer in self.inner.layers:
            x = layer.forward_at(x, cos, sin, mask, write, keep)
        return self.inner.lm_head(self.inner.norm(x[:, -1, :]))
