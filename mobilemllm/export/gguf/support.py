"""What llama.cpp can run, checked on the model config before any file is written.

llama.cpp's multimodal library (``tools/mtmd``, clip.cpp) builds LLaVA-style projectors by the mmproj's
``clip.projector_type``. Of our connectors, three have a graph there:

- ``mlp2x_gelu`` -> ``mlp`` (LLaVA-1.5: Linear, GELU, Linear), any patch grid;
- ``ldp`` -> ``ldp`` and ``ldpv2`` -> ``ldpv2`` (MobileVLM v1/v2). clip.cpp's graphs for these two fix the patch
  grid at 24 x 24 (``int n_patch = 24`` in ``clip_graph_llava::build``: 336 px images in 14 px patches), and
  ldpv2 pools 2 x 2.

``patch_merger`` and ``resampler`` have no clip.cpp graph, nor has a connector with ``output_norm``.
"""

from __future__ import annotations

from typing import Any

PROJECTORS = {"mlp2x_gelu": "mlp", "ldp": "ldp", "ldpv2": "ldpv2"}  # our connector -> clip.projector_type
MOBILEVLM_GRID = 24  # the patch grid clip.cpp's ldp/ldpv2 graphs are built for
# Tower activations and the clip.cpp FFN each maps to (clip.use_gelu: ggml's tanh GELU; else quick GELU).
TOWER_ACTIVATIONS = {"quick_gelu": False, "gelu_pytorch_tanh": True, "gelu": True}


def connector_problem(config) -> str | None:
    """Why llama.cpp cannot run this config's connector (None when it can), in one line naming what it runs."""
    c, v = config.connector, config.vision
    runs = ", ".join(PROJECTORS)
    if c.kind not in PROJECTORS:
        return (f"llama.cpp cannot run the {c.kind} connector (clip.cpp has no graph for it); --target gguf "
                f"exports models whose connector is one of: {runs}")
    if c.output_norm:
        return (f"llama.cpp cannot run a connector with output_norm (clip.cpp's {PROJECTORS[c.kind]} projector has "
                f"no norm after it); --target gguf exports {runs} without output_norm")
    if c.kind in ("ldp", "ldpv2") and v.grid != MOBILEVLM_GRID:
        return (f"llama.cpp runs the {c.kind} connector only on a {MOBILEVLM_GRID}x{MOBILEVLM_GRID} patch grid "
                f"(clip.cpp fixes it, as MobileVLM's 336 px / 14 px); this model's is {v.grid}x{v.grid} "
                f"(image_size {v.image_size}, patch_size {v.patch_size}). mlp2x_gelu runs on any grid")
    if c.kind == "ldpv2" and c.pool != 2:
        return f"llama.cpp's ldpv2 pools 2x2; this model's connector.pool is {c.pool}"
    return None


def problems(config, hf_vision_config: Any = None, llm_arch: str | None = None) -> list[str]:
    """Every reason llama.cpp cannot run this model, one line each (empty: it can).

    ``hf_vision_config``: the tower's transformers config (activation, FFN width); ``llm_arch``: the LLM's
    transformers class name. Both are checked only when given (the config alone is enough for the rest).
    """
    out = []
    problem = connector_problem(config)
    if problem:
        out.append(problem)
    v = config.vision
    if v.hires != "direct":
        out.append("llama.cpp's LLaVA projectors encode one view per image; export a model with vision.hires "
                   f"direct for --target gguf (this one is {v.hires})")
    if v.intermediate_size == v.hidden_size:
        # clip.cpp takes ffn_down with input width == n_embd for an old converter's swapped names and swaps it
        out.append(f"llama.cpp reads a vision tower whose FFN width equals its hidden size ({v.hidden_size}) as "
                   "having swapped FFN weights; such a tower cannot be exported to GGUF")
    n_states = v.num_layers + 1
    if not -n_states <= v.select_layer < n_states:
        out.append(f"vision.select_layer {v.select_layer} is outside the tower's {n_states} hidden states")
    if hf_vision_config is not None:
        act = getattr(hf_vision_config, "hidden_act", None)
        if act not in TOWER_ACTIVATIONS:
            out.append(f"llama.cpp's clip.cpp has no {act!r} activation for the vision tower; it runs "
                       f"{', '.join(TOWER_ACTIVATIONS)}")
    if llm_arch is not None and llm_arch != "LlamaForCausalLM":
        out.append(f"--target gguf writes LLaMA-architecture text models; this LLM is {llm_arch}")
    return out


def feature_layer(config) -> int:
    """The tower's hidden state the connector reads, as clip.cpp's ``clip.vision.feature_layer`` counts it:
    0 is the embeddings (after the pre-norm), k the output of layer k (transformers' ``hidden_states[k]``)."""
    v = config.vision
    return v.select_layer if v.select_layer >= 0 else v.num_layers + 1 + v.select_layer
