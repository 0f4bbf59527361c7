"""What an export format implements: the format-specific parts of the pipeline's steps.

:func:`mobilemllm.export.pipeline.export_bundle` runs the steps in this order, for every format::

    check/require (preflight) -> prepare -> modules -> quantize_modules -> convert -> quantize_files
        -> manifest -> parity -> finish

A format is a subclass of :class:`ExportFormat` registered in ``mobilemllm.export.formats.FORMATS``;
the defaults do nothing, so a format implements only what it has (ExecuTorch quantizes modules before
lowering; ONNX and Core ML quantize the converted files). Shared state lives on the :class:`Job`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PARITY_KEYS = ("greedy_tokens", "max_rel_diff", "min_logit_cosine")


@dataclass
class Job:
    """One export: its inputs, the checked quantization plan, and what the steps hand each other."""

    model: Any  # MobileVLM, float32, eval mode
    tokenizer: Any
    recipe: dict[str, Any]
    plan: Any  # mobilemllm.quantization.Plan
    log: Callable[[str], None]
    force: bool = False
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # format-specific keyword options of export_bundle
    staging: Path | None = None  # the bundle folder being written
    state: dict[str, Any] = field(default_factory=dict)  # the format's own values between steps
    qinfo: dict[str, Any] = field(default_factory=dict)  # manifest["quantization"], filled by a quantize step
    t0: float = field(default_factory=time.perf_counter)

    @property
    def parity_recipe(self) -> dict[str, Any]:
        return self.recipe.get("parity") or {}


class ExportFormat:
    """One bundle format: its recipe rules and the format-specific part of each pipeline step."""

    name = ""  # the recipe's ``format``, and manifest["format"]
    label = ""  # the format as messages name it
    recipe_keys: tuple[str, ...] | None = None  # the keys its recipes may have (None: not checked here)
    parity_keys: tuple[str, ...] | None = None  # the keys of its recipes' ``parity`` (None: not checked here)
    image_dtype = "uint8"  # the vision encoder's input (manifest preprocessing)
    default_target = ""  # manifest["target"] when the recipe has no name

    # ---- preflight (before any weights load) ----
    def check(self, recipe: dict[str, Any]) -> list[str]:
        """Problems with the recipe beyond its quantization (the registry checks that), one line each."""
        return []

    def require(self, recipe: dict[str, Any]) -> None:
        """Raise BackendUnavailable when what the recipe needs is not installed here."""

    # ---- the export ----
    def prepare(self, job: Job) -> None:
        """After the weights load, before anything is written: lengths, notes."""

    def modules(self, job: Job) -> dict[str, Any]:
        """The export-ready modules, by program part."""
        raise NotImplementedError

    def quantize_modules(self, job: Job, modules: dict[str, Any]) -> dict[str, Any]:
        """Quantize the modules before conversion (sets ``job.qinfo``); default: as they are."""
        return modules

    def convert(self, job: Job, modules: dict[str, Any]) -> None:
        """Lower or convert the modules and write the model file(s) into ``job.staging``."""
        raise NotImplementedError

    def quantize_files(self, job: Job) -> None:
        """Quantize the converted files in ``job.staging`` (sets ``job.qinfo``); default: nothing."""

    def manifest(self, job: Job) -> dict[str, Any]:
        """Manifest sections beyond (or merged into) the ones every format writes."""
        return {}

    def parity(self, job: Job, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """(checks of the written files against eager, why numbers could not be checked here or None)."""
        return [], None

    def roles(self, job: Job) -> dict[str, str]:
        """manifest["files"] roles of the model files (the rest are "other")."""
        return {}

    def files_summary(self, job: Job, out: Path) -> str:
        """The written model files and their sizes, for the final log line."""
        return ""

    def quant_summary(self, job: Job) -> str:
        return job.plan.summary()


def check_parity_section(recipe: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """A recipe's ``parity`` mapping: only ``keys``, a positive token count, numeric gates."""
    par = recipe.get("parity") or {}
    if not isinstance(par, dict) or set(par) - set(keys):
        return [f"parity takes only {', '.join(keys)}"]
    errors = []
    tokens = par.get("greedy_tokens", 1)
    if not isinstance(tokens, int) or tokens < 1:
        errors.append(f"parity.greedy_tokens must be a positive integer, got {par.get('greedy_tokens')!r}")
    for key in ("max_rel_diff", "min_logit_cosine"):
        if key in par and not isinstance(par[key], (int, float)):
            errors.append(f"parity.{key} must be a number, got {par[key]!r}")
    return errors


def check_keys(recipe: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    unknown = sorted(set(recipe) - set(keys))
    return [f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(keys)})"] if unknown else []
