"""The `mobilemllm` command: a thin table of typed commands, one module each under mobilemllm/cli/.

Each module defines ``register(app)``. User mistakes (``mobilemllm.errors.UserError``) become one red
line and a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

# Command modules, in the order `--help` lists them. Each has register(app).
COMMAND_MODULES = ["quickstart", "data", "info", "train", "train_bench", "eval", "export", "generate", "bench",
                   "push", "demo", "import_"]

app = typer.Typer(
    name="mobilemllm",
    help="Train, quantize, export and benchmark small multimodal LLMs (MobileVLM-style) for phones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"mobilemllm.cli.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"mobilemllm.cli.{_name}":
            raise
        continue
    _mod.register(app)


def _quiet_backends() -> None:
    """Silence import-time chatter from optional backends (torchao's missing CUDA kernels etc.)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export", "executorch", "coremltools", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from mobilemllm.errors import UserError

    _quiet_backends()
    try:
        rv = app(args=argv, prog_name="mobilemllm", standalone_mode=False)
    except UserError as e:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}")
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # usage errors: typer >= 0.20 vendors click as typer._click, older typer uses click
        if isinstance(e, _usage_errors()):
            e.show()
            return e.exit_code
        if isinstance(e, _abort_errors()):
            return 1
        raise
    # without standalone mode, a `raise typer.Exit(code)` inside a command comes back as the return value
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def _usage_errors() -> tuple[type, ...]:
    kinds: list[type] = [t for t in (getattr(typer, "TyperException", None),) if t is not None]
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _abort_errors() -> tuple[type, ...]:
    kinds: list[type] = [typer.Abort]
    try:
        import click

        kinds.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(kinds)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
