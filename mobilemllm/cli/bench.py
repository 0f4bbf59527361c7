"""`mobilemllm bench`: latency of bundles and checkpoints on this host or a phone, side by side.

    mobilemllm bench --model runs/tiny --bundle bundles/tiny-android --bundle bundles/tiny-onnx \
        --prompt-tokens 64 --new-tokens 128 --json bench.json --csv bench.csv --plot bench.png
    mobilemllm bench --model runs/tiny --compare executorch:group=128,onnx:decoder=genai,gguf:q4_0,gguf:q4_k_m \
        --threads 2 --json compare.json --csv compare.csv --plot compare.png
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mobilemllm.errors import BackendUnavailable, ConfigError, UserError


def bench(  # lazy: cli startup
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="An exported bundle folder (repeat for a matrix)."),
    compare: Optional[str] = typer.Option(
        None, help="Runtimes to compare on the --model checkpoint, comma-separated, each RUNTIME[:OPTION...] with "
                   "RUNTIME executorch | onnx | gguf and OPTION key=value or a bare quant (e.g. executorch:group=128,"
                   "onnx:decoder=genai,gguf:q4_0,gguf:q4_k_m): their bundles are exported into --cache (or reused) "
                   "and measured interleaved in one run. See docs/benchmarking.md."),
    gguf: List[str] = typer.Option([], "--gguf", help="A GGUF pair made elsewhere, MODEL.gguf,MMPROJ.gguf, run by "
                                                      "llama.cpp (repeatable; joins --compare)."),
    cache: Path = typer.Option(Path("bundles/compare"), help="Where --compare keeps its bundles (one folder per "
                                                               "checkpoint and runtime; reused while they match)."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="A checkpoint folder or preset for the eager pytorch backend (repeatable)."),
    backend: List[str] = typer.Option([], "--backend",
                                      help="executorch | executorch-methods | onnxruntime | llamacpp | pytorch "
                                           "(repeatable); "
                                           "default: the bundle format's runner, pytorch for --model."),
    prompt_tokens: int = typer.Option(128, help="Text tokens in the prompt (the image's visual tokens come on top)."),
    new_tokens: int = typer.Option(128, help="Tokens to decode per run (EOS ignored)."),
    warmup: int = typer.Option(1, help="Untimed warm-up runs per case."),
    repeat: int = typer.Option(5, help="Timed runs per case (median and p10/p90 are reported)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per backend (default: every usable core)."),
    device: str = typer.Option("host", help="host, or adb / adb:SERIAL for an Android phone (ExecuTorch bundles)."),
    runner: Optional[Path] = typer.Option(None, help="The phone's ExecuTorch runner binary (--device adb); see "
                                                     "docs/benchmarking.md."),
    bandwidth: Optional[float] = typer.Option(None, help="Memory bandwidth in GB/s for the decode ceiling (e.g. 76.8 "
                                                         "for Snapdragon 8 Gen 3); default: measured on this host."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every repetition + machine as JSON."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Write every repetition as CSV."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: latency breakdown and decode vs ceiling."),
    quiet: bool = typer.Option(False, "--quiet/--no-quiet", help="No progress bar."),
    force: bool = typer.Option(False, "--force/--no-force", help="--compare: write a bundle that fails parity at "
                                                                 "export anyway (marked in its manifest and the table)."),
) -> None:
    """Benchmark load time, image encode, prefill, time to first token, decode tokens/s and peak memory."""
    # imported when the command runs: the command table stays light for every other command's start-up
    from rich.console import Console  # lazy: cli startup

    from mobilemllm.bench.adb import parse_device  # lazy: cli startup
    from mobilemllm.bench.machine import describe  # lazy: cli startup
    from mobilemllm.bench.plan import plan_cases  # lazy: cli startup
    from mobilemllm.bench.run import Settings, run_benchmark  # lazy: cli startup

    settings = Settings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup, repeat=repeat,
                        threads=threads, device=device, bandwidth_gbps=bandwidth,
                        runner=str(runner) if runner else None)
    settings.check()
    kind, _ = parse_device(device)
    if kind == "adb":
        from mobilemllm.bench.adb import find_adb, find_runner  # lazy: cli startup

        find_adb()  # fail before any work when adb is missing
        find_runner(settings.runner)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BackendUnavailable("--plot needs matplotlib: pip install 'matplotlib>=3.8'") from None
    console = Console(stderr=True)
    if compare is not None:
        cases, runner_fn = _compare_cases(model, backend, kind, compare, bundle, gguf, device, cache, console, quiet,
                                          force)
    else:
        cases, runner_fn = plan_cases([str(b) for b in bundle], model, backend, device, gguf), run_benchmark
    results = _measure(cases, settings, runner_fn, console, quiet, 1 + warmup + repeat)
    run_settings = settings.to_dict()
    if compare is not None:  # the comparison as asked, and how its requests were ordered
        run_settings.update(compare=compare, order="interleaved (round-robin across cases)")
    _write(results, describe(threads, device), run_settings, json_out, csv_out, plot)


def _compare_cases(model, backend, kind, compare, bundle, gguf, device, cache, console, quiet, force):
    """--compare's cases (exported or reused bundles of the one checkpoint, plus any --bundle/--gguf) and the
    interleaved runner that measures them."""
    from mobilemllm.bench.compare import run_interleaved  # lazy: cli startup
    from mobilemllm.bench.plan import plan_cases  # lazy: cli startup

    if len(model) != 1 or backend:
        raise UserError("--compare exports one checkpoint for each runtime: give exactly one --model CKPT (a "
                        "checkpoint folder or preset) and no --backend")
    if kind != "host":
        raise UserError("--compare measures on this host; for a phone use --device adb --bundle DIR")
    specs = compare_specs(model[0], compare)
    cases = plan_cases([str(b) for b in bundle], [], [], device, gguf) if bundle or gguf else []
    return export_for_compare(model[0], specs, cache, console, quiet, force) + cases, run_interleaved


def _measure(cases, settings, runner_fn, console, quiet: bool, steps_per_case: int):
    """Run the cases with a progress bar of their steps (load, warm-up and timed runs)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # lazy: cli startup

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * steps_per_case)

        def on_step(case, msg):
            progress.update(task, advance=1, description=f"{case.label} ({case.backend}): {msg}")

        return runner_fn(cases, settings, on_step)


