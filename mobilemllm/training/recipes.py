"""Training recipes: YAML files shipped in ``mobilemllm/recipes/`` (or any path), with ``key=value``
overrides (``instruct.lr=1e-4``, ``stages=[pretrain,instruct]``, ``name=007``).

The schema is :class:`Recipe` below (pydantic): every key a recipe may hold, its type, default and
bounds. A recipe and its overrides are checked against it before any work starts; every problem is one
part of a single error line (``instruct.lr must be a number, got 'fast'; seed must be an integer, got
'abc'``). See :mod:`mobilemllm.overrides` for how an override's text is read.

A recipe's top-level keys::

    name                        # defaults to the file's name
    model: tiny                 # preset name or checkpoint folder the first stage starts from
    model_overrides: {}         # ModelConfig overrides, presets only (e.g. vision.pretrained_path)
    tokenizer: null             # tokenizer folder; null: the checkpoint's, or the tiny preset's BPE
    data: null                  # folder of LLaVA-format files; null: write the synthetic shapes world
    eval_data: null             # folder of evaluation files; null: the synthetic held-out split
    allow_outside_images: false # let data records name images outside their image folder (mobilemllm.data.dataset)
    synthetic: {...}            # the synthetic world (when data is null): see Synthetic
    stages: [...]               # what `--stage all` runs, in order
    seed                        # default for every stage
    num_threads                 # CPU threads per process: an int >= 1 or auto
    foundations: {text: {...}, vision: {...}}   # TrainConfig sections (+ vision.image_features)
    pretrain / instruct / dpo / rm / ppo: {TrainConfig keys + data, image_folder, template, train_vision,
                                train_connector, train_llm; pretrain/instruct: max_length, curriculum_data;
                                instruct: lora; dpo: beta; rm: eval_pairs; ppo: reward_model + PPOConfig}
    eval: {limit, batch_size, answer_tokens, caption_tokens, image_folder}

Adding a key: an optimisation setting is a field of ``TrainConfig`` (trainer.py; every stage section and
foundations section takes it, with its bound in ``TRAIN_RULES`` here); a stage option is a field of the
stage's section class below, read in pipeline.py through :func:`stage_options`; a model setting is a
field of the ModelConfig dataclasses (config.py), which ``model_overrides`` follows by itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, Field, field_validator

from mobilemllm.config import PRESETS, ModelConfig, override_schema
from mobilemllm.data.shapes import QUESTION_WORDINGS
from mobilemllm.errors import ConfigError
from mobilemllm.overrides import Bool, Int, Number, Section, apply_overrides, section_from_dataclass, show, validate
from mobilemllm.templates import TEMPLATES
from mobilemllm.training.stages import ORDER, get_stage
from mobilemllm.training.trainer import PRECISIONS, TrainConfig

# foundations.vision keys that are not TrainConfig fields: what the contrastive image embedding is built from
IMAGE_FEATURES = ("quadrant_mean", "patches")


# Bounds of the TrainConfig fields (names, types and defaults come from the dataclass itself).
TRAIN_RULES = {
    "lr": Field(gt=0), "connector_lr": Field(gt=0), "weight_decay": Field(ge=0), "adam_beta2": Field(gt=0, lt=1),
    "global_batch": Field(ge=1),
    "micro_batch": Field(ge=1), "micro_batch_tokens": Field(ge=1), "epochs": Field(ge=0), "max_steps": Field(ge=1),
    "warmup_ratio": Field(ge=0, lt=1), "warmup_steps": Field(ge=0),
    "min_lr_ratio": Field(ge=0, le=1), "max_grad_norm": Field(gt=0), "seed": Field(ge=0), "save_every": Field(ge=0),
    "log_every": Field(ge=1), "num_threads": Field(ge=1), "curriculum_steps": Field(ge=0),
}
TrainSection = section_from_dataclass(TrainConfig, "TrainSection", rules=TRAIN_RULES,
                                      choices={"precision": PRECISIONS})


def _files(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise ValueError(f"must be a file name or a list of file names, got {show(value)}")


def _merged(value: Any) -> Any:
    if value is not True:
        raise ValueError(f"must be true (LoRA adapters are merged into the stage's checkpoint and also saved in "
                         f"logs/instruct/lora_adapter), got {show(value)}")
    return value


Files = Annotated[Union[str, list[str], None], BeforeValidator(_files)]  # file(s) relative to the data folder


def _template(value: str | None) -> str | None:
    if value is not None and value not in TEMPLATES:
        raise ValueError(f"must be one of {', '.join(TEMPLATES)}, got {show(value)}")
    return value


class Lora(Section):
    """``instruct.lora``: train LoRA adapters on the LLM instead of its weights (needs peft)."""

    r: Int = Field(8, ge=1)
    alpha: Int = Field(16, ge=1)
    dropout: Number = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # default: every attention and MLP projection
    merge: Annotated[bool, BeforeValidator(_merged)] = True


class StageSection(TrainSection):
    """A stage's section: TrainConfig keys plus what the stage trains on."""

    data: Files = None  # default: the stage's file (stages.py)
    image_folder: str | None = None
    template: Annotated[str | None, BeforeValidator(_template)] = None  # default: the stage's, else the model's
    train_vision: Bool | None = None
    train_connector: Bool | None = None
    train_llm: Bool | None = None


