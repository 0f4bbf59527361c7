"""`mobilemllm bench`: latency of bundles and checkpoints on this host or a phone, side by side.

    mobilemllm bench --model runs/tiny --bundle bundles/tiny-android --bundle bundles/tiny-onnx \
        --prompt-tokens 64 --new-tokens 128 --json bench.json --csv bench.csv --plot bench.png
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def bench(
    bundle: List[Path] = typer.Option([], "--bundle", "-b", help="An exported bundle folder (repeat for a matrix)."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="A checkpoint folder or preset for the eager pytorch backend (repeatable)."),
    backend: List[str] = typer.Option([], "--backend",
                                      help="executorch | executorch-methods | onnxruntime | pytorch (repeatable); "
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
) -> None:
    """Benchmark load time, image encode, prefill, time to first token, decode tokens/s and peak memory."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mobilemllm.bench import report
    from mobilemllm.bench.adb import parse_device
    from mobilemllm.bench.machine import describe
    from mobilemllm.bench.plan import plan_cases
    from mobilemllm.bench.run import Settings, run_benchmark

    settings = Settings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup, repeat=repeat,
                        threads=threads, device=device, bandwidth_gbps=bandwidth,
                        runner=str(runner) if runner else None)
    settings.check()
    kind, _ = parse_device(device)
    if kind == "adb":
        from mobilemllm.bench.adb import find_adb, find_runner

        find_adb()  # fail before any work when adb is missing
        find_runner(settings.runner)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from mobilemllm.errors import BackendUnavailable

            raise BackendUnavailable("--plot needs matplotlib: pip install 'matplotlib>=3.8'") from None
    cases = plan_cases([str(b) for b in bundle], model, backend, device)
    console = Console(stderr=True)
    steps_per_case = 1 + warmup + repeat
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * steps_per_case)

        def on_step(case, msg):
            progress.update(task, advance=1, description=f"{case.label} ({case.backend}): {msg}")

        results = run_benchmark(cases, settings, on_step)
    machine = describe(threads, device)
    doc = report.result_document(results, machine, settings.to_dict())
    out = Console()
    if not out.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        out = Console(width=200)
    out.print(report.table(results, machine))
    for line in report.footnotes(results, settings.to_dict(), machine):
        out.print(f"[dim]{line}[/]", highlight=False)
    for path, write in ((json_out, report.write_json), (csv_out, report.write_csv)):
        if path is not None:
            write(doc, path)
            out.print(f"wrote {path}")
    if plot is not None:
        report.write_plot(results, machine, plot)
        out.print(f"wrote {plot}")
