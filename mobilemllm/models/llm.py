"""The language model: MobileLLaMA as transformers' LlamaForCausalLM (RoPE, RMSNorm, SwiGLU).

Any local transformers causal-LM folder of the LLaMA family can stand in via ``pretrained_path``.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from torch import nn

from mobilemllm.config import LLMConfig
from mobilemllm.errors import CheckpointError


@functools.lru_cache(maxsize=1)
def _cache_arg() -> str:
    """The name transformers' decoders take the KV cache under: ``cache`` (newer 5.x) or ``past_key_values``."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``llm(..., **cache_kwargs(cache))``: pass a KV cache whatever this transformers version calls it.

    An unknown keyword is swallowed by the model's ``**kwargs``, so the wrong name silently decodes without
    the cache (each step sees only its own token); every cached call goes through here.
    """
    return {_cache_arg(): cache}


def output_cache(out):
    """The KV cache a decoder call returned (``out.cache`` or, in older 5.x, ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def hf_llama_config(cfg: LLMConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def llm_config_from_hf(hf_cfg, **extra) -> LLMConfig:
    rope_theta = getattr(hf_cfg, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    values = dict(
        vocab_size=hf_cfg.vocab_size,
        hidden_size=hf_cfg.hidden_size,
        num_layers=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        num_kv_heads=getattr(hf_cfg, "num_key_value_heads", None),
        intermediate_size=hf_cfg.intermediate_size,
        max_position_embeddings=getattr(hf_cfg, "max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rms_norm_eps=getattr(hf_cfg, "rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
    )
    values.update(extra)
    return LLMConfig(**values)


def build_llm(cfg: LLMConfig, load_weights: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.pretrained_path and load_weights:
        path = Path(cfg.pretrained_path)
        if not (path / "config.json").exists():
            raise CheckpointError(f"LLM folder {path} has no config.json; point at a local LLaMA-family folder")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="float32")
    else:
        model = LlamaForCausalLM(hf_llama_config(cfg))
    model.config._attn_implementation = "sdpa"
    return model
