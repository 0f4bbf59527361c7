"""MobileVLM v1/v2 folders (``MobileLlamaForCausalLM``: a LLaMA config plus ``mm_*`` keys) -> an import plan."""

from __future__ import annotations

from pathlib import Path

from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.configs import llm_config
from mobilemllm.models.importers.files import read_weights
from mobilemllm.models.importers.keys import check_unexpected, map_keys
from mobilemllm.models.importers.plan import MOBILEVLM_TOWER, PROJECTORS, V, Plan
from mobilemllm.models.importers.towers import (is_openai_clip, load_tower_folder, tower_folder_config,
                                                vision_from_weights)


def plan_mobilevlm(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> Plan:
    """Map a MobileVLM folder's keys onto ours; the tower comes from the checkpoint, a folder, or both."""
    plan = Plan("mobilevlm", src.name)
    tower = _read_config(src, config, llm_only, connector, plan)
    tower_name = str(config.get("mm_vision_tower") or config.get("vision_tower") or "")
    # the training machine's local tower path may exist here too: upstream reads the tower's config from it
    tower_dir = Path(tower_name) if tower_name and Path(tower_name).is_dir() else None
    source = read_weights(src)
    has_tower = any(k.startswith(MOBILEVLM_TOWER) for k in source)
    if vision_tower is None and tower_dir is not None and not has_tower:
        vision_tower = tower_dir
    _map_weights(src, source, config, plan, llm_only, vision_tower, has_tower)
    if vision_tower is not None:
        vcfg = _tower_from_folder(Path(vision_tower), plan, tower)
    else:
        vcfg = _embedded_tower(src, plan, tower_name, tower_dir, has_tower, tower)
    _check_tower(src, config, plan, vcfg, tower_name, llm_only)
    plan.vision = vcfg
    return plan


def _read_config(src: Path, config: dict, llm_only: bool, connector: str, plan: Plan) -> dict:
    """The LLM, the connector and the tower's feature settings from config.json, into ``plan``; every
    problem of the file is collected into one error, before any weights are read. Returns the tower's
    settings (feature layer, image aspect) that the vision config takes."""
    where = str(src / "config.json")
    errors: list[str] = []
    plan.llm = llm_config(config, where, errors)
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
    if aspect != "pad":
        plan.notes.append(f"image_aspect_ratio {aspect!r}: images are stretched to a square (our 'resize')")
    if errors:
        raise CheckpointError("cannot import " + str(src) + ": " + "; ".join(errors))
    return dict(select_layer=int(config.get("mm_vision_select_layer", -2)),
                image_aspect="pad" if aspect == "pad" else "resize")


def _map_weights(src: Path, source: dict, config: dict, plan: Plan, llm_only: bool, vision_tower: Path | None,
                 has_tower: bool) -> None:
    """The checkpoint's tensors under our names, into ``plan``. The projector is dropped with --llm-only
    (a fresh connector is built) and the embedded tower when a tower folder replaces it."""
    rules = [("model.embed_tokens.", "llm.model.embed_tokens."), ("model.layers.", "llm.model.layers."),
             ("model.norm.", "llm.model.norm."), ("lm_head.", "llm.lm_head.")]
    if not llm_only:
        rules.append(("model.mm_projector.model.", "connector.") if config.get("mm_projector_type") == "ldpnet"
                     else ("model.mm_projector.", "connector."))
    drop: tuple[str, ...] = ("model.mm_projector.",) if llm_only else ()
    if vision_tower is not None:
        drop += (MOBILEVLM_TOWER,)
        if has_tower:
            plan.notes.append(f"vision tower weights taken from {vision_tower}; the checkpoint's own copy was ignored")
    else:
        rules.append((MOBILEVLM_TOWER, V))
    plan.state, plan.origin, unexpected = map_keys(source, rules, str(src), drop=drop)
    check_unexpected(unexpected, str(src))


def _tower_from_folder(folder: Path, plan: Plan, tower: dict):
    """The vision tower's config and weights from a local CLIP folder (--vision-tower, or the one config.json
    names when it exists here)."""
    errors: list[str] = []
    vcfg, vstate, vorigin, vunexpected = load_tower_folder(folder, errors, **tower)
    if errors:
        raise CheckpointError("cannot use the vision tower: " + "; ".join(errors))
    check_unexpected(vunexpected, str(folder))
    plan.state.update(vstate)
    plan.origin.update(vorigin)
    plan.vision_source = str(folder)
    return vcfg


def _embedded_tower(src: Path, plan: Plan, tower_name: str, tower_dir: Path | None, has_tower: bool, tower: dict):
    """The config of the tower whose weights the checkpoint holds: from the tower folder config.json names
    when it exists here (as upstream does), else inferred from the weights of an OpenAI CLIP; with no tower
    weights at all, one error saying which tower to download."""
    if has_tower and tower_dir is not None:
        # upstream builds CLIPVisionModel from this folder's config, then loads the checkpoint's weights into it
        errors: list[str] = []
        vcfg = tower_folder_config(tower_dir, errors, **tower)
        if errors:
            raise CheckpointError("cannot use the vision tower: " + "; ".join(errors))
        plan.vision_source = f"{src.name} (embedded; config from {tower_dir})"
        return vcfg
    if has_tower:
        if tower_name and not is_openai_clip(tower_name):
            raise CheckpointError(
                f"{src / 'config.json'}: mm_vision_tower {tower_name!r} is not an OpenAI CLIP, so its config cannot "
                "be inferred from the weights alone; pass --vision-tower with that tower's local folder")
        vcfg = vision_from_weights(plan.state, str(src), tower_name, **tower)
        plan.vision_source = f"{src.name} (embedded; config inferred from the weights, 64-dim heads as OpenAI CLIP)"
        plan.notes.append(f"vision tower config inferred from the weights of {tower_name or 'the checkpoint'}: "
                          f"{vcfg.num_layers}L x {vcfg.hidden_size}, {vcfg.image_size}px/{vcfg.patch_size}")
        return vcfg
    hint = f" (the tower named in config.json is {tower_name!r})" if tower_name else ""
    raise CheckpointError(
        f"{src} has no vision tower weights ({MOBILEVLM_TOWER}vision_model.*) and no --vision-tower was given"
        f"{hint}; download the tower, e.g. `hf download {tower_name or 'openai/clip-vit-large-patch14-336'} "
        f"--local-dir clip`, and pass --vision-tower clip")


def _check_tower(src: Path, config: dict, plan: Plan, vcfg, tower_name: str, llm_only: bool) -> None:
    """The tower must be the one the model was trained with: a CLIP, as wide as ``mm_hidden_size``, and (for
    v2's projector) a 24x24 patch grid, which is all our LDPv2 reproduces."""
    if vcfg.kind != "clip":
        raise CheckpointError(f"MobileVLM expects a CLIP vision tower; {plan.vision_source} is {vcfg.kind}")
    if "mm_hidden_size" in config and int(config["mm_hidden_size"]) != vcfg.hidden_size:
        raise CheckpointError(
            f"the vision tower {plan.vision_source} is {vcfg.hidden_size} wide but {src / 'config.json'} has "
            f"mm_hidden_size {config['mm_hidden_size']}: that tower is not the one this model was trained with "
            f"(it names {tower_name or 'none'})")
    if plan.connector == "ldpv2" and not llm_only and vcfg.grid != 24:
        raise CheckpointError(
            f"MobileVLM v2's projector pools to a fixed 12x12 grid, which our LDPv2 (2x2 average pooling) matches only "
            f"for a 24x24 patch grid; this tower gives {vcfg.grid}x{vcfg.grid} "
            f"({vcfg.image_size}px / {vcfg.patch_size})")
