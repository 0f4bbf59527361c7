"""A plain LLaMA causal LM (MobileLLaMA) plus a tower folder -> an import plan (``llm_only`` only)."""

from __future__ import annotations

from pathlib import Path

from mobilemllm.errors import CheckpointError
from mobilemllm.models.importers.configs import llm_config
from mobilemllm.models.importers.files import read_weights
from mobilemllm.models.importers.keys import check_unexpected, map_keys
from mobilemllm.models.importers.plan import Plan
from mobilemllm.models.importers.towers import load_tower_folder


def plan_llama(src: Path, config: dict, vision_tower: Path | None, llm_only: bool, connector: str) -> Plan:
    """Take a plain LLaMA's weights as our language model; the tower must come from a folder."""
    if not llm_only:
        raise CheckpointError(f"{src} is a plain LLaMA model with no vision parts; to build a VLM around it pass "
                              "--llm-only and --vision-tower CLIP_FOLDER (the connector then starts from random "
                              "weights)")
    if vision_tower is None:
        raise CheckpointError(f"{src} has no vision tower; pass --vision-tower with a local CLIP/SigLIP folder")
    errors: list[str] = []
    plan = Plan("llama", src.name)
    plan.llm = llm_config(config, str(src / "config.json"), errors)
    plan.connector = connector
    vcfg, vstate, vorigin, vunexpected = load_tower_folder(Path(vision_tower), errors, select_layer=-2,
                                                            image_aspect="pad")
    if errors:
        raise CheckpointError("cannot import " + str(src) + ": " + "; ".join(errors))
    check_unexpected(vunexpected, str(vision_tower))
    rules = [("model.", "llm.model."), ("lm_head.", "llm.lm_head.")]
    state, origin, unexpected = map_keys(read_weights(src), rules, str(src))
    check_unexpected(unexpected, str(src))
    plan.state, plan.origin = {**state, **vstate}, {**origin, **vorigin}
    plan.vision, plan.vision_source = vcfg, str(vision_tower)
    return plan
