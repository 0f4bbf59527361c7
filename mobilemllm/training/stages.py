"""The stages of the MLLM training recipe (MobileVLM, LLaVA): what trains, what is frozen, which data,
which template and the default hyper-parameters of the published recipes.

A recipe (``mobilemllm/recipes/*.yaml``) overrides the defaults per stage. Each stage starts from the
previous stage's checkpoint folder and writes its own; the alignment stages (``dpo``, ``rm``, ``ppo``) all
start from the instruct checkpoint, so a recipe may run either branch or both
(``[pretrain, instruct, dpo]``, ``[pretrain, instruct, rm, ppo]``, ``[pretrain, instruct, dpo, rm, ppo]``).
``ppo`` also reads the ``rm`` stage's reward model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mobilemllm.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    objective: str  # "lm" (next-token loss on answers), "dpo", "rm" (Bradley-Terry) or "ppo"
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

RM = Stage(
    "rm",
    "reward model: the instruct model with a scalar head on the last token, Bradley-Terry loss on the "
    "preference pairs (InstructGPT)",
    objective="rm", data="dpo.json", template=None,
    trainable={"vision": False, "connector": True, "llm": True}, lr=1e-5, global_batch=64)

PPO = Stage(
    "ppo",
    "RLHF: PPO on answers sampled from the instruct model, rewarded by the rm stage's model minus a "
    "per-token KL penalty against the frozen instruct model",
    objective="ppo", data="dpo.json", template=None,
    trainable={"vision": False, "connector": True, "llm": True}, lr=1e-6, global_batch=64)

STAGES: dict[str, Stage] = {s.name: s for s in (FOUNDATIONS, PRETRAIN, INSTRUCT, DPO, RM, PPO)}
# The order `--stage all` runs; foundations only when the recipe asks for it.
ORDER: tuple[str, ...] = ("foundations", "pretrain", "instruct", "dpo", "rm", "ppo")
# Stages that start from the instruct model (the last stage before them that is not one of these).
ALIGNMENT: frozenset[str] = frozenset({"dpo", "rm", "ppo"})


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
