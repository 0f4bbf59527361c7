"""The text model as a LLaMA-architecture GGUF (what llama.cpp's ``llama`` loader reads).

Tensor names come from the ``gguf`` package's own map of transformers names (``model.layers.0.self_attn.q_proj``
-> ``blk.0.attn_q``). Two layouts differ from transformers':

- query/key rows: transformers' LLaMA rotates the two halves of each head (``rotate_half``), llama.cpp's
  ``llama`` rotates neighbouring pairs; each head's rows are interleaved (half i -> rows 2i, 2i+1) as
  llama.cpp's convert_hf_to_gguf.py does, which gives the same attention.
- a tied output projection is not written: llama.cpp uses ``token_embd`` when ``output`` is absent.

Matrices are stored in fp16, norms in fp32 (llama.cpp's quantizer then makes q8_0 / q4_0 / q4_k_m).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilemllm.errors import ConfigError
from mobilemllm.export.gguf.vocab import add_vocab


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """(heads * head_dim, in) query/key rows from rotate-half order to pairwise order, per head."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def text_tensors(llm, cfg) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every tensor of the LLaMA ``llm`` (transformers' LlamaForCausalLM)."""
    import gguf

    hf = llm.config
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ConfigError("--target gguf writes LLaMA layers without biases; this LLM has attention or MLP biases")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    out = []
    for key, tensor in llm.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"the LLM tensor {key!r} has no place in a LLaMA GGUF")
        data = tensor.detach().float().cpu().numpy()
        if ".attn_q." in name:
            data = interleave_rope_rows(data, cfg.num_heads)
        elif ".attn_k." in name:
            data = interleave_rope_rows(data, cfg.kv_heads)
        out.append((name, data))
    return out


def stored(data: np.ndarray) -> np.ndarray:
    """fp16 for matrices, fp32 for vectors (norms, biases), as llama.cpp's converters store them."""
    return data.astype(np.float16 if data.ndim >= 2 else np.float32)


def write_text_gguf(model, tokenizer, path: str | Path, prompt: dict[str, Any], chat_template: str | None,
                    name: str) -> dict[str, Any]:
    """Write ``model``'s LLM as an fp16 LLaMA GGUF at ``path``; returns facts for the manifest."""
    import gguf

    cfg = model.config.llm
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    kind = add_vocab(writer, tokenizer, cfg.vocab_size, prompt["add_bos"], chat_template)
    for tensor_name, data in text_tensors(model.llm, cfg):
        writer.add_tensor(tensor_name, stored(data))
    _finish(writer)
    return {"architecture": "llama", "tokenizer_model": kind}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