class LMStageSection(StageSection):
    """pretrain / instruct: next-token loss on answers."""

    max_length: Int | None = Field(None, ge=1)  # tokens per sample; longer ones are cut
    curriculum_data: Files = None  # the files (among `data`) the first curriculum_steps draw from


class InstructSection(LMStageSection):
    lora: Lora | None = None


class DPOSection(StageSection):
    beta: Number = Field(0.1, gt=0)
    rpo_alpha: Number = Field(0.0, ge=0)  # weight of the chosen answer's mean token NLL (RPO; 0: plain DPO)


class RMSection(StageSection):
    """rm: the reward model's data is the preference pairs; its held-out pair accuracy is measured on the
    evaluation folder's ``eval_pairs`` file(s)."""

    eval_pairs: Files = None  # default: the evaluation folder's files of the stage's data (dpo.json when none)


class PPOSection(StageSection):
    """ppo: rollout prompts (``data``: preference records or conversations), the reward model, PPO's knobs
    (mobilemllm.training.ppo.PPOConfig)."""

    reward_model: str | None = None  # an rm stage folder; default: <out>/rm
    kl_coef: Number = Field(0.05, ge=0)
    adaptive_kl: Bool = True
    target_kl: Number = Field(1.0, gt=0)
    kl_horizon: Int = Field(1000, ge=1)
    ppo_epochs: Int = Field(2, ge=1)
    clip_range: Number = Field(0.2, gt=0)
    clip_range_value: Number = Field(0.2, gt=0)
    vf_coef: Number = Field(0.1, ge=0)
    gamma: Number = Field(1.0, gt=0, le=1)
    lam: Number = Field(0.95, ge=0, le=1)
    temperature: Number = Field(1.0, gt=0)
    max_new_tokens: Int = Field(64, ge=1)
    missing_eos_penalty: Number | None = None
    whiten_advantages: Bool = True


class FoundationsVision(TrainSection):
    image_features: Literal[IMAGE_FEATURES] = "quadrant_mean"


class Foundations(Section):
    text: TrainSection | None = None  # language-model pretraining on the data's text
    vision: FoundationsVision | None = None  # contrastive pretraining of the vision tower


class Synthetic(Section):
    """The synthetic shapes world written when ``data`` is null (mobilemllm.data.shapes.write_synthetic)."""

    train_images: Int = Field(3000, ge=1)
    eval_images: Int = Field(200, ge=1)
    train_seed: Int = Field(0, ge=0)
    eval_seed: Int = Field(1, ge=0)
    hallucination_rate: Number = Field(0.3, ge=0, le=1)
    single_turn: Bool = False
    question_wordings: Literal[QUESTION_WORDINGS] = "canonical"
    question_copies: Int = Field(1, ge=1)


class Eval(Section):
    """Options of mobilemllm.evaluation.evaluate after each stage."""

    limit: Int | None = Field(None, ge=1)
    batch_size: Int = Field(128, ge=1)
    answer_tokens: Int = Field(8, ge=1)
    caption_tokens: Int = Field(96, ge=1)
    image_folder: str | None = None


def _threads(value: Any) -> Any:
    if value is None or value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f"must be an integer >= 1 or auto, got {show(value)}")


def _stages(value: Any) -> Any:
    if isinstance(value, list):
        bad = [s for s in value if s not in ORDER]
        if bad:
            raise ValueError(f"has unknown stage(s) {', '.join(map(show, bad))} (valid: {', '.join(ORDER)})")
    return value


ModelOverrides = override_schema()


class Recipe(Section):
    """A training recipe (the keys listed in this module's docstring)."""

    name: str | None = None
    model: str = "tiny"
    model_overrides: ModelOverrides | None = None
    tokenizer: str | None = None
    data: str | None = None
    eval_data: str | None = None
    allow_outside_images: Bool = False
    synthetic: Synthetic | None = None
    stages: Annotated[list[str] | None, BeforeValidator(_stages)] = None
    seed: Int | None = Field(None, ge=0)
    num_threads: Annotated[Union[int, Literal["auto"], None], BeforeValidator(_threads)] = None
    foundations: Foundations | None = None
    pretrain: LMStageSection | None = None
    instruct: InstructSection | None = None
    dpo: DPOSection | None = None
    rm: RMSection | None = None
    ppo: PPOSection | None = None
    eval: Eval | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in PRESETS and not Path(value).is_dir():
            raise ValueError(f"must be a preset ({', '.join(sorted(PRESETS))}) or a checkpoint folder, "
                             f"got {show(value)}")
        return value


