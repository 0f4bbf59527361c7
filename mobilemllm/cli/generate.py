"""`mobilemllm generate`: image + prompt -> streamed text, from a checkpoint/preset or an exported bundle."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from mobilemllm.errors import UserError

PROVIDERS_HELP = ("ONNX bundles: comma-separated ONNX Runtime execution providers in order of preference "
                  "(e.g. NnapiExecutionProvider,CPUExecutionProvider); default: CPU.")
TOP_P_HELP = ("Nucleus sampling mass (with temperature > 0); default: 1.0 (ExecuTorch bundles: the runner's "
              "fixed 0.9, and other values are refused).")
STOP_HELP = "Stop the answer before this text (repeat for several)."


def split_providers(providers: str | None) -> list[str] | None:
    return [p.strip() for p in providers.split(",") if p.strip()] if providers else None


def generate(
    image: Path = typer.Option(..., "--image", "-i", help="Image file (PNG, JPEG, ...)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question or instruction about the image."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Checkpoint folder or preset name (eager PyTorch)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b",
                                          help="An exported bundle folder (ExecuTorch or ONNX)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; > 0 samples."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=TOP_P_HELP),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (ExecuTorch bundles cannot take one)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help=STOP_HELP + " Bundles only."),
    providers: Optional[str] = typer.Option(None, help=PROVIDERS_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help="Bundles: CPU threads for the runner "
                                                            "(default: the runtime's choice)."),
) -> None:
    """Answer a prompt about an image, streaming the text as it is generated."""
    if (model is None) == (bundle is None):
        raise UserError("give exactly one of --model (checkpoint folder or preset) or --bundle (exported bundle)")
    from mobilemllm.data.images import load_image  # lazy: cli startup

    img = load_image(image)  # fail on a bad image before loading any weights
    if bundle is not None:
        from mobilemllm.runtime import open_runner, report_line  # lazy: cli startup

        runner = open_runner(bundle, warn=_note, providers=split_providers(providers), threads=threads)
        res = runner.generate(img, prompt, on_text=_write, image_path=image, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or ()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        typer.echo(report_line(res, runner), err=True)
        return
    for flag, value in (("--stop", stop), ("--providers", providers), ("--threads", threads)):
        if value:
            raise UserError(f"{flag} applies to bundles (--bundle); eager generation does not take it")
    from mobilemllm.api import load  # lazy: cli startup
    from mobilemllm.inference import answer  # lazy: cli startup

    m, tok = load(model)
    if tok is None:
        raise UserError(f"{model} has no tokenizer; pass a checkpoint folder that contains tokenizer.json")
    t0 = time.perf_counter()
    ans = answer(m, tok, img, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=1.0 if top_p is None else top_p, seed=seed, on_text=_write)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    typer.echo(f"[{ans.prompt_tokens} prompt tokens, {len(ans.tokens)} generated in {dt:.2f} s, eager PyTorch]",
               err=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(msg: str) -> None:
    typer.echo(msg, err=True)
