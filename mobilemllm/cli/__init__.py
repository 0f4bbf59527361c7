"""The `mobilemllm` command: a thin table of typed commands, one module each under mobilemllm/cli/.

User mistakes (``mobilemllm.errors.UserError``) become one red
line and a non-zero exit; anything else is a bug and keeps its traceback.

The command modules import their implementation (torch, the model, export, the runtimes) inside the
command function, marked ``# lazy: cli startup``: loading the table imports none of it, so
``mobilemllm --help`` answers in a fraction of a second (tests/test_imports.py checks that torch stays out).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    import click
except ImportError:
    click = None

from mobilemllm.cli import (bench, chat, data, demo, eval as eval_, export, generate, import_, info, push, quickstart,
                            serve, train, train_bench)
from mobilemllm.errors import UserError

# The command table, in the order `--help` lists them: command name -> typed function (or a Typer group).
COMMANDS: dict[str, object] = {
    "quickstart": quickstart.quickstart,
    "data": data.data_app,
    "info": info.info,
    "train": train.train,
    "train-bench": train_bench.train_bench,
    "eval": eval_.eval_cmd,
    "export": export.export,
    "generate": generate.generate,
    "chat": chat.chat,
    "serve": serve.serve,
    "bench": bench.bench,
    "push": push.push,
    "demo": demo.demo,
    "import": import_.import_model,
}

app = typer.Typer(
    name="mobilemllm",
    help="Train, quantize, export and benchmark small multimodal LLMs (MobileVLM-style) for phones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _name, _cmd in COMMANDS.items():
    if isinstance(_cmd, typer.Typer):
        app.add_typer(_cmd, name=_name)
    else:
        app.command(_name)(_cmd)


def _quiet_backends() -> None:
    """Silence import-time chatter from optional backends (torchao's missing CUDA kernels etc.)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    for name in ("torchao", "torch.utils._pytree", "torch._export", "torch.export", "executorch", "coremltools", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_backends()
    try:
        rv = app(args=argv, prog_name="mobilemllm", standalone_mode=False)
    except UserError as e:
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
    if click is not None:
        kinds.append(click.ClickException)
    return tuple(kinds)


def _abort_errors() -> tuple[type, ...]:
    kinds: list[type] = [typer.Abort]
    if click is not None:
        kinds.append(click.exceptions.Abort)
    return tuple(kinds)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