def _write(results, machine, run_settings, json_out, csv_out, plot) -> None:
    """The table and footnotes on stdout, then the JSON / CSV / PNG files asked for."""
    from rich.console import Console  # lazy: cli startup

    from mobilemllm.bench import report  # lazy: cli startup

    doc = report.result_document(results, machine, run_settings)
    out = Console()
    if not out.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        out = Console(width=200)
    out.print(report.table(results, machine))
    for line in report.footnotes(results, run_settings, machine):
        out.print(f"[dim]{line}[/]", highlight=False)
    for path, write in ((json_out, report.write_json), (csv_out, report.write_csv)):
        if path is not None:
            write(doc, path)
            out.print(f"wrote {path}")
    if plot is not None:
        report.write_plot(results, machine, plot)
        out.print(f"wrote {plot}")


def compare_specs(model: str, text: str):
    """Parse --compare and check, before any export, that every runtime can take ``model``: its recipe with the
    options, the backend installed, the model config (gguf: llama.cpp's projectors). One line for all problems."""
    # imported when the command runs (export pulls in torch)
    from mobilemllm import api  # lazy: cli startup
    from mobilemllm.bench.compare import apply_options, parse_compare  # lazy: cli startup
    from mobilemllm.bench.plan import check_model  # lazy: cli startup
    from mobilemllm.export.pipeline import preflight  # lazy: cli startup
    from mobilemllm.export.recipes import load_recipe  # lazy: cli startup

    specs = parse_compare(text)
    check_model(model)
    config = api.load_config(model)
    problems = []
    for spec in specs:
        try:
            fmt = preflight(apply_options(load_recipe(target=spec.target), spec))
        except (ConfigError, BackendUnavailable) as e:
            problems.append(f"{spec.label}: {e}")
            continue
        check = getattr(fmt, "check_model", None)
        problems += [f"{spec.label} cannot take {model}: {p}" for p in (check(config) if check else [])]
    if problems:
        raise UserError("--compare: " + "; ".join(problems))
    return specs


def export_for_compare(model: str, specs, cache: Path, console, quiet: bool, force: bool = False) -> list:
    """Export (or reuse) each spec's bundle of ``model`` under ``cache``, with progress; the cases to measure."""
    # imported when the command runs (export pulls in torch)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # lazy: cli startup

    from mobilemllm.bench.compare import apply_options, bundle_dir, reusable  # lazy: cli startup
    from mobilemllm.bench.plan import Case  # lazy: cli startup
    from mobilemllm.export.pipeline import export_bundle  # lazy: cli startup
    from mobilemllm.export.recipes import load_recipe  # lazy: cli startup

    cases = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=quiet) as progress:
        for i, spec in enumerate(specs, 1):
            recipe = apply_options(load_recipe(target=spec.target), spec)
            out = bundle_dir(cache, model, spec)
            head = f"[{i}/{len(specs)}] {spec.label}"
            if reusable(out, recipe, model):
                console.print(f"{head}: reusing {out}", highlight=False)
            else:
                task = progress.add_task(f"{head}: exporting to {out}", total=None)
                export_bundle(model, recipe, out, force=force, log=lambda line, t=task, h=head: progress.update(
                    t, description=f"{h}: {line[:120]}"))
                progress.update(task, description=f"{head}: exported to {out}", completed=1, total=1)
            cases.append(Case(spec.backend, str(out), spec.label))
    return cases
