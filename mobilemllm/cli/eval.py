"""`mobilemllm eval`: VQA exact match (canonical and held-out paraphrased questions), POPE and caption
hallucination of a checkpoint or an exported bundle on LLaVA-format data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def eval_cmd(
    model: list[str] = typer.Option([], "--model", "-m", help="Checkpoint folder (repeat to compare several)."),
    bundle: list[Path] = typer.Option([], "--bundle", "-b", help="An exported bundle (ExecuTorch or ONNX), answered "
                                      "by its runner as on a phone (repeat to compare several)."),
    data: Path = typer.Option(..., "--data", "-d", help="Folder with eval_questions.json, eval_paraphrase.json, "
                              "eval_pope_*.json, eval_captions.json and images/ (e.g. `mobilemllm data synth "
                              "--seed 1 --out DIR`)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N records per file."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Prompts decoded together."),
    out_json: Optional[Path] = typer.Option(None, "--json", help="Also write the full report to this JSON file."),
    allow_outside_images: bool = typer.Option(
        False, "--allow-outside-images/--no-allow-outside-images",
        help="Let records name images outside the data's images/ folder (absolute paths, '..', links out)."),
) -> None:
    """Evaluate checkpoints and bundles: prints a table and the JSON report."""
    from rich.console import Console  # lazy: cli startup

    from mobilemllm.evaluation import evaluate, evaluate_bundle, format_table  # lazy: cli startup
    from mobilemllm.models.checkpoint import check_checkpoint_dir, load_checkpoint  # lazy: cli startup

    if not model and not bundle:
        from mobilemllm.errors import UserError  # lazy: cli startup

        raise UserError("give at least one --model (checkpoint folder) or --bundle (exported bundle)")
    for m in model:
        check_checkpoint_dir(m)
    if bundle:
        from mobilemllm.bundle import load_manifest  # lazy: cli startup

        for b in bundle:
            load_manifest(b)  # a damaged bundle fails before any evaluation runs
    if not data.is_dir():
        from mobilemllm.errors import DataError  # lazy: cli startup

        raise DataError(f"evaluation data folder {data} does not exist; write one with "
                        f"`mobilemllm data synth --seed 1 --num-images 200 --out {data}`")
    reports = {}
    for m in model:
        net, tok = load_checkpoint(m)
        if tok is None:
            from mobilemllm.errors import CheckpointError  # lazy: cli startup

            raise CheckpointError(f"{m} has no tokenizer files (tokenizer.json); it cannot be evaluated")
        reports[m] = evaluate(net, tok, data, limit=limit, batch_size=batch_size,
                              allow_outside_images=allow_outside_images)
    for b in bundle:
        reports[str(b)] = evaluate_bundle(b, data, limit=limit, allow_outside_images=allow_outside_images)
    text = json.dumps(reports if len(reports) > 1 else next(iter(reports.values())), indent=1)
    if out_json is not None:
        tmp = out_json.with_name(out_json.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out_json)
    Console().print(format_table(reports))
    typer.echo(text)
