"""`mobilemllm data ...`: write the built-in synthetic data set; filter image-caption pairs by CLIP score."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(help="Data sets: write the synthetic shapes world in the LLaVA format; filter caption pairs.",
                       no_args_is_help=True)


@data_app.command("synth")
def synth(
    out: Path = typer.Option(Path("runs/data"), "--out", "-o", help="Folder to write images and JSON into."),
    num_images: int = typer.Option(2000, "--num-images", "-n", min=1, help="Images to generate."),
    seed: int = typer.Option(0, help="Random seed; use a different seed for a held-out split."),
    image_size: int = typer.Option(32, min=8, help="Image side in pixels."),
    hallucination_rate: float = typer.Option(
        0.3, min=0.0, max=1.0, help="Share of detailed captions that mention an object not in the image."),
) -> None:
    """Write the synthetic "shapes" data set (images + LLaVA-format JSON), deterministic by seed."""
    from mobilemllm.data.shapes import write_synthetic  # lazy: cli startup
    from mobilemllm.errors import UserError  # lazy: cli startup

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the data set into")
    meta = write_synthetic(out, num_images=num_images, seed=seed, image_size=image_size,
                           hallucination_rate=hallucination_rate, progress=True)
    typer.echo(f"wrote {meta.get('num_images', num_images)} images and their records to {out}")


@data_app.command("filter")
def filter_cmd(
    data: Path = typer.Option(..., "--data", "-d",
                              help="LLaVA-format caption file (pretrain.json): <image> -> caption."),
    scorer: Path = typer.Option(..., "--scorer", "-s", help="A foundations stage folder (runs/tiny/foundations) or a "
                                "local transformers CLIP/SigLIP folder."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="The kept records' file (its report and histogram go beside it)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep pairs scoring at least this (cosine)."),
    top_fraction: Optional[float] = typer.Option(None, "--top-fraction", help="Keep this share of the best pairs."),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder",
                                                help="Images (default: images/ beside --data)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Pairs scored together."),
    allow_outside_images: bool = typer.Option(
        False, "--allow-outside-images/--no-allow-outside-images",
        help="Let records name images outside the image folder (absolute paths, '..', links out)."),
) -> None:
    """Score image-caption pairs with a CLIP-style model and keep those above a threshold or the top fraction."""
    from mobilemllm.data.filter import filter_file, keep_mask  # lazy: cli startup
    from mobilemllm.training.caption_scorer import load_scorer  # lazy: cli startup

    import torch  # lazy: cli startup

    keep_mask(torch.zeros(1), threshold, top_fraction)  # one of the two, before the scorer loads
    report = filter_file(data, load_scorer(scorer), out, threshold=threshold, top_fraction=top_fraction,
                         image_folder=image_folder, batch_size=batch_size, allow_outside_images=allow_outside_images)
    typer.echo(f"kept {report['kept']} of {report['pairs']} pairs (score >= {report['cut']:.4f}) in {out}; "
               f"histogram {report['histogram']}")
