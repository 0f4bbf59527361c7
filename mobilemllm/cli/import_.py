"""`mobilemllm import`: convert a MobileVLM v1/v2, LLaVA-HF (or plain LLaMA) folder into a checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mobilemllm.errors import ConfigError


def import_model(
    src: Path = typer.Argument(..., help="The downloaded model folder (config.json, weights, tokenizer files)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (replaced if it is a checkpoint)."),
    vision_tower: Optional[Path] = typer.Option(
        None, "--vision-tower",
        help="Local CLIP/SigLIP folder: needed when SRC's weights lack the vision tower; overrides them otherwise."),
    format: str = typer.Option("auto", "--format", "-f", help="auto, mobilevlm, llava-hf or llama."),
    llm_only: bool = typer.Option(
        False, "--llm-only/--no-llm-only",
        help="Take only the language model from SRC; the connector starts from random weights."),
    connector: str = typer.Option("ldpv2", "--connector", help="Connector kind for --llm-only (ldpv2, ldp, ...)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fresh connector (--llm-only)."),
) -> None:
    """Import a published checkpoint (MobileVLM v1/v2, LLaVA-HF) into a checkpoint folder, offline."""
    from mobilemllm.models.connectors import CONNECTORS  # lazy: cli startup
    from mobilemllm.models.importers import SOURCE_LAYOUTS, import_checkpoint_with_report  # lazy: cli startup

    if format not in SOURCE_LAYOUTS:
        raise ConfigError(f"unknown --format {format!r}; valid formats: {', '.join(SOURCE_LAYOUTS)}")
    if connector not in CONNECTORS:
        raise ConfigError(f"unknown --connector {connector!r}; valid connectors: {', '.join(sorted(CONNECTORS))}")
    result = import_checkpoint_with_report(src, out, vision_tower=vision_tower, llm_only=llm_only, format=format,
                                           connector=connector, seed=seed)
    typer.echo(f"imported {src} ({result.format}, {result.tensors} tensors) -> {result.path}")
    typer.echo(f"vision tower: {result.vision_source}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"try it: mobilemllm info {result.path}")
