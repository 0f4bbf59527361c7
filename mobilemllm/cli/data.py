"""`mobilemllm data ...`: write the built-in synthetic data set."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(help="Data sets: write the synthetic shapes world in the LLaVA format.", no_args_is_help=True)


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
    from mobilemllm.data.shapes import write_synthetic
    from mobilemllm.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder to write the data set into")
    meta = write_synthetic(out, num_images=num_images, seed=seed, image_size=image_size,
                           hallucination_rate=hallucination_rate, progress=True)
    typer.echo(f"wrote {meta.get('num_images', num_images)} images and their records to {out}")
