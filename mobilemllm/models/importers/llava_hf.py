"""LLaVA-HF folders (``LlavaForConditionalGeneration``, every key layout transformers has written) -> an import
plan."""

from __future__ import annotations

from pathlib import Path

import torch

from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.configs import llm_config, preprocessing
from mobilemllm.models.importers.files import read_weights
from mobilemllm.models.importers.keys import check_unexpected, map_keys
from mobilemllm.models.importers.plan import V, Plan
from mobilemllm.models.importers.towers import load_tower_folder, vision_from_hf


def plan_llava_hf(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> Plan:
    """Map a LLaVA-HF folder's keys (any layout) onto ours, the tower config from its ``vision_config``."""
    from transformers import AutoConfig

    where = str(src / "config.json")
    errors: list[str] = []
    plan = Plan("llava-hf", src.name)
    missing = [k for k in ("text_config", "vision_config") if not isinstance(config.get(k), dict)]
    if missing:
        raise CheckpointError(f"{where} is missing {', '.join(missing)}")
    text = config["text_config"]
    if text.get("model_type", "llama") != "llama":
        errors.append(f"{where}: text model {text.get('model_type')!r} is not supported (LLaMA only)")
    plan.llm = llm_config(text, where + " text_config", errors, require=False)
    layer = config.get("vision_feature_layer", -2)
    strategy = config.get("vision_feature_select_strategy", "default")
    act = config.get("projector_hidden_act", "gelu")
    if not isinstance(layer, int):
        errors.append(f"{where}: vision_feature_layer {layer!r} (several layers) is not supported; one layer only")
        layer = -2
    if act != "gelu" and not llm_only:
        errors.append(f"{where}: projector_hidden_act {act!r} is not supported (mlp2x_gelu uses exact gelu)")
    extra = dict(select_layer=layer, image_aspect="pad", **preprocessing([src]))
    vision = dict(config["vision_config"])
    vtype = vision.get("model_type", "clip_vision_model")
    try:
        vision_cls = AutoConfig.for_model(vtype).__class__
        hf_vision = vision_cls.from_dict(vision)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: unknown vision_config model_type {vtype!r} ({e})") from None
    plan.vision = None if vision_tower else vision_from_hf(hf_vision, where + " vision_config", errors, **extra)
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
        rules += [("model.vision_tower.", V), ("vision_tower.", V)]
    else:
        drop += ("model.vision_tower.", "vision_tower.")
    state, origin, unexpected = map_keys(source, rules, str(src), drop=drop)
    check_unexpected(unexpected, str(src))
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
        vcfg, vstate, vorigin, vunexpected = load_tower_folder(Path(vision_tower), t_errors, **extra)
        if t_errors:
            raise CheckpointError("cannot use the vision tower: " + "; ".join(t_errors))
        check_unexpected(vunexpected, str(vision_tower))
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
