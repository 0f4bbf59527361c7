"""The import itself: plan by format, check every tensor against our model, write the checkpoint folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilemllm.config import ConnectorConfig, ModelConfig
from mobilemllm.errors import CheckpointError, ConfigError, UserError
from mobilemllm.models.checkpoint import save_checkpoint
from mobilemllm.models.connectors import CONNECTORS, build_connector
from mobilemllm.models.importers.files import detect_format, read_json
from mobilemllm.models.importers.keys import shown, source_name
from mobilemllm.models.importers.llama import plan_llama
from mobilemllm.models.importers.llava_hf import plan_llava_hf
from mobilemllm.models.importers.mobilevlm import plan_mobilevlm
from mobilemllm.models.importers.plan import SOURCE_LAYOUTS, IMPORT_INFO_NAME, MOBILEVLM_TOWER, TEMPLATE, Plan, V
from mobilemllm.models.importers.tokenizer import load_source_tokenizer
from mobilemllm.models.vlm import MobileVLM

PLANNERS = {"mobilevlm": plan_mobilevlm, "llava-hf": plan_llava_hf, "llama": plan_llama}


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
    if format not in SOURCE_LAYOUTS:
        raise ConfigError(f"unknown format {format!r}; valid formats: {', '.join(SOURCE_LAYOUTS)}")
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
    plan = PLANNERS[fmt](src, config, Path(vision_tower) if vision_tower else None, llm_only, connector)
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


def _check_and_assign(model, plan: Plan, src: Path) -> None:
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
        names = [source_name(k, rules) for k in missing]
        problems.append(f"{len(missing)} missing tensor(s): {shown(names)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {shown([plan.origin[k] for k in unexpected])}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape for the config: {shown(mismatched, 5)}")
    if problems:
        raise CheckpointError(f"{src} does not match its config.json: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def _rules_for_names(plan: Plan) -> list[tuple[str, str]]:
    """Source-side names for our keys, to name missing tensors as the user's files would."""
    if plan.fmt == "mobilevlm":
        return [("model.mm_projector.model." if plan.connector == "ldp" else "model.mm_projector.", "connector."),
                (MOBILEVLM_TOWER + "vision_model.", V), ("lm_head.", "llm.lm_head."), ("model.", "llm.model.")]
    if plan.fmt == "llava-hf":
        used = set(plan.origin.values())
        new = any(k.startswith("model.language_model.") for k in used)
        if new:
            return [("model.vision_tower.", V), ("model.multi_modal_projector.linear_1.", "connector.0."),
                    ("model.multi_modal_projector.linear_2.", "connector.2."), ("model.language_model.", "llm.model."),
                    ("lm_head.", "llm.lm_head.")]
        tower = "vision_tower.vision_model." if any(k.startswith("vision_tower.vision_model.") for k in used) \
            else "vision_tower."
        return [(tower, V), ("multi_modal_projector.linear_1.", "connector.0."),
                ("multi_modal_projector.linear_2.", "connector.2."), ("language_model.model.", "llm.model."),
                ("language_model.lm_head.", "llm.lm_head.")]
    return [("model.", "llm.model."), ("lm_head.", "llm.lm_head."), ("vision_model.", V)]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