STAGE_SECTIONS = {"pretrain": LMStageSection, "instruct": InstructSection, "dpo": DPOSection, "rm": RMSection,
                  "ppo": PPOSection}
PPO_KEYS = sorted(set(PPOSection.model_fields) - set(StageSection.model_fields) - {"reward_model"})
TRAIN_KEYS = sorted(TrainSection.model_fields)
# every stage option that is not a TrainConfig key (stage_options returns these)
STAGE_EXTRA = sorted({k for s in STAGE_SECTIONS.values() for k in s.model_fields} - set(TRAIN_KEYS))


# ---- loading --------------------------------------------------------------------------------------
def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("mobilemllm") / "recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"recipe file {p} does not exist; shipped recipes: {', '.join(recipe_names())}")
        return p
    if str(name_or_path) not in recipe_names():
        raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(recipe_names())} "
                          "(or pass a path to a .yaml file)")
    return Path(str(resources.files("mobilemllm") / "recipes" / f"{name_or_path}.yaml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe, apply overrides, and check it (every problem reported at once, before any work)."""
    path = recipe_path(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    recipe.setdefault("name", path.stem)
    errors: list[str] = []
    recipe = apply_overrides(recipe, overrides or [], Recipe, errors)
    return validate_recipe(recipe, f"recipe {name_or_path}", errors)


def validate_recipe(recipe: dict[str, Any], where: str = "recipe", errors: list[str] | None = None) -> dict[str, Any]:
    """The recipe checked against :class:`Recipe`, then the checks that need several keys (TrainConfig's,
    model_overrides applied to the preset); returns a new dict with the values as typed (``"1e-4"`` -> 1e-4),
    only the keys the recipe sets. ``recipe`` itself is not changed. ``errors``: problems found earlier
    (bad overrides), reported with these."""
    typed = validate(Recipe, recipe, where, errors).model_dump(exclude_unset=True)
    errors = []
    for name in STAGE_SECTIONS:
        try:
            stage_train_config(typed, name)
        except ConfigError as e:
            errors.append(str(e))
    for part in ("text", "vision"):
        try:
            foundations_config(typed, part)
        except ConfigError as e:
            errors.append(str(e))
    errors.extend(_model_override_errors(typed))
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))
    return typed


def _model_override_errors(recipe: dict[str, Any]) -> list[str]:
    """What ModelConfig.validate finds in the preset with the recipe's overrides (unknown connector, sizes
    that do not divide); overrides on a checkpoint folder would be ignored, so they are refused."""
    overrides = recipe.get("model_overrides") or {}
    model = recipe.get("model", "tiny")
    if model not in PRESETS:
        return [f"model_overrides apply to a preset; model {model!r} is a checkpoint folder, whose config.json "
                "is used as saved"] if overrides else []
    try:
        ModelConfig.from_preset(model, **overrides)
    except ConfigError as e:
        return [f"model_overrides: {e}"]
    return []


# ---- the parts the pipeline reads -------------------------------------------------------------------
def _defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    return {"seed": recipe["seed"]} if recipe.get("seed") is not None else {}


def stage_train_config(recipe: dict[str, Any], stage: str) -> TrainConfig:
    section = dict(recipe.get(stage) or {})
    st = get_stage(stage)
    base = {"lr": st.lr, "global_batch": st.global_batch, **_defaults(recipe)}
    train = {k: v for k, v in section.items() if k not in STAGE_EXTRA}
    return TrainConfig.from_dict({**base, **train}, where=stage)


def stage_options(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    section = dict(recipe.get(stage) or {})
    return {k: v for k, v in section.items() if k in STAGE_EXTRA}


def foundations_config(recipe: dict[str, Any], part: str) -> TrainConfig:
    section = dict((recipe.get("foundations") or {}).get(part) or {})
    section.pop("image_features", None)
    return TrainConfig.from_dict({**_defaults(recipe), **section}, where=f"foundations.{part}")


def foundations_image_features(recipe: dict[str, Any]) -> str:
    """``foundations.vision.image_features``: ``quadrant_mean`` (default) or ``patches``."""
    value = ((recipe.get("foundations") or {}).get("vision") or {}).get("image_features") or "quadrant_mean"
    if value not in IMAGE_FEATURES:
        raise ConfigError(f"foundations.vision.image_features must be one of {', '.join(IMAGE_FEATURES)}, "
                          f"got {value!r}")
    return value
