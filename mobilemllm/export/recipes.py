"""Export recipes: one YAML file per target in the top-level ``export/`` folder.

The folder ships inside the wheel as the package ``mobilemllm.export_recipes`` (see setup.py); in a
source checkout it is read from the repository. A recipe names its ``format`` (executorch | onnx |
coreml); the export command calls ``mobilemllm.export.<format>.export_<format>(model, tokenizer, recipe,
out_dir, source=..., force=..., log=...)`` -- and ``preflight(recipe)`` first when that module has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilemllm.errors import ConfigError

FORMATS = ("executorch", "onnx", "coreml")


def _recipe_files() -> dict[str, Any]:
    """{target name: a readable file (importlib Traversable or Path)} for every shipped recipe."""
    found: dict[str, Any] = {}
    try:
        from importlib.resources import files

        root = files("mobilemllm.export_recipes")
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
    import yaml

    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {source} is not valid YAML: {e}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {source} must be a YAML mapping (name:, format:, ...)")
    errors = []
    fmt = recipe.get("format")
    if fmt not in FORMATS:
        errors.append(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "executorch":
        from mobilemllm.export.executorch import BACKENDS
        from mobilemllm.export.quantize import PART_SCHEMES, check_scheme

        if recipe.get("backend", "xnnpack") not in BACKENDS:
            errors.append(f"backend {recipe.get('backend')!r} is not one of {', '.join(BACKENDS)}")
        quant = recipe.get("quantization") or {}
        if not isinstance(quant, dict):
            errors.append("quantization must map parts (" + ", ".join(PART_SCHEMES) + ") to {scheme: ...}")
        elif recipe.get("backend") == "qnn":  # QNN's PT2E schemes (16a4w, 8a8w, ...) and soc_model
            from mobilemllm.export.qnn import check_recipe

            errors.extend(check_recipe(recipe))
            recipe["quantization"] = {p: (s if isinstance(s, dict) else {"scheme": s}) for p, s in quant.items()}
        else:
            for part, spec in quant.items():
                try:
                    check_scheme(part, spec if isinstance(spec, dict) else {"scheme": spec})
                except ConfigError as e:
                    errors.append(str(e))
            recipe["quantization"] = {p: (s if isinstance(s, dict) else {"scheme": s}) for p, s in quant.items()}
        for key in ("max_context_len", "max_seq_len"):
            v = recipe.get(key)
            if v is not None and (not isinstance(v, int) or v < 1):
                errors.append(f"{key} must be a positive integer or null, got {v!r}")
        from mobilemllm.export.export_llama import KV_CACHE_DTYPES

        if recipe.get("kv_cache") not in (None, *KV_CACHE_DTYPES):
            errors.append(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {recipe.get('kv_cache')!r}")
    if errors:
        raise ConfigError(f"invalid recipe {source}: " + "; ".join(errors))
    recipe.setdefault("name", Path(source).stem)
    return recipe


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
