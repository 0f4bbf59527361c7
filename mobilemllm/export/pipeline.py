"""The export pipeline, one for every format:

    preflight -> load -> modules -> quantize -> lower/convert -> parity -> manifest -> finish

:func:`preflight` checks the whole recipe (the format's keys, and its quantization through the one
registry, :mod:`mobilemllm.quantization`) and that the format's backend is installed -- before any weights
load. :func:`export_bundle` then runs the format's steps (:class:`mobilemllm.export.plugin.ExportFormat`,
registered in ``FORMATS``) inside a staging folder, gates the bundle on its parity against the eager
model (``--force`` writes it anyway, marked), and renames the folder into place; on any error nothing
is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mobilemllm import api, bundle as B, quantization as Q
from mobilemllm.data.cpp_tokenizer import cpp_compatible
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.export import manifest_sections as S, parity as P
from mobilemllm.export.formats import FORMATS
from mobilemllm.export.plugin import ExportFormat, Job, check_keys, check_parity_section
from mobilemllm.export.synthetic_tokenizer import synthetic_tokenizer
from mobilemllm.procmem import peak_rss_bytes


def check_recipe(recipe: dict[str, Any]) -> tuple[ExportFormat, list[str]]:
    """The recipe's format plug-in and every problem with the recipe (keys, parity, quantization)."""
    name = recipe.get("format")
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ConfigError(f"unknown export format {name!r}; valid: {', '.join(FORMATS)}")
    errors = check_keys(recipe, fmt.recipe_keys) if fmt.recipe_keys else []
    if fmt.parity_keys:
        errors += check_parity_section(recipe, fmt.parity_keys)
    errors += fmt.check(recipe)
    errors += Q.check(recipe)
    return fmt, list(dict.fromkeys(errors))


def preflight(recipe: dict[str, Any]) -> ExportFormat:
    """Check ``recipe`` and its backend before any work: ConfigError naming every problem on one line,
    BackendUnavailable when the backend is missing here. Returns the format plug-in."""
    fmt, errors = check_recipe(recipe)
    if errors:
        raise ConfigError(f"invalid {fmt.label} recipe {recipe.get('name', '')!r}: " + "; ".join(errors))
    fmt.require(recipe)
    return fmt


