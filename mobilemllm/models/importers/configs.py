"""Our LLM config from a LLaMA config dict, refusing what our LLaMA cannot reproduce; image mean/std from a
preprocessor_config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilemllm.models.importers.files import read_json
from mobilemllm.models.llm import llm_config_from_hf


LLM_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def llm_config(data: dict[str, Any], where: str, errors: list[str], require: bool = True):
    """Our LLMConfig from a LLaMA config dict; unsupported architecture details go to ``errors``.

    ``require=False`` for nested configs (LLaVA-HF's ``text_config``), which transformers writes as a diff
    against LlamaConfig's defaults: absent keys take those defaults, as transformers itself does.
    """
    from transformers import LlamaConfig

    missing = [k for k in LLM_REQUIRED if k not in data] if require else []
    if missing:
        errors.append(f"{where} is missing LLaMA key(s) {', '.join(missing)}")
        return None
    clean = {k: v for k, v in data.items() if not k.startswith("mm_") and k not in ("architectures", "auto_map")}
    clean["model_type"] = "llama"
    if clean.get("rope_scaling", 0) is None:
        del clean["rope_scaling"]  # older configs write null; transformers 5 warns on the key
    hf = LlamaConfig.from_dict(clean)
    if getattr(hf, "hidden_act", "silu") != "silu":
        errors.append(f"{where}: hidden_act {hf.hidden_act!r} is not supported (our LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            errors.append(f"{where}: {flag}=true is not supported (our LLaMA has no biases)")
    rope = getattr(hf, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if data.get("rope_scaling") or rope_type != "default":
        errors.append(f"{where}: RoPE scaling {data.get('rope_scaling') or rope} is not supported (plain RoPE only)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim and head_dim * hf.num_attention_heads != hf.hidden_size:
        errors.append(f"{where}: head_dim {head_dim} x {hf.num_attention_heads} heads != hidden_size "
                      f"{hf.hidden_size} (not supported)")
    ctx = hf.max_position_embeddings
    if "max_position_embeddings" not in data and data.get("max_sequence_length"):
        ctx = data["max_sequence_length"]  # some MobileVLM/LLaMA-1 era configs name only this one
    return llm_config_from_hf(hf, max_position_embeddings=int(ctx))


def preprocessing(folders: list[Path]) -> dict[str, Any]:
    """image_mean / image_std from the first preprocessor_config.json found."""
    for folder in folders:
        p = folder / "preprocessor_config.json"
        if p.exists():
            data = read_json(p)
            out = {}
            for key in ("image_mean", "image_std"):
                v = data.get(key)
                if isinstance(v, list) and len(v) == 3:
                    out[key] = tuple(float(x) for x in v)
            return out
    return {}
