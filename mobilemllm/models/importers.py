"""Import published checkpoints into our checkpoint folder, offline.

    import_checkpoint("MobileVLM_V2-1.7B", "ckpt/mobilevlm-v2")                 # weights include CLIP
    import_checkpoint("MobileVLM-1.7B", "ckpt/mobilevlm-v1", vision_tower="clip-vit-large-patch14-336")
    import_checkpoint("llava-1.5-7b-hf", "ckpt/llava")
    import_checkpoint("MobileLLaMA-1.4B-Chat", "ckpt/mllama", vision_tower="clip", llm_only=True)

Formats (``FORMATS``, auto-detected from ``config.json``):

- ``mobilevlm``: MobileVLM v1/v2 (``MobileLlamaForCausalLM``: a LLaMA config plus ``mm_*`` keys). Keys
  ``model.{embed_tokens,layers,norm}.*``, ``lm_head.weight``, ``model.mm_projector.*`` and, when the
  file has them, ``model.vision_tower.vision_tower.vision_model.*``. Projectors ``ldpnet`` -> ``ldp``,
  ``ldpnetv2`` -> ``ldpv2``, ``mlp2x_gelu`` -> ``mlp2x_gelu`` (our modules use the same submodule names, so
  the mapping is a prefix rename).
- ``llava-hf``: ``LlavaForConditionalGeneration`` folders, in any of the key layouts transformers has
  written (hub files ``vision_tower.vision_model.*``/``language_model.model.*``, transformers 5
  ``vision_tower.*``, in-memory ``model.vision_tower.*``/``model.language_model.*``/``lm_head.*``).
- ``llama``: a plain LLaMA causal LM (MobileLLaMA); only with ``llm_only=True``.

``llm_only=True`` takes just the language model from the source; the connector starts from seeded random
weights (``connector`` kind) and the vision tower comes from ``vision_tower`` or the source's own copy.

Every source tensor must land on exactly one of our tensors with the same shape, and every one of ours
must be filled; anything else is a :class:`CheckpointError` that names the tensors. Architecture details
our modules cannot reproduce (activation, biases, RoPE scaling, a projector's fixed pooling size) are
refused rather than imported approximately.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilemllm.errors import CheckpointError, ConfigError, UserError

FORMATS = ("auto", "mobilevlm", "llava-hf", "llama")
# MobileVLM's mm_projector_type -> our connector kind
PROJECTORS = {"ldpnet": "ldp", "ldpnetv2": "ldpv2", "mlp2x_gelu": "mlp2x_gelu"}
IMPORT_INFO_NAME = "import.json"
TEMPLATE = "vicuna_v1"

# Buffers some older files carry that our modules recompute.
_IGNORED = (re.compile(r"\.position_ids$"), re.compile(r"rotary_emb\.inv_freq$"))
# A CLIP/SigLIP folder may hold a whole CLIPModel: only its vision half is used.
_TOWER_IGNORED = (re.compile(r"^(text_model|text_projection|visual_projection|logit_scale)"),
                  re.compile(r"^(vision_model\.)?head\."))

_V = "vision.model."
_MOBILEVLM_TOWER = "model.vision_tower.vision_tower."


@dataclass
class _Plan:
    """What one import will write: our config, our tensors (by our names) and where each came from."""

    fmt: str
    name: str
    vision: Any = None  # VisionConfig
    connector: str = ""
    llm: Any = None  # LLMConfig
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # our key -> "source-file-key"
    notes: list[str] = field(default_factory=list)
    vision_source: str = ""


# ---- reading a folder -------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers-style folder: sharded (index json) or single, safetensors or bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise CheckpointError(f"{folder} is missing shard(s) {', '.join(missing)} listed in {index_name}; "
                                      "download the whole folder again")
            return [folder / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if found:
        return found
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(f"{folder} has no weights (model.safetensors, pytorch_model.bin or shards with an index "
                          f"json); it has: {present}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's weight files, by their names in the files."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = _read_file(path)
        dup = sorted(set(part) & set(state))
        if dup:
            raise CheckpointError(f"tensor(s) {', '.join(dup[:5])} appear in more than one weight file of {folder}")
        state.update(part)
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is truncated or corrupt ({e}); download it again") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) .bin
    except Exception as e:  # pickle / zip errors come in many types
        raise CheckpointError(f"cannot read {path} ({e.__class__.__name__}: {e}); download it again") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    # .bin files may hold views of one storage; safetensors refuses to save shared memory, so copy those.
    seen: dict[int, int] = {}
    for t in obj.values():
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = seen.get(ptr, 0) + 1
    return {k: (v.clone() if seen[v.untyped_storage().data_ptr()] > 1 else v) for k, v in obj.items()}


def detect_format(config: dict[str, Any], where: str = "config.json") -> str:
    model_type = str(config.get("model_type", ""))
    archs = [str(a) for a in config.get("architectures") or []]
    if "LlavaForConditionalGeneration" in archs or model_type == "llava":
        return "llava-hf"
    if "text_config" in config and "vision_config" in config:
        raise CheckpointError(f"{where}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is a "
                              "multimodal model this importer does not know; supported: MobileVLM v1/v2, "
                              "LLaVA-HF (LlavaForConditionalGeneration), plain LLaMA with --llm-only")
    if any(k in config for k in ("mm_projector_type", "mm_vision_tower", "mm_hidden_size")):
        return "mobilevlm"
    if model_type == "llama" or any(a in ("LlamaForCausalLM", "MobileLlamaForCausalLM") for a in archs):
        return "llama"
    raise CheckpointError(f"cannot tell the format of {where} (model_type {model_type!r}, architectures "
                          f"{archs or 'none'}); supported: {', '.join(FORMATS[1:])}. Pass --format if you know it")


# ---- key mapping --------------------------------------------------------------------------------


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
        if any(p.search(key) for p in _IGNORED + ignore) or key.startswith(drop):
            continue
        for src_prefix, dst_prefix in rules:
            if key.startswith(src_prefix):
                ours = dst_prefix + key[len(src_prefix):]
                if ours.startswith(_V + "vision_model."):  # transformers<5 CLIPVisionModel wrapper
                    ours = _V + ours[len(_V + "vision_model."):]
                if ours in state:
                    raise CheckpointError(f"{origin_label}: {key} and {origin[ours]} both map to {ours}; the folder "
                                          "mixes two key layouts")
                state[ours] = source[key]
                origin[ours] = key
                break
        else:
            unexpected.append(key)
    return state, origin, unexpected


def _shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def _source_name(ours: str, rules: list[tuple[str, str]]) -> str:
    """The name a missing tensor would have in the source (first matching rule)."""
    for src_prefix, dst_prefix in rules:
        if ours.startswith(dst_prefix):
            return src_prefix + ours[len(dst_prefix):]
    return ours


# ---- configs -------------------------------------------------------------------------------------


_LLM_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _llm_config(data: dict[str, Any], where: str, errors: list[str], require: bool = True):
    """Our LLMConfig from a LLaMA config dict; unsupported architecture details go to ``errors``.

    ``require=False`` for nested configs (LLaVA-HF's ``text_config``), which transformers writes as a diff
    against LlamaConfig's defaults: absent keys take those defaults, as transformers itself does.
    """
    from transformers import LlamaConfig

    from mobilemllm.models.llm import llm_config_from_hf

    missing = [k for k in _LLM_REQUIRED if k not in data] if require else []
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


def _preprocessing(folders: list[Path]) -> dict[str, Any]:
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


def _vision_from_hf(hf_cfg, where: str, errors: list[str], **extra):
    """Our VisionConfig from a transformers CLIP/SigLIP vision config, refusing what we cannot rebuild."""
    from mobilemllm.models.vision import hf_vision_config, vision_config_from_hf

    name = type(hf_cfg).__name__.lower()
    if "clip" not in name and "siglip" not in name:
        errors.append(f"{where}: vision model {type(hf_cfg).__name__} is not supported (CLIP or SigLIP only)")
        return None
    vcfg = vision_config_from_hf(hf_cfg, **extra)
    ours = hf_vision_config(vcfg)
    for attr in ("hidden_act", "layer_norm_eps", "num_channels"):
        theirs, mine = getattr(hf_cfg, attr, None), getattr(ours, attr, None)
        if theirs is not None and theirs != mine:
            errors.append(f"{where}: vision {attr} {theirs!r} is not supported (our {vcfg.kind} tower uses {mine!r})")
    return vcfg


def _vision_from_weights(state: dict[str, torch.Tensor], where: str, **extra):
    """Infer an OpenAI CLIP tower's config from its weights (``vision.model.*`` keys)."""
    from mobilemllm.config import VisionConfig

    needed = [_V + "embeddings.patch_embedding.weight", _V + "embeddings.position_embedding.weight",
              _V + "encoder.layers.0.mlp.fc1.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{where}: the vision tower weights are incomplete (no "
                              f"{', '.join(a[len(_V):] for a in absent)}); pass --vision-tower CLIP_FOLDER")
    hidden, channels, patch, _ = state[needed[0]].shape
    positions = state[needed[1]].shape[0] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise CheckpointError(f"{where}: the vision tower has {positions} patch positions, not a square grid")
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(_V) + r"encoder\.layers\.(\d+)\.", k))}
    if hidden % 64:
        raise CheckpointError(f"{where}: cannot tell the head count of a {hidden}-wide vision tower from its weights; "
                              "pass --vision-tower with the tower's folder (config.json)")
    return VisionConfig(kind="clip", image_size=grid * patch, patch_size=patch, hidden_size=hidden,
                        num_layers=len(layers), num_heads=hidden // 64,
                        intermediate_size=state[needed[2]].shape[0], **extra)