def export_bundle(model, recipe: dict[str, Any], out: str | Path, *, tokenizer=None, source: str | None = None,
                  force: bool = False, log: Callable[[str], None] = print, **options: Any) -> Path:
    """Export ``model`` (a checkpoint folder, run folder or preset name -- loaded after the preflight -- or
    a loaded model with ``tokenizer``) as ``recipe`` says, into the bundle folder ``out``.

    ``options`` go to the format (ONNX: ``fp32_graphs`` reuses graphs from ``export_graphs``)."""
    fmt = preflight(recipe)
    B.check_out_dir(out)
    _check_model(fmt, model)
    model, tokenizer, source = _load(model, tokenizer, source, log)
    job = Job(model=model.float().eval(), tokenizer=tokenizer, recipe=recipe, plan=Q.resolve(recipe), log=log,
              force=force, source=source, options=options)
    fmt.prepare(job)
    job.staging = B.new_bundle_dir(out)
    try:
        modules = fmt.quantize_modules(job, fmt.modules(job))
        fmt.convert(job, modules)
        del modules
        fmt.quantize_files(job)
        tokenizer.save_pretrained(job.staging / B.TOKENIZER_DIR)
        manifest = _manifest(fmt, job)
        manifest["parity"] = _parity(fmt, job, manifest)
        manifest["export"]["seconds"] = round(time.perf_counter() - job.t0, 2)
        manifest["export"]["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        written = B.finish_bundle(job.staging, out, manifest, fmt.roles(job))
    except BaseException:
        B.discard(job.staging)
        raise
    _report(fmt, job, written, manifest["parity"])
    return written


def _check_model(fmt: ExportFormat, model) -> None:
    """A format that cannot run some model configs (gguf: llama.cpp's projectors) refuses them here, from
    the config alone, before the weights load."""
    check = getattr(fmt, "check_model", None)
    if check is None:
        return

    config = model.config if not isinstance(model, (str, Path)) else api.load_config(model)
    problems = check(config)
    if problems:
        raise ConfigError(f"cannot export to {fmt.name.upper()}: " + "; ".join(problems))


def _load(model, tokenizer, source: str | None, log: Callable[[str], None]):
    """(model, tokenizer, source): a loaded model as given, else the checkpoint/preset ``model`` names."""
    if not isinstance(model, (str, Path)):
        if tokenizer is None:
            raise UserError("the model has no tokenizer; export a checkpoint folder that contains tokenizer.json")
        # a tokenizer handed in directly (not loaded from a folder, where this already happens) is rewritten
        # where ExecuTorch's C++ tokenizer cannot read it as it is (sentencepiece-style Metaspace)

        return model, cpp_compatible(tokenizer), source

    loaded, tokenizer = api.load(model)
    if tokenizer is None:
        vocab = loaded.config.llm.vocab_size
        tokenizer = synthetic_tokenizer(vocab)
        log(f"note: {model} has no tokenizer; using a synthetic {vocab}-token tokenizer (fine for benchmarks of "
            "random weights, not for real text)")
    return loaded, tokenizer, source or str(model)


def _manifest(fmt: ExportFormat, job: Job) -> dict[str, Any]:
    """The sections every format writes, merged with the format's own (mappings merge key by key)."""
    model, tok, cfg = job.model, job.tokenizer, job.model.config
    ctx = cfg.llm.max_position_embeddings
    manifest: dict[str, Any] = {
        "schema_version": B.SCHEMA_VERSION,
        "format": fmt.name,
        "target": job.recipe.get("name", fmt.default_target),
        "model": S.model_section(model, job.source),
        "tokenizer": S.tokenizer_section(tok, cfg.llm.vocab_size),
        "prompt": S.prompt_section(cfg, tok),
        "preprocessing": S.preprocessing_section(cfg.vision, fmt.image_dtype, True),
        "context": {"max_seq_len": ctx, "max_context_len": ctx},
        "quantization": job.qinfo,
        "parity": P.summarize([]),
        "export": {"recipe": dict(job.recipe), "versions": S.versions()},
    }
    for key, value in fmt.manifest(job).items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    return manifest


def _parity(fmt: ExportFormat, job: Job, manifest: dict[str, Any]) -> dict[str, Any]:
    """manifest["parity"]: the format's checks; a failed gate stops the export unless ``force``."""
    checks, skipped = fmt.parity(job, manifest)
    for c in checks:
        job.log(f"parity {c['name']}: {c['value']}" + (f" (needs {c['threshold']})" if c["threshold"] is not None
                                                      else ""))
    result = P.summarize(checks, forced=job.force, skipped_reason=skipped)
    if not result["passed"]:
        msg = f"{fmt.label} export failed parity against eager: " + "; ".join(P.failures(result))
        if not job.force:
            raise UserError(msg + ". Nothing was written; re-run with --force to write the bundle anyway (it is "
                            "marked as failing parity in its manifest)")
        job.log("warning: " + msg + " (written anyway because of --force)")
    return result


def _report(fmt: ExportFormat, job: Job, out: Path, parity: dict[str, Any]) -> None:
    files = fmt.files_summary(job, out)
    tail = (f"; {parity['skipped_reason']}" if parity["skipped_reason"] else
            f"; run it with `mobilemllm generate --bundle {out} --image IMG --prompt TEXT`")
    job.log(f"{fmt.label} bundle ({fmt.quant_summary(job)}) written to {out}" + (f": {files}" if files else "")
            + f" in {time.perf_counter() - job.t0:.1f} s, peak RSS {_peak_rss_mb() / 1024:.2f} GB" + tail)


def _peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20
