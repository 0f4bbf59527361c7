"""`mobilemllm export`: a checkpoint (or a preset with random weights) -> a bundle folder for a target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export(
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder, a training run folder (its last "
                                                         "stage), or a preset name (random weights)."),
    target: Optional[str] = typer.Option(None, "--target", "-t",
                                         help="android | ios | ios-coreml | android-qnn | portable | onnx | coreml "
                                              "(the recipes in the export/ folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (replaced atomically if it is a bundle)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe YAML file instead of a shipped target."),
    decoder_quant: Optional[str] = typer.Option(None, help="Override the text decoder's scheme "
                                                           "(executorch: fp32 | 8da4w | 8da8w | int8_weight; "
                                                           "android-qnn: 16a4w | 16a8w | 16a16w | 8a8w | 8a4w | "
                                                           "fp16; onnx: "
                                                           "fp32 | int8 | int4; coreml: the compression of every "
                                                           "package, fp16 | int8 | int4 | palettize4)."),
    embedding_quant: Optional[str] = typer.Option(None, help="Override the token embedding's scheme "
                                                             "(executorch: fp32 | embedding4 | embedding8; "
                                                             "onnx: fp32 | int8)."),
    vision_quant: Optional[str] = typer.Option(None, help="Override the vision encoder's scheme "
                                                          "(executorch: fp32 | 8da8w | int8_weight; android-qnn: "
                                                          "8a8w | 16a8w | 16a4w | 16a16w | 8a4w | fp16; onnx: fp32 | "
                                                          "int8)."),
    group_size: Optional[int] = typer.Option(None, min=0, help="Group size for 4-bit weights and embeddings "
                                                                "(0 = per channel; onnx: block size 32 | 64 | 128; "
                                                                "coreml: 16 | 32 | 64 | 128)."),
    max_context_len: Optional[int] = typer.Option(None, min=8, help="KV-cache length (default: the model's context; "
                                                                  "ExecuTorch targets)."),
    kv_cache: Optional[str] = typer.Option(None, help="KV-cache precision of the text decoder: fp32 | int8 "
                                                        "(per-token int8 keys/values, a quarter of the cache "
                                                        "memory; ExecuTorch targets)."),
    force: bool = typer.Option(False, "--force/--no-force",
                               help="Write the bundle even if parity fails (marked as forced in the manifest)."),
) -> None:
    """Export a model for a phone: quantize, lower, check parity against eager, write the bundle."""
    import importlib

    from mobilemllm.errors import UserError
    from mobilemllm.bundle import check_out_dir
    from mobilemllm.export.recipes import load_recipe

    if (target is None) == (recipe is None):
        raise UserError("give exactly one of --target NAME or --recipe FILE")
    rec = load_recipe(target=target, path=recipe)  # unknown target: fails here, before any weights load
    fmt = rec["format"]
    _apply_overrides(rec, decoder_quant, embedding_quant, vision_quant, group_size, max_context_len, kv_cache)
    module = importlib.import_module(f"mobilemllm.export.{fmt}")
    builder = getattr(module, f"export_{fmt}")
    if hasattr(module, "preflight"):
        module.preflight(rec)  # e.g. QNN without its SDK: fail before loading weights
    check_out_dir(out)

    from mobilemllm.api import load

    m, tok = load(model)
    if tok is None:
        from mobilemllm.export.synthetic_tokenizer import synthetic_tokenizer

        tok = synthetic_tokenizer(m.config.llm.vocab_size)
        typer.echo(f"note: {model} has no tokenizer; using a synthetic {m.config.llm.vocab_size}-token tokenizer "
                   "(fine for benchmarks of random weights, not for real text)", err=True)
    builder(m, tok, rec, out, source=str(model), force=force, log=lambda s: typer.echo(s, err=True))


def _apply_overrides(rec: dict, decoder: str | None, embedding: str | None, vision: str | None,
                     group_size: int | None, max_context_len: int | None, kv_cache: str | None = None) -> None:
    from mobilemllm.errors import ConfigError

    fmt = rec["format"]
    if kv_cache is not None:
        from mobilemllm.export.export_llama import KV_CACHE_DTYPES

        if fmt != "executorch":
            raise ConfigError(f"--kv-cache applies to ExecuTorch targets, not to {fmt} bundles")
        if kv_cache not in KV_CACHE_DTYPES:
            raise ConfigError(f"unknown --kv-cache {kv_cache!r}; valid: {', '.join(KV_CACHE_DTYPES)}")
        rec["kv_cache"] = kv_cache
    if fmt != "executorch" and max_context_len is not None:
        raise ConfigError(f"--max-context-len applies to ExecuTorch targets; {fmt} bundles use the model's context "
                          f"({'dynamic sequence lengths' if fmt == 'onnx' else 'a KV-cache state of that size'})")
    if fmt == "onnx":
        _onnx_overrides(rec, decoder, embedding, vision, group_size)
        return
    if fmt == "coreml":
        if embedding is not None or vision is not None:
            raise ConfigError("a Core ML recipe compresses every package with one scheme: use --decoder-quant "
                              "(fp16 | int8 | int4 | palettize4), not --embedding-quant/--vision-quant")
        if decoder is not None:
            rec["compression"] = decoder
        if group_size is not None:
            rec["block_size"] = group_size
        return
    if fmt != "executorch":
        if any(v is not None for v in (decoder, embedding, vision, group_size)):
            raise ConfigError(f"--decoder-quant/--embedding-quant/--vision-quant/--group-size do not apply to "
                              f"{fmt} recipes; edit the recipe (--recipe FILE) instead")
        return
    from mobilemllm.export.quantize import check_scheme

    quant = rec.setdefault("quantization", {})
    for part, scheme in (("text_decoder", decoder), ("token_embedding", embedding), ("vision_encoder", vision)):
        if scheme is not None:
            quant[part] = {**quant.get(part, {}), "scheme": scheme}
    if group_size is not None:
        for part in ("text_decoder", "token_embedding"):
            quant.setdefault(part, {"scheme": "fp32"})["group_size"] = group_size
    if rec.get("backend") == "qnn":  # QNN's PT2E schemes (16a4w, 8a8w, ...), not torchao's
        from mobilemllm.export.qnn import check_recipe

        errors = check_recipe(rec)
        if errors:
            raise ConfigError("; ".join(errors))
    else:
        for part, spec in quant.items():
            check_scheme(part, spec)
    if max_context_len is not None:
        rec["max_context_len"] = max_context_len
        if rec.get("max_seq_len") and rec["max_seq_len"] > max_context_len:
            rec["max_seq_len"] = max_context_len


def _onnx_overrides(rec: dict, decoder: str | None, embedding: str | None, vision: str | None,
                    group_size: int | None) -> None:
    """Fold the CLI's scheme options into an ONNX recipe's per-graph ``quantization`` mapping."""
    from mobilemllm.export.onnx import parse_quantization

    if all(v is None for v in (decoder, embedding, vision, group_size)):
        return
    q = parse_quantization(rec.get("quantization"))  # the recipe as written, normalised (and validated)
    spec: dict = {"text_decoder": {"scheme": q.scheme("text_decoder"), "block_size": q.block_size},
                  "token_embedding": q.scheme("token_embedding"), "vision_encoder": q.scheme("vision_encoder"),
                  "accuracy_level": q.accuracy_level}
    for part, scheme in (("text_decoder", decoder), ("token_embedding", embedding), ("vision_encoder", vision)):
        if scheme is not None:
            spec[part] = {**spec[part], "scheme": scheme} if isinstance(spec[part], dict) else scheme
    if group_size is not None:
        spec["text_decoder"]["block_size"] = group_size
    parse_quantization(spec)  # unknown scheme / block size: one clear error before any weights load
    rec["quantization"] = spec
