"""The stages of the MLLM training recipe (MobileVLM, LLaVA): what trains, what is frozen, which data,
which template and the default hyper-parameters of the published recipes.

A recipe (``mobilemllm/recipes/*.yaml``) overrides the defaults per stage. Each stage starts from the
previous stage's checkpoint folder and writes its own.

Extension point: an ``rlhf`` stage (reward model + PPO with a per-token KL penalty against the
reference) would add ``Stage(name="rlhf", objective="rlhf", ...)`` here and an objective class with
``units(batch)`` / ``loss(model, batch)`` in :mod:`mobilemllm.training.losses` (registered in
``OBJECTIVES``); the trainer loop, checkpoints and resume need no change. It is not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mobilemllm.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    objective: str  # "lm" (next-token loss on answers) or "dpo" (preference pairs)
    data: str  # default data file, relative to the recipe's data folder
    template: str | None  # conversation template; None: the model's chat template
    trainable: dict[str, bool] = field(default_factory=dict)  # part -> trains?
    lr: float = 1e-3
    global_batch: int = 128


FOUNDATIONS = Stage(
    "foundations",
    "contrastive (CLIP-style) pretraining of the vision tower on image-caption pairs + language-model "
    "pretraining of the LLM on the data's text (only for models without pretrained weights, e.g. tiny)",
    objective="foundations", data="pretrain.json", template=None,
    trainable={"vision": True, "connector": False, "llm": True}, lr=1e-3, global_batch=256)

PRETRAIN = Stage(
    "pretrain",
    "modality alignment: connector trained on captions, vision tower and LLM frozen (MobileVLM v1)",
    objective="lm", data="pretrain.json", template="plain",
    trainable={"vision": False, "connector": True, "llm": False}, lr=1e-3, global_batch=256)

INSTRUCT = Stage(
    "instruct",
    "instruction tuning: connector + LLM on conversations, loss on the answers only",
    objective="lm", data="instruct.json", template=None,
    trainable={"vision": False, "connector": True, "llm": True}, lr=2e-5, global_batch=128)

DPO = Stage(
    "dpo",
    "alignment tuning: Direct Preference Optimization against the frozen instruct model",
    objective="dpo", data="dpo.json", template=None,
    trainable={"vision": False, "connector": True, "llm": True}, lr=5e-7, global_batch=64)

STAGES: dict[str, Stage] = {s.name: s for s in (FOUNDATIONS, PRETRAIN, INSTRUCT, DPO)}
# The order `--stage all` runs; foundations only when the recipe asks for it.
ORDER: tuple[str, ...] = ("foundations", "pretrain", "instruct", "dpo")


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; valid stages: {', '.join(ORDER)} (or 'all')")
    return STAGES[name]


def trainable_parts(stage: Stage, train_vision: bool | None = None, train_connector: bool | None = None,
                    train_llm: bool | None = None) -> dict[str, bool]:
    """The stage's trainable parts, with recipe overrides (e.g. ShareGPT4V: unfreeze the vision tower)."""
    parts = dict(stage.trainable)
    for part, flag in (("vision", train_vision), ("connector", train_connector), ("llm", train_llm)):
        if flag is not None:
            parts[part] = bool(flag)
    return parts
