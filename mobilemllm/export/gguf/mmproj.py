"""The vision tower and connector as an mmproj GGUF (what llama.cpp's clip.cpp loads with ``--mmproj``).

Tower tensors take the ``gguf`` package's names for a LLaVA tower (``v.blk.0.attn_q`` ...); the final
LayerNorm (``post_layernorm``) is left out because the connector reads a hidden state from before it, and
``clip.vision.feature_layer`` names that hidden state (clip.cpp runs the tower up to it). Connector tensors
follow clip.cpp's names for each projector:

- ``mlp``: ``mm.0`` and ``mm.2`` (the two Linears of mlp2x_gelu);
- ``ldp``: ``mm.model.mlp.{1,3}`` and ``mm.model.mb_block.{1,2}.block.{0,1,2}...`` (MobileVLM's own names);
- ``ldpv2``: ``mm.model.mlp.{0,2}`` and ``mm.model.peg.0``.

Convolution kernels of size 1 become matrices and depthwise kernels lose their unit axis (clip.cpp multiplies
the first and runs ``ggml_conv_2d_dw`` on the second); matrices and kernels are stored in fp16, vectors in
fp32, as llama.cpp's converters do. ``clip.vision.image_mean``/``image_std`` and ``image_size`` tell clip.cpp
how to normalise and resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilemllm.errors import ConfigError
from mobilemllm.export.gguf.support import PROJECTORS, TOWER_ACTIVATIONS, feature_layer

FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # clip-impl.h's KEY_FEATURE_LAYERS; no gguf writer helper yet


def tower_tensors(vision_model, num_layers: int) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of a transformers CLIP/SigLIP vision model, without its final norm and head."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, num_layers)
    out = []
    for key, tensor in vision_model.state_dict().items():
        key = key.removeprefix("vision_model.")  # transformers 4 nests the tower under vision_model, 5 does not
        if key.startswith(("post_layernorm.", "head.")) or key.endswith("position_ids"):
            continue
        name = names.get_name("vision_tower.vision_model." + key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"the vision tower tensor {key!r} has no place in an mmproj GGUF")
        out.append((name, tensor.detach().float().cpu().numpy()))
    return out


def _connector_name(kind: str, key: str) -> str:
    """Our connector's state-dict key -> clip.cpp's tensor name."""
    if kind == "mlp2x_gelu":
        return "mm." + key
    if kind == "ldpv2":  # mlp.mlp.{0,2}.* and peg.peg.0.*
        return "mm.model." + key.replace("mlp.mlp.", "mlp.", 1).replace("peg.peg.", "peg.", 1)
    return "mm.model." + key  # ldp: MobileVLM's names already


def connector_tensors(connector, kind: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of the connector, kernels reshaped as clip.cpp reads them."""
    out = []
    for key, tensor in connector.state_dict().items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 4 and data.shape[2:] == (1, 1):  # 1x1 convolution: a matrix
            data = data.reshape(data.shape[0], data.shape[1])
        elif data.ndim == 4 and data.shape[1] == 1:  # depthwise kernel (C, 1, k, k) -> (C, k, k)
            data = data.reshape(data.shape[0], data.shape[2], data.shape[3])
        out.append((_connector_name(kind, key), data))
    return out


def stored(name: str, data: np.ndarray) -> np.ndarray:
    """fp16 for matrices and kernels (``*.weight`` of 2+ axes), fp32 for the rest (norms, biases, class and
    position embeddings keep fp32 where they are vectors)."""
    return data.astype(np.float16 if data.ndim >= 2 and name.endswith(".weight") else np.float32)


def write_mmproj_gguf(model, path: str | Path, name: str) -> dict[str, Any]:
    """Write ``model``'s tower and connector as an fp16 mmproj GGUF at ``path``; returns facts for the manifest."""
    import gguf

    cfg = model.config
    v, kind = cfg.vision, cfg.connector.kind
    hf = model.vision.model.config
    act = getattr(hf, "hidden_act", "quick_gelu")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTORS[kind])
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_layers)
    writer.add_vision_head_count(v.num_heads)
    writer.add_vision_attention_layernorm_eps(float(getattr(hf, "layer_norm_eps", 1e-5)))
    writer.add_vision_projection_dim(cfg.llm.hidden_size)
    writer.add_vision_image_mean([float(x) for x in v.image_mean])
    writer.add_vision_image_std([float(x) for x in v.image_std])
    writer.add_vision_use_gelu(TOWER_ACTIVATIONS[act])
    writer.add_array(FEATURE_LAYER_KEY, [feature_layer(cfg)])
    for tensor_name, data in tower_tensors(model.vision.model, v.num_layers) + connector_tensors(model.connector, kind):
        writer.add_tensor(tensor_name, stored(tensor_name, data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"projector_type": PROJECTORS[kind], "feature_layer": feature_layer(cfg), "tower": v.kind,
            "class_embedding": v.kind == "clip"}