def _load_tower_folder(folder: Path, errors: list[str], **extra):
    """(VisionConfig, our-keyed state, origin) from a local CLIP/SigLIP folder (vision-only or whole model)."""
    from transformers import AutoConfig

    if not (folder / "config.json").exists():
        raise CheckpointError(f"vision tower folder {folder} has no config.json; download the tower "
                              "(e.g. `hf download openai/clip-vit-large-patch14-336 --local-dir clip`) and pass it")
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"cannot read the vision tower config in {folder}: {e}") from None
    hf_cfg = getattr(hf_cfg, "vision_config", hf_cfg)
    extra = {**_preprocessing([folder]), **extra}
    vcfg = _vision_from_hf(hf_cfg, str(folder / "config.json"), errors, **extra)
    if vcfg is None:
        return None, {}, {}, []
    rules = [("vision_model.", _V), ("", _V)]
    state, origin, unexpected = map_keys(read_weights(folder), rules, str(folder), ignore=_TOWER_IGNORED)
    return vcfg, state, {k: f"{folder.name}:{v}" for k, v in origin.items()}, unexpected


# ---- per-format plans ----------------------------------------------------------------------------


def _plan_mobilevlm(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> _Plan:
    where = str(src / "config.json")
    errors: list[str] = []
    plan = _Plan("mobilevlm", src.name)
    plan.llm = _llm_config(config, where, errors)
    required = ["mm_hidden_size"] + ([] if llm_only else ["mm_projector_type"])
    missing = [k for k in required if k not in config]
    if missing:
        errors.append(f"{where} is missing MobileVLM key(s) {', '.join(missing)}")
    ptype = config.get("mm_projector_type")
    if llm_only:
        plan.connector = connector
    elif ptype is not None:
        if ptype not in PROJECTORS:
            errors.append(f"{where}: unknown mm_projector_type {ptype!r}; supported: "
                          + ", ".join(f"{k} (-> {v})" for k, v in PROJECTORS.items()))
        else:
            plan.connector = PROJECTORS[ptype]
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        errors.append(f"{where}: mm_vision_select_feature {feature!r} is not supported (only 'patch': CLS dropped)")
    aspect = config.get("image_aspect_ratio", "pad")
    extra = dict(select_layer=int(config.get("mm_vision_select_layer", -2)),
                 image_aspect="pad" if aspect == "pad" else "resize")
    if aspect != "pad":
        plan.notes.append(f"image_aspect_ratio {aspect!r}: images are stretched to a square (our 'resize')")
    if errors:
        raise CheckpointError("cannot import " + str(src) + ": " + "; ".join(errors))

    source = read_weights(src)
    rules = [("model.embed_tokens.", "llm.model.embed_tokens."), ("model.layers.", "llm.model.layers."),
             ("model.norm.", "llm.model.norm."), ("lm_head.", "llm.lm_head.")]
    if not llm_only:
        rules.append(("model.mm_projector.model.", "connector.") if ptype == "ldpnet"
                     else ("model.mm_projector.", "connector."))
    drop: tuple[str, ...] = ("model.mm_projector.",) if llm_only else ()
    has_tower = any(k.startswith(_MOBILEVLM_TOWER) for k in source)
    tower_name = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    if vision_tower is None and tower_name and not has_tower and Path(tower_name).is_dir():
        vision_tower = Path(tower_name)  # the training machine's local path exists here too
    if vision_tower is not None:
        drop += (_MOBILEVLM_TOWER,)
        if has_tower:
            plan.notes.append(f"vision tower weights taken from {vision_tower}; the checkpoint's own copy was ignored")
    else:
        rules.append((_MOBILEVLM_TOWER, _V))
    state, origin, unexpected = map_keys(source, rules, str(src), drop=drop)
    plan.state, plan.origin = state, origin
    _check_unexpected(unexpected, str(src))

    t_errors: list[str] = []
    if vision_tower is not None:
        vcfg, vstate, vorigin, vunexpected = _load_tower_folder(Path(vision_tower), t_errors, **extra)
        if t_errors:
            raise CheckpointError("cannot use the vision tower: " + "; ".join(t_errors))
        _check_unexpected(vunexpected, str(vision_tower))
        plan.state.update(vstate)
        plan.origin.update(vorigin)
        plan.vision_source = str(vision_tower)
    elif has_tower:
        if tower_name and not _is_openai_clip(tower_name):
            raise CheckpointError(
                f"{where}: mm_vision_tower {tower_name!r} is not an OpenAI CLIP, so its config cannot be inferred from "
                "the weights alone; pass --vision-tower with that tower's local folder")
        vcfg = _vision_from_weights(state, str(src), **extra)
        plan.vision_source = f"{src.name} (embedded; config inferred from the weights, 64-dim heads as OpenAI CLIP)"
        plan.notes.append(f"vision tower config inferred from the weights of {tower_name or 'the checkpoint'}: "
                          f"{vcfg.num_layers}L x {vcfg.hidden_size}, {vcfg.image_size}px/{vcfg.patch_size}")
    else:
        hint = f" (the tower named in config.json is {tower_name!r})" if tower_name else ""
        raise CheckpointError(
            f"{src} has no vision tower weights ({_MOBILEVLM_TOWER}vision_model.*) and no --vision-tower was given"
            f"{hint}; download the tower, e.g. `hf download {tower_name or 'openai/clip-vit-large-patch14-336'} "
            f"--local-dir clip`, and pass --vision-tower clip")
    if vcfg.kind != "clip":
        raise CheckpointError(f"MobileVLM expects a CLIP vision tower; {plan.vision_source} is {vcfg.kind}")
    if "mm_hidden_size" in config and int(config["mm_hidden_size"]) != vcfg.hidden_size:
        raise CheckpointError(
            f"the vision tower {plan.vision_source} is {vcfg.hidden_size} wide but {where} has mm_hidden_size "
            f"{config['mm_hidden_size']}: that tower is not the one this model was trained with "
            f"(it names {tower_name or 'none'})")
    if plan.connector == "ldpv2" and not llm_only and vcfg.grid != 24:
        raise CheckpointError(
            f"MobileVLM v2's projector pools to a fixed 12x12 grid, which our LDPv2 (2x2 average pooling) matches only "
            f"for a 24x24 patch grid; this tower gives {vcfg.grid}x{vcfg.grid} "
            f"({vcfg.image_size}px / {vcfg.patch_size})")
    plan.vision = vcfg
    return plan


def _plan_llava_hf(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> _Plan:
    from transformers import AutoConfig

    where = str(src / "config.json")
    errors: list[str] = []
    plan = _Plan("llava-hf", src.name)
    missing = [k for k in ("text_config", "vision_config") if not isinstance(config.get(k), dict)]
    if missing:
        raise CheckpointError(f"{where} is missing {', '.join(missing)}")
    text = config["text_config"]
    if text.get("model_type", "llama") != "llama":
        errors.append(f"{where}: text model {text.get('model_type')!r} is not supported (LLaMA only)")
    plan.llm = _llm_config(text, where + " text_config", errors, require=False)
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    act = config.get("projector_hidden_act", "gelu")
    if not isinstance(layer, int):
        errors.append(f"{where}: vision_feature_layer {layer!r} (several layers) is not supported; one layer only")
        layer = -2
    if act != "gelu" and not llm_only:
        errors.append(f"{where}: projector_hidden_act {act!r} is not supported (mlp2x_gelu uses exact gelu)")
    extra = dict(select_layer=layer, image_aspect="pad", **_preprocessing([src]))
    vision = dict(config["vision_config"])
    vtype = vision.get("model_type", "clip_vision_model")
    try:
        vision_cls = AutoConfig.for_model(vtype).__class__
        hf_vision = vision_cls.from_dict(vision)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: unknown vision_config model_type {vtype!r} ({e})") from None
    plan.vision = None if vision_tower else _vision_from_hf(hf_vision, where + " vision_config", errors, **extra)
    if errors:
        raise CheckpointError("cannot import " + str(src) + ": " + "; ".join(errors))
    plan.connector = connector if llm_only else "mlp2x_gelu"

    source = read_weights(src)
    rules = [("model.language_model.", "llm.model."), ("language_model.model.", "llm.model."),
             ("lm_head.", "llm.lm_head."), ("language_model.lm_head.", "llm.lm_head.")]
    # SigLIP's attention-pooling head is not used by LLaVA (it reads a hidden layer); ours is built without it
    towers = ("model.vision_tower.", "vision_tower.", "model.vision_tower.vision_model.", "vision_tower.vision_model.")
    drop: tuple[str, ...] = tuple(t + "head." for t in towers)
    if llm_only:
        drop += ("model.multi_modal_projector.", "multi_modal_projector.")
    else:
        rules += [("model.multi_modal_projector.linear_1.", "connector.0."),
                  ("multi_modal_projector.linear_1.", "connector.0."),
                  ("model.multi_modal_projector.linear_2.", "connector.2."),
                  ("multi_modal_projector.linear_2.", "connector.2.")]
    if vision_tower is None:
        rules += [("model.vision_tower.", _V), ("vision_tower.", _V)]
    else:
        drop += ("model.vision_tower.", "vision_tower.")
    state, origin, unexpected = map_keys(source, rules, str(src), drop=drop)
    _check_unexpected(unexpected, str(src))
    if not llm_only and not config.get("multimodal_projector_bias", True):
        for i in ("0", "2"):  # a bias-free projector is our MLP with zero biases
            w = state[f"connector.{i}.weight"] if f"connector.{i}.weight" in state else None
            if w is not None:
                state[f"connector.{i}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
                origin[f"connector.{i}.bias"] = "(zeros: multimodal_projector_bias=false)"
    plan.state, plan.origin = state, origin
    plan.vision_source = f"{src.name} (embedded)"
    if vision_tower is not None:
        t_errors: list[str] = []
        vcfg, vstate, vorigin, vunexpected = _load_tower_folder(Path(vision_tower), t_errors, **extra)
        if t_errors:
            raise CheckpointError("cannot use the vision tower: " + "; ".join(t_errors))
        _check_unexpected(vunexpected, str(vision_tower))
        if vcfg.hidden_size != hf_vision.hidden_size and not llm_only:
            raise CheckpointError(f"the vision tower {vision_tower} is {vcfg.hidden_size} wide but {where}'s "
                                  f"vision_config has hidden_size {hf_vision.hidden_size}")
        plan.state.update(vstate)
        plan.origin.update(vorigin)
        plan.vision, plan.vision_source = vcfg, str(vision_tower)
    want = "default" if plan.vision.kind == "clip" else "full"
    if strategy != want:
        raise CheckpointError(f"{where}: vision_feature_select_strategy {strategy!r} with a {plan.vision.kind} tower "
                              f"is not supported (ours drops CLIP's CLS token and keeps every SigLIP token: {want!r})")
    return plan


def _plan_llama(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> _Plan:
    if not llm_only:
        raise CheckpointError(f"{src} is a plain LLaMA model with no vision parts; to build a VLM around it pass "
                              "--llm-only and --vision-tower CLIP_FOLDER (the connector then starts from random "
                              "weights)")
    if vision_tower is None:
        raise CheckpointError(f"{src} has no vision tower; pass --vision-tower with a local CLIP/SigLIP folder")
    errors: list[str] = []
    plan = _Plan("llama", src.name)
    plan.llm = _llm_config(config, str(src / "config.json"), errors)
    plan.connector = connector
    vcfg, vstate, vorigin, vunexpected = _load_tower_folder(Path(vision_tower), errors, select_layer=-2,
                                                            image_aspect="pad")
    if errors:
        raise CheckpointError("cannot import " + str(src) + ": " + "; ".join(errors))
    _check_unexpected(vunexpected, str(vision_tower))
    rules = [("model.", "llm.model."), ("lm_head.", "llm.lm_head.")]
    state, origin, unexpected = map_keys(read_weights(src), rules, str(src))
    _check_unexpected(unexpected, str(src))
    plan.state, plan.origin = {**state, **vstate}, {**origin, **vorigin}
    plan.vision, plan.vision_source = vcfg, str(vision_tower)
    return plan


def _is_openai_clip(name: str) -> bool:
    """``openai/clip-vit-...`` hub ids, or a local copy keeping the hub folder name."""
    return name.startswith("openai/") or "/openai/" in name or Path(name).name.startswith("clip-vit-")


_PLANNERS = {"mobilevlm": _plan_mobilevlm, "llava-hf": _plan_llava_hf, "llama": _plan_llama}


def _check_unexpected(unexpected: list[str], where: str) -> None:
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} tensor(s) this importer does not know where to put: "
                              f"{_shown(unexpected)}")


# ---- tokenizer ------------------------------------------------------------------------------------


def load_source_tokenizer(src: Path, fmt: str = "auto"):
    """The source's tokenizer (sentencepiece tokenizer.model or tokenizer.json), loaded offline."""
    from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    files = [f for f in ("tokenizer.json", "tokenizer.model") if (src / f).exists()]
    if not files:
        raise CheckpointError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer "
                              "files into it")
    # MobileVLM's model_type is unknown to transformers: hand AutoTokenizer a LLaMA config instead of config.json
    kwargs = {"config": LlamaConfig()} if fmt == "mobilevlm" else {}
    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
    except Exception as first:  # noqa: BLE001 - AutoTokenizer raises many kinds; fall back before reporting
        if "tokenizer.json" in files:
            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
            except Exception:  # noqa: BLE001
                pass
        if "tokenizer.model" in files:
            try:
                from transformers import LlamaTokenizer

                return LlamaTokenizer.from_pretrained(src, local_files_only=True)
            except Exception:  # noqa: BLE001
                pass
        raise CheckpointError(f"cannot load the tokenizer in {src} ({first.__class__.__name__}: {first})") from None


# ---- the import -----------------------------------------------------------------------------------


@dataclass
class ImportResult:
    path: Path
    format: str
    tensors: int
    vision_source: str
    notes: list[str]


def import_checkpoint(src: str | Path, out: str | Path, vision_tower: str | Path | None = None,
                      llm_only: bool = False, format: str = "auto", connector: str = "ldpv2",
                      seed: int = 0) -> Path:
    """Convert a MobileVLM v1/v2, LLaVA-HF (or, with ``llm_only``, plain LLaMA) folder into ``out``."""
    return import_checkpoint_with_report(src, out, vision_tower, llm_only, format, connector, seed).path


def import_checkpoint_with_report(src: str | Path, out: str | Path, vision_tower: str | Path | None = None,
                                  llm_only: bool = False, format: str = "auto", connector: str = "ldpv2",
                                  seed: int = 0) -> ImportResult:
    from mobilemllm.config import ModelConfig
    from mobilemllm.models.checkpoint import save_checkpoint
    from mobilemllm.models.connectors import CONNECTORS, build_connector
    from mobilemllm.models.vlm import MobileVLM

    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
    if connector not in CONNECTORS:
        raise ConfigError(f"unknown connector {connector!r}; valid connectors: {', '.join(sorted(CONNECTORS))}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError(f"source folder {src} does not exist; download the model folder first "
                              "(e.g. `hf download mtgv/MobileVLM_V2-1.7B --local-dir MobileVLM_V2-1.7B`)")
    if vision_tower is not None and not Path(vision_tower).is_dir():
        raise CheckpointError(f"--vision-tower {vision_tower} is not a folder; point it at a local CLIP/SigLIP folder")
    _check_out(src, out)
    config = read_json(src / "config.json")
    fmt = detect_format(config, str(src / "config.json")) if format == "auto" else format
    plan = _PLANNERS[fmt](src, config, Path(vision_tower) if vision_tower else None, llm_only, connector)
    if llm_only:
        plan.notes.append(f"llm-only: connector {plan.connector} initialised from seed {seed} (train it before use)")

    tokenizer = load_source_tokenizer(src, fmt)
    if len(tokenizer) > plan.llm.vocab_size:
        raise CheckpointError(f"the tokenizer in {src} has {len(tokenizer)} tokens but the model's embedding has only "
                              f"{plan.llm.vocab_size} rows")
    cfg = ModelConfig(name=plan.name, vision=plan.vision, connector=_connector_config(plan.connector),
                      llm=plan.llm, template=TEMPLATE)
    cfg.validate()
    with torch.device("meta"):
        model = MobileVLM(cfg, load_weights=False)
    if llm_only:
        torch.manual_seed(seed)
        fresh = build_connector(cfg.connector, cfg.vision.hidden_size, cfg.llm.hidden_size)
        for k, v in fresh.state_dict().items():
            plan.state["connector." + k] = v
            plan.origin["connector." + k] = f"(random init, seed {seed})"
    _check_and_assign(model, plan, src)
    save_checkpoint(model, tokenizer, out)
    info = {"source": str(src.resolve()), "format": fmt, "llm_only": llm_only, "vision_tower": plan.vision_source,
            "tensors": len(plan.state), "notes": plan.notes}
    _write_text_atomic(out / IMPORT_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return ImportResult(out, fmt, len(plan.state), plan.vision_source, plan.notes)


def _connector_config(kind: str):
    from mobilemllm.config import ConnectorConfig

    return ConnectorConfig(kind=kind)


def _check_out(src: Path, out: Path) -> None:
    """Refuse an output that would overwrite the source or a folder that is not a checkpoint."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UserError(f"--out {out} overlaps the source folder {src}; choose a separate output folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file; choose a folder name")
        if any(out.iterdir()) and not (out / "config.json").exists():
            raise UserError(f"--out {out} is a non-empty folder that is not a checkpoint; choose a new or empty folder")


def _check_and_assign(model, plan: _Plan, src: Path) -> None:
    own = model.state_dict()
    state = plan.state
    if plan.llm.tie_word_embeddings and "llm.model.embed_tokens.weight" in state:
        state.setdefault("llm.lm_head.weight", state["llm.model.embed_tokens.weight"])
        plan.origin.setdefault("llm.lm_head.weight", plan.origin.get("llm.model.embed_tokens.weight", ""))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{plan.origin[k]} {tuple(state[k].shape)} (ours {k} {tuple(own[k].shape)})"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    if missing:
        rules = _rules_for_names(plan)
        names = [_source_name(k, rules) for k in missing]
        problems.append(f"{len(missing)} missing tensor(s): {_shown(names)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_shown([plan.origin[k] for k in unexpected])}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape for the config: {_shown(mismatched, 5)}")
    if problems:
        raise CheckpointError(f"{src} does not match its config.json: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def _rules_for_names(plan: _Plan) -> list[tuple[str, str]]:
    """Source-side names for our keys, to name missing tensors as the user's files would."""
    if plan.fmt == "mobilevlm":
        return [("model.mm_projector.model." if plan.connector == "ldp" else "model.mm_projector.", "connector."),
                (_MOBILEVLM_TOWER + "vision_model.", _V), ("lm_head.", "llm.lm_head."), ("model.", "llm.model.")]
    if plan.fmt == "llava-hf":
        used = set(plan.origin.values())
        new = any(k.startswith("model.language_model.") for k in used)
        if new:
            return [("model.vision_tower.", _V), ("model.multi_modal_projector.linear_1.", "connector.0."),
                    ("model.multi_modal_projector.linear_2.", "connector.2."), ("model.language_model.", "llm.model."),
                    ("lm_head.", "llm.lm_head.")]
        tower = "vision_tower.vision_model." if any(k.startswith("vision_tower.vision_model.") for k in used) \
            else "vision_tower."
        return [(tower, _V), ("multi_modal_projector.linear_1.", "connector.0."),
                ("multi_modal_projector.linear_2.", "connector.2."), ("language_model.model.", "llm.model."),
                ("language_model.lm_head.", "llm.lm_head.")]
    return [("model.", "llm.model."), ("lm_head.", "llm.lm_head."), ("vision_model.", _V)]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
