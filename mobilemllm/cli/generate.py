"""`mobilemllm generate`: image + prompt -> streamed text, from a checkpoint/preset or an exported bundle."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer


def generate(
    image: Path = typer.Option(..., "--image", "-i", help="Image file (PNG, JPEG, ...)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction about the image."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Checkpoint folder or preset name (eager PyTorch)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b",
                                          help="An exported bundle folder (ExecuTorch or ONNX)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    providers: Optional[str] = typer.Option(
        None, help="ONNX bundles: comma-separated ONNX Runtime execution providers in order of preference "
                   "(e.g. NnapiExecutionProvider,CPUExecutionProvider); default: CPU."),
) -> None:
    """Answer a prompt about an image, streaming the text as it is generated."""
    from mobilemllm.errors import UserError

    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (checkpoint folder or preset) or --bundle (exported bundle)")
    from mobilemllm.data.images import load_image

    img = load_image(image)  # fail on a bad image before loading any weights
    if bundle is not None:
        from mobilemllm.runtime import run_bundle

        run_bundle(bundle, img, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                   on_text=_write, image_path=image,
                   providers=[p.strip() for p in providers.split(",") if p.strip()] if providers else None)
        return
    from mobilemllm.api import load
    from mobilemllm.inference import answer

    m, tok = load(model)
    if tok is None:
        raise UserError(f"{model} has no tokenizer; pass a checkpoint folder that contains tokenizer.json")
    t0 = time.perf_counter()
    ans = answer(m, tok, img, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 seed=seed, on_text=_write)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    typer.echo(f"[{ans.prompt_tokens} prompt tokens, {len(ans.tokens)} generated in {dt:.2f} s, eager PyTorch]",
               err=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
