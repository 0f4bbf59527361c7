"""`mobilemllm quickstart`: the whole pipeline on the built-in tiny model, on a laptop CPU.

Steps (each reused when already finished; ``--fresh`` starts over):
1. train: synthetic data, tiny foundations, pretrain -> instruct -> dpo, evaluation of each stage;
2. export: the ``android`` ExecuTorch bundle and the ``onnx`` bundle of the DPO checkpoint;
3. answer a question about a held-out image through the exported ExecuTorch bundle;
4. benchmark the bundles against eager PyTorch;
then a summary of where everything was written.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer
from rich.console import Console

from mobilemllm.errors import UserError

STEPS = ("train", "export-android", "export-onnx", "answer", "bench")


class _Run:
    """The quickstart's output folder and its progress file (``quickstart.json``): each finished step is
    recorded there, so that a second run after an interruption reuses it instead of starting over."""

    def __init__(self, out: Path, fresh: bool):
        self.out = Path(out)
        self.console = Console()
        if fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "quickstart.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def done(self, step: str, **info) -> None:
        """Record a finished step (written aside and renamed: an interrupted write leaves the old file)."""
        self.state[step] = {"done": True, **info}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_path)

    def header(self, i: int, step: str, what: str) -> bool:
        """Print the step's title; True when an earlier run finished it."""
        reuse = self.state.get(step, {}).get("done", False)
        self.console.rule(f"[bold]{i}/{len(STEPS)} {what}" + (" [dim](done earlier, reused)" if reuse else ""))
        return reuse

    def cli(self, args: list[str]) -> None:
        """Run a `mobilemllm` command as a user would, so quickstart exercises the same paths."""
        from mobilemllm.cli import main as cli_main  # lazy: cli/__init__ imports this module to build its table

        code = cli_main(args)
        if code:
            raise UserError(f"quickstart step `mobilemllm {' '.join(args)}` failed (exit {code}); "
                            "fix the error above and run quickstart again to continue")


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for data, checkpoints, bundles, reports."),
    fresh: bool = typer.Option(False, "--fresh/--no-fresh", help="Delete earlier results in --out and start over."),
    skip_bench: bool = typer.Option(False, "--skip-bench/--no-skip-bench", help="Stop after the bundle answers."),
    bench_repeat: int = typer.Option(3, "--bench-repeat", min=1, help="Timed repetitions per benchmark case."),
) -> None:
    """Train the tiny default (data -> foundations -> pretrain -> instruct -> dpo), export it for Android
    (ExecuTorch) and ONNX, answer a question through the bundle, and benchmark it against eager PyTorch."""
    run = _Run(out, fresh)
    t_start = time.perf_counter()
    ckpt = _train(run)
    bundles = _export(run, ckpt)
    image, question = _answer(run, bundles["android"])
    if not skip_bench:
        _bench(run, ckpt, bundles, bench_repeat)
    _summary(run, bundles, image, question, skip_bench, time.perf_counter() - t_start)


def _train(run: _Run) -> Path:
    """Step 1: the tiny pipeline (it reuses its own finished stages); the DPO checkpoint it ends with."""
    from mobilemllm.training.pipeline import run_tiny_pipeline  # lazy: cli startup

    run.header(1, "train", "train the tiny model: data, foundations, pretrain, instruct, dpo (+ eval)")
    t0 = time.perf_counter()
    results = run_tiny_pipeline(run.out / "train", progress=True)
    ckpt = Path(results["stages"]["dpo"]["checkpoint"])
    run.done("train", checkpoint=str(ckpt), table=results.get("table"), wall_s=round(time.perf_counter() - t0, 1))
    return ckpt


def _export(run: _Run, ckpt: Path) -> dict[str, Path]:
    """Steps 2-3: the `android` (ExecuTorch) and `onnx` bundles, through `mobilemllm export`."""
    bundles = {"android": run.out / "bundles" / "android", "onnx": run.out / "bundles" / "onnx"}
    for i, target in ((2, "android"), (3, "onnx")):
        step = f"export-{target}"
        reuse = run.header(i, step, f"export the `{target}` bundle")
        if reuse and (bundles[target] / "manifest.json").exists():
            continue
        t0 = time.perf_counter()
        run.cli(["export", "--model", str(ckpt), "--target", target, "--out", str(bundles[target])])
        run.done(step, bundle=str(bundles[target]), wall_s=round(time.perf_counter() - t0, 1))
    return bundles


def _answer(run: _Run, bundle: Path) -> tuple[Path, str]:
    """Step 4: a held-out question answered through the ExecuTorch bundle (the runner the apps use),
    streamed as it is generated; the image and question, for the closing hint."""
    from mobilemllm.data.images import load_image  # lazy: cli startup
    from mobilemllm.runtime import run_bundle  # lazy: cli startup

    run.header(4, "answer", "answer a question through the ExecuTorch bundle (the runner the apps use)")
    image, question, expected = _sample_question(run.out / "train")
    run.console.print(f"image: {image}\nquestion: {question}  [dim](expected: {expected})[/]")
    pieces: list[str] = []

    def on_text(t: str) -> None:
        pieces.append(t)
        run.console.print(t, end="", markup=False, highlight=False)

    run_bundle(bundle, load_image(image), question, max_new_tokens=24, on_text=on_text)
    run.console.print()
    run.done("answer", image=str(image), question=question, answer="".join(pieces).strip(), expected=expected)
    return image, question


def _bench(run: _Run, ckpt: Path, bundles: dict[str, Path], repeat: int) -> None:
    """Step 5: both bundles against eager PyTorch, through `mobilemllm bench`."""
    run.header(5, "bench", "benchmark the bundles against eager PyTorch")
    report = run.out / "bench.json"
    run.cli(["bench", "--model", str(ckpt), "--bundle", str(bundles["android"]), "--bundle", str(bundles["onnx"]),
             "--prompt-tokens", "32", "--new-tokens", "32", "--repeat", str(repeat), "--json", str(report)])
    run.done("bench", report=str(report))


def _summary(run: _Run, bundles: dict[str, Path], image: Path, question: str, skip_bench: bool,
             wall_s: float) -> None:
    """Where everything was written, and the command that asks the bundle another question."""
    c, out = run.console, run.out
    c.rule("[bold green]quickstart finished")
    c.print(f"total wall time this run: {wall_s:.0f} s")
    c.print(f"data and checkpoints: {out / 'train'}  (per-stage results: {out / 'train' / 'results.json'})")
    c.print(f"ExecuTorch bundle:    {bundles['android']}")
    c.print(f"ONNX bundle:          {bundles['onnx']}")
    if not skip_bench:
        c.print(f"benchmark report:     {out / 'bench.json'}")
    c.print(f"try it:  mobilemllm generate --bundle {bundles['android']} --image {image} --prompt \"{question}\"")


def _sample_question(train_dir: Path) -> tuple[Path, str, str]:
    """The first held-out question of the evaluation split."""
    for cand in sorted(train_dir.rglob("eval_questions.json")):
        recs = json.loads(cand.read_text())
        if recs:
            rec = recs[0]
            conv = rec["conversations"]
            return cand.parent / "images" / rec["image"], conv[0]["value"].replace("<image>", "").strip(), \
                conv[1]["value"]
    raise UserError(f"no eval_questions.json under {train_dir}; run `mobilemllm quickstart --fresh`")
