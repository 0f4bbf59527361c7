"""`mobilemllm export`: a checkpoint (or a preset with random weights) -> a bundle folder for a target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mobilemllm import quantization as Q
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.quantization import KV_CACHE_DTYPES, group_help, help_text


def export(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder, a training run folder (its latest "
                                                         "model), or a preset name (random weights)."),
    target: Optional[str] = typer.Option(None, "--target", "-t",
                                         help="android | ios | ios-coreml | android-qnn | portable | onnx | coreml "
                                              "| gguf (the recipes in the export/ folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (replaced atomically if it is a bundle)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe YAML file instead of a shipped target."),
    decoder_quant: Optional[str] = typer.Option(None, help=f"Override the text decoder's scheme "
                                                           f"({help_text('text_decoder')})."),
    embedding_quant: Optional[str] = typer.Option(None, help=f"Override the token embedding's scheme "
                                                             f"({help_text('token_embedding')})."),
    vision_quant: Optional[str] = typer.Option(None, help=f"Override the vision encoder's scheme "
                                                          f"({help_text('vision_encoder')})."),
    group_size: Optional[int] = typer.Option(None, min=0, help=f"Group size for 4-bit weights and embeddings "
                                                                f"({group_help()})."),
    max_context_len: Optional[int] = typer.Option(None, min=8, help="KV-cache length (default: the model's context; "
                                                                  "ExecuTorch targets)."),
    kv_cache: Optional[str] = typer.Option(None, help=f"KV-cache precision of the text decoder: "
                                                        f"{' | '.join(KV_CACHE_DTYPES)} (per-token int8 keys/values, "
                                                        "a quarter of the cache memory; ExecuTorch XNNPACK/portable "
                                                        "targets)."),
    force: bool = typer.Option(False, "--force/--no-force",
                               help="Write the bundle even if parity fails (marked as forced in the manifest)."),
) -> None:
    """Export a model for a phone: quantize, lower, check parity against eager, write the bundle."""
    from mobilemllm.export.pipeline import export_bundle  # lazy: cli startup
    from mobilemllm.export.recipes import load_recipe  # lazy: cli startup

    if (target is None) == (recipe is None):
        raise UserError("give exactly one of --target NAME or --recipe FILE")
    rec = load_recipe(target=target, path=recipe)  # unknown target: fails here, before any weights load
    _apply_overrides(rec, decoder_quant, embedding_quant, vision_quant, group_size, max_context_len, kv_cache)
    # the pipeline checks the recipe (and the backend) before it loads the model
    export_bundle(model, rec, out, force=force, log=lambda s: typer.echo(s, err=True))


def _apply_overrides(rec: dict, decoder: str | None, embedding: str | None, vision: str | None,
                     group_size: int | None, max_context_len: int | None, kv_cache: str | None = None) -> None:
    """Write the command line's choices into the recipe; the export's preflight checks the result."""
    fmt = rec["format"]
    if fmt != "executorch" and kv_cache is not None:
        raise ConfigError(f"--kv-cache applies to ExecuTorch targets, not to {fmt} bundles")
    if fmt != "executorch" and max_context_len is not None:
        raise ConfigError(f"--max-context-len applies to ExecuTorch targets; {fmt} bundles use the model's context "
                          f"({'dynamic sequence lengths' if fmt == 'onnx' else 'a KV-cache state of that size'})")
    Q.override(rec, {"text_decoder": decoder, "token_embedding": embedding, "vision_encoder": vision}, group_size)
    if kv_cache is not None:
        rec["kv_cache"] = kv_cache
    if max_context_len is not None:
        rec["max_context_len"] = max_context_len
        if rec.get("max_seq_len") and rec["max_seq_len"] > max_context_len:
            rec["max_seq_len"] = max_context_len
