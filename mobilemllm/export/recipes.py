"""Export recipes: one YAML file per target in the top-level ``export/`` folder.

The folder ships inside the wheel as the package ``mobilemllm.export_recipes`` (see setup.py); in a
source checkout it is read from the repository. A recipe names its ``format`` (executorch | onnx |
coreml); the export command hands it to ``mobilemllm.export.pipeline.export_bundle``.

Each format's keys and their types are the schema classes below (pydantic, unknown keys refused); the
values are then checked by the format's own rules (quantization schemes, backends, QNN SoCs). Every
problem is one part of a single error line. A new recipe key is a field of its format's class here,
read by that format's module.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from mobilemllm.bundle.layout import FORMATS  # the bundle formats are the recipe formats
from mobilemllm.errors import ConfigError
from mobilemllm.export.pipeline import check_recipe
from mobilemllm.overrides import Int, Number, Section, error_messages



class Parity(Section):
    """Parity at export against the eager float model (defaults per format)."""

    greedy_tokens: Int | None = Field(None, ge=1)
    max_rel_diff: Number | None = Field(None, gt=0)  # fp32 parts: logits max relative difference
    min_logit_cosine: Number | None = Field(None, ge=-1, le=1)  # quantized parts


class ExportRecipe(Section):
    name: str | None = None  # default: the file's name
    format: Literal[FORMATS]
    description: str | None = None
    parity: Parity | None = None


class ExecuTorchRecipe(ExportRecipe):
    backend: str = "xnnpack"  # mobilemllm.export.executorch.BACKENDS
    max_context_len: Int | None = Field(None, ge=1)  # null: the model's context
    max_seq_len: Int | None = Field(None, ge=1)  # most tokens per prefill call
    kv_cache: str | None = None  # fp32 | int8
    quantization: dict[str, str | dict[str, Any]] | None = None  # part -> scheme or {scheme, group_size}
    soc_model: str | None = None  # backend: qnn only
    calibration_steps: Int | None = Field(None, ge=0)  # backend: qnn only


class OnnxRecipe(ExportRecipe):
    decoder: str = "torch"  # auto | torch | genai
    quantization: str | dict[str, Any] | None = None  # one scheme, or per part (mobilemllm.export.onnx)


class CoreMLParity(Section):
    greedy_tokens: Int | None = Field(None, ge=1)
    min_logit_cosine: Number | None = Field(None, ge=-1, le=1)


class CoreMLRecipe(ExportRecipe):
    compression: str = "fp16"  # fp16 | int8 | int4 | palettize4
    block_size: Int = 32
    parity: CoreMLParity | None = None


class GgufRecipe(ExportRecipe):
    quantization: str | dict[str, Any] | None = None  # f16 | q8_0 | q4_0 | q4_k_m (mobilemllm.export.gguf)


SCHEMAS: dict[str, type[ExportRecipe]] = {"executorch": ExecuTorchRecipe, "onnx": OnnxRecipe,
                                          "coreml": CoreMLRecipe, "gguf": GgufRecipe}
QNN_ONLY = ("soc_model", "calibration_steps")


def _recipe_files() -> dict[str, Any]:
    """{target name: a readable file (importlib Traversable or Path)} for every shipped recipe."""
    found: dict[str, Any] = {}
    try:
        root = resources.files("mobilemllm.export_recipes")
        for entry in root.iterdir():
            if entry.name.endswith(".yaml"):
                found[entry.name[:-5]] = entry
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    repo = Path(__file__).resolve().parents[2] / "export"
    if repo.is_dir():
        for p in repo.glob("*.yaml"):
            found.setdefault(p.stem, p)
    return found


def targets() -> list[str]:
    return sorted(_recipe_files())


def parse_recipe(text: str, source: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {source} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {source} must be a YAML mapping (name:, format:, ...)")
    errors = _schema_errors(recipe)
    fmt = recipe.get("format")
    if errors:  # keys and types first: the value checks below assume them
        raise ConfigError(f"invalid recipe {source}: " + "; ".join(errors))
    errors = check_recipe(recipe)[1]  # the format's rules and the quantization registry, as export's preflight
    if fmt == "executorch":  # part: scheme -> part: {scheme: ...}
        quant = recipe.get("quantization") or {}
        recipe["quantization"] = {p: (s if isinstance(s, dict) else {"scheme": s}) for p, s in quant.items()}
    if errors:
        raise ConfigError(f"invalid recipe {source}: " + "; ".join(errors))
    recipe.setdefault("name", Path(source).stem)
    return recipe


def _schema_errors(recipe: dict[str, Any]) -> list[str]:
    """Unknown keys and wrong types for the recipe's format (the format itself first)."""
    fmt = recipe.get("format")
    if fmt is None:
        return [f"format is required (one of {', '.join(FORMATS)})"]
    if fmt not in FORMATS:
        return [f"format must be one of {', '.join(FORMATS)}, got {fmt!r}"]
    schema = SCHEMAS[fmt]
    errors, data = [], dict(recipe)
    if fmt == "onnx" and "providers" in data:  # chosen where the bundle runs, not when it is written
        data.pop("providers")
        errors.append("providers is not an export setting: pick ONNX Runtime execution providers when running "
                      "(mobilemllm generate --providers ...)")
    if fmt == "executorch" and data.get("backend", "xnnpack") != "qnn":
        errors.extend(f"{k} applies to backend: qnn only" for k in QNN_ONLY if k in data)
    try:
        schema.model_validate(data)
    except ValidationError as e:
        errors.extend(error_messages(e, data, schema))
    return errors


def load_recipe(target: str | None = None, path: str | Path | None = None) -> dict[str, Any]:
    """A shipped target's recipe, or a recipe file (``--recipe``); unknown names list the valid ones."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist; start from one of the shipped recipes "
                              f"({', '.join(targets())}) in the export/ folder")
        return parse_recipe(p.read_text(), str(p))
    files = _recipe_files()
    if target not in files:
        raise ConfigError(f"unknown target {target!r}; valid targets: {', '.join(sorted(files))}")
    return parse_recipe(files[target].read_text(), f"{target}.yaml")
