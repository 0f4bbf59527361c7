"""`mobilemllm chat`: a terminal conversation with a bundle about an image (follow-ups keep the KV cache)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mobilemllm.cli.generate import PROVIDERS_HELP, STOP_HELP, TOP_P_HELP, split_providers
from mobilemllm.errors import UserError

HELP = "commands: /image PATH (a new image, a new conversation), /reset (forget the turns), /quit"


def chat(
    bundle: Path = typer.Option(..., "--bundle", "-b", help="An exported bundle folder (ExecuTorch or ONNX)."),
    image: Path = typer.Option(..., "--image", "-i", help="The image to talk about (/image PATH switches)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; > 0 samples."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help=TOP_P_HELP),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (ExecuTorch bundles cannot take one)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help=STOP_HELP),
    providers: Optional[str] = typer.Option(None, help=PROVIDERS_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the runner (default: the runtime's)."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print each answer's numbers to stderr."),
) -> None:
    """Chat about an image: one question per line on stdin, each answer on its own line on stdout.

    Works interactively and with piped input. /image PATH, /reset, /quit.
    """
    from mobilemllm.data.images import load_image  # lazy: cli startup
    from mobilemllm.runtime import Sampling, open_runner, report_line  # lazy: cli startup

    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    stop=tuple(stop or ()))
    img = load_image(image)  # a bad image or bad settings fail before any weights load
    runner = open_runner(bundle, warn=_note, providers=split_providers(providers), threads=threads)
    runner.check_sampling(Sampling.of(**sampling))
    conv = runner.conversation(img, image_path=image)
    runner.load()
    interactive = sys.stdin.isatty()
    if interactive:
        _note(f"chatting about {image} with {runner.describe()}; {HELP}")
    while True:
        line = _read(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                conv.reset()
                _note("new conversation about the same image")
            elif command == "/image" and arg.strip():
                try:
                    conv = runner.conversation(Path(arg.strip()).expanduser())
                    _note(f"new conversation about {arg.strip()}")
                except UserError as e:
                    _error(str(e))
            else:
                _error(f"unknown command {line!r}; {HELP}")
            continue
        try:
            result = conv.ask(line, on_text=_write, **sampling)
        except UserError as e:  # a full context, most often: say how to go on
            _error(str(e))
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats:
            _note(report_line(result, runner))


def _read(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(msg: str) -> None:
    typer.echo(msg, err=True)


def _error(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
