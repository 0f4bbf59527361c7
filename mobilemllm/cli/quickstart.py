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

STEPS = ("train", "export-android", "export-onnx", "answer", "bench")


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for data, checkpoints, bundles, reports."),
    fresh: bool = typer.Option(False, "--fresh/--no-fresh", help="Delete earlier results in --out and start over."),
    skip_bench: bool = typer.Option(False, "--skip-bench/--no-skip-bench", help="Stop after the bundle answers."),
    bench_repeat: int = typer.Option(3, "--bench-repeat", min=1, help="Timed repetitions per benchmark case."),
) -> None:
    """Train the tiny default (data -> foundations -> pretrain -> instruct -> dpo), export it for Android
    (ExecuTorch) and ONNX, answer a question through the bundle, and benchmark it against eager PyTorch."""
    from rich.console import Console

    from mobilemllm.cli import main as cli_main
    from mobilemllm.errors import UserError

    console = Console()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "quickstart.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    t_start = time.perf_counter()

    def done(step: str, **info) -> None:
        state[step] = {"done": True, **info}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(state_path)

    def header(i: int, step: str, what: str) -> bool:
        reuse = state.get(step, {}).get("done", False)
        console.rule(f"[bold]{i}/{len(STEPS)} {what}" + (" [dim](done earlier, reused)" if reuse else ""))
        return reuse

    def cli(args: list[str]) -> None:
        code = cli_main(args)
        if code:
            raise UserError(f"quickstart step `mobilemllm {' '.join(args)}` failed (exit {code}); "
                            "fix the error above and run quickstart again to continue")

    # 1. training (the pipeline itself reuses finished stages)
    from mobilemllm.training.pipeline import run_tiny_pipeline

    header(1, "train", "train the tiny model: data, foundations, pretrain, instruct, dpo (+ eval)")
    t0 = time.perf_counter()
    results = run_tiny_pipeline(out / "train", progress=True)
    ckpt = Path(results["stages"]["dpo"]["checkpoint"])
    done("train", checkpoint=str(ckpt), table=results.get("table"), wall_s=round(time.perf_counter() - t0, 1))

    bundles = {"android": out / "bundles" / "android", "onnx": out / "bundles" / "onnx"}
    for i, target in ((2, "android"), (3, "onnx")):
        step = f"export-{target}"
        reuse = header(i, step, f"export the `{target}` bundle")
        if reuse and (bundles[target] / "manifest.json").exists():
            continue
        t0 = time.perf_counter()
        cli(["export", "--model", str(ckpt), "--target", target, "--out", str(bundles[target])])
        done(step, bundle=str(bundles[target]), wall_s=round(time.perf_counter() - t0, 1))

    # 4. a question about a held-out image, through the exported ExecuTorch bundle
    header(4, "answer", "answer a question through the ExecuTorch bundle (the runner the apps use)")
    image, question, expected = _sample_question(out / "train")
    console.print(f"image: {image}\nquestion: {question}  [dim](expected: {expected})[/]")
    from mobilemllm.data.images import load_image
    from mobilemllm.runtime import run_bundle

    pieces: list[str] = []

    def on_text(t: str) -> None:
        pieces.append(t)
        console.print(t, end="", markup=False, highlight=False)

    run_bundle(bundles["android"], load_image(image), question, max_new_tokens=24, on_text=on_text)
    console.print()
    done("answer", image=str(image), question=question, answer="".join(pieces).strip(), expected=expected)

    if not skip_bench:
        header(5, "bench", "benchmark the bundles against eager PyTorch")
        report = out / "bench.json"
        cli(["bench", "--model", str(ckpt), "--bundle", str(bundles["android"]), "--bundle", str(bundles["onnx"]),
             "--prompt-tokens", "32", "--new-tokens", "32", "--repeat", str(bench_repeat),
             "--json", str(report)])
        done("bench", report=str(report))

    console.rule("[bold green]quickstart finished")
    console.print(f"total wall time this run: {time.perf_counter() - t_start:.0f} s")
    console.print(f"data and checkpoints: {out / 'train'}  (per-stage results: {out / 'train' / 'results.json'})")
    console.print(f"ExecuTorch bundle:    {bundles['android']}")
    console.print(f"ONNX bundle:          {bundles['onnx']}")
    if not skip_bench:
        console.print(f"benchmark report:     {out / 'bench.json'}")
    console.print(f"try it:  mobilemllm generate --bundle {bundles['android']} --image {image} "
                  f"--prompt \"{question}\"")


def _sample_question(train_dir: Path) -> tuple[Path, str, str]:
    """The first held-out question of the evaluation split."""
    from mobilemllm.errors import UserError

    for cand in sorted(train_dir.rglob("eval_questions.json")):
        recs = json.loads(cand.read_text())
        if recs:
            rec = recs[0]
            conv = rec["conversations"]
            return cand.parent / "images" / rec["image"], conv[0]["value"].replace("<image>", "").strip(), \
                conv[1]["value"]
    raise UserError(f"no eval_questions.json under {train_dir}; run `mobilemllm quickstart --fresh`")
