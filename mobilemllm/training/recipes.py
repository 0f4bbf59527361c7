"""Training recipes: YAML files shipped in ``mobilemllm/recipes/`` (or any path), with ``key=value``
overrides (``instruct.lr=1e-4``, ``stages=[pretrain,instruct]``).

A recipe's top-level keys::

    model: tiny                 # preset name or checkpoint folder the first stage starts from
    model_overrides: {}         # ModelConfig overrides (e.g. vision.pretrained_path for a local CLIP)
    tokenizer: null             # tokenizer folder; null: the checkpoint's, or the tiny preset's BPE
    data: null                  # folder of LLaVA-format files; null: write the synthetic shapes world
    eval_data: null             # folder of evaluation files; null: the synthetic held-out split
    synthetic: {...}            # the synthetic world (when data is null): split sizes, hallucination_rate,
                                #   caption_order (quadrant | shuffled), reading_docs, yes_no_lookups
    stages: [...]               # what `--stage all` runs, in order
    seed                        # default for every stage
    num_threads                 # CPU threads per process: an int or auto
    foundations: {text: {...}, vision: {...}}   # TrainConfig sections
    pretrain / instruct / dpo: {TrainConfig keys + data, image_folder, template, train_vision,
                                train_connector, train_llm, beta, lora}
    eval: {limit, batch_size, caption_tokens}
"""

from __future__ import annotations

import copy
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mobilemllm.errors import ConfigError
from mobilemllm.training.stages import ORDER
from mobilemllm.training.trainer import TrainConfig

TOP_KEYS = {"model", "model_overrides", "tokenizer", "data", "eval_data", "synthetic", "stages", "seed",
            "num_threads", "foundations", "pretrain", "instruct", "dpo", "eval", "name"}
STAGE_EXTRA = {"data", "image_folder", "template", "train_vision", "train_connector", "train_llm", "beta", "lora",
               "max_length", "curriculum_data"}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "merge"}
# foundations.vision keys that are not TrainConfig fields: what the contrastive image embedding is built from
IMAGE_FEATURES = ("quadrant_mean", "patches")


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


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. instruct.lr=1e-4)")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    # YAML reads "1e-4" as a string; accept it as a number.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip().split("."), parsed


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    recipe = copy.deepcopy(recipe)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = recipe
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return recipe


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe, apply overrides, and check it (every problem reported at once)."""
    path = recipe_path(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    recipe = apply_overrides(recipe, overrides or [])
    recipe.setdefault("name", path.stem)
    validate_recipe(recipe, str(path))
    return recipe


def validate_recipe(recipe: dict[str, Any], where: str = "recipe") -> None:
    errors: list[str] = []
    unknown = sorted(set(recipe) - TOP_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(TOP_KEYS))})")
    stages = recipe.get("stages") or []
    bad = [s for s in stages if s not in ORDER]
    if bad:
        errors.append(f"unknown stage(s) {', '.join(map(str, bad))}; valid: {', '.join(ORDER)}")
    for name in ("pretrain", "instruct", "dpo"):
        try:
            stage_train_config(recipe, name)
        except ConfigError as e:
            errors.append(str(e))
    for part in ("text", "vision"):
        try:
            foundations_config(recipe, part)
        except ConfigError as e:
            errors.append(str(e))
    try:
        foundations_image_features(recipe)
    except ConfigError as e:
        errors.append(str(e))
    lora = (recipe.get("instruct") or {}).get("lora")
    if lora:
        if not isinstance(lora, dict):
            errors.append("instruct.lora must be a mapping (r, alpha, dropout, target_modules, merge) or null")
        elif set(lora) - LORA_KEYS:
            errors.append(f"instruct.lora: unknown key(s) {', '.join(sorted(set(lora) - LORA_KEYS))}")
    if errors:
        raise ConfigError(f"{where}: " + "; ".join(errors))


def _defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    d = {}
    for key in ("seed",):
        if recipe.get(key) is not None:
            d[key] = recipe[key]
    return d


def stage_train_config(recipe: dict[str, Any], stage: str) -> TrainConfig:
    from mobilemllm.training.stages import get_stage

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


TRAIN_KEYS = sorted(f.name for f in fields(TrainConfig))
