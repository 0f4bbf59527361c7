"""`mobilemllm train`: run a training recipe's stages (foundations, pretrain, instruct, dpo, rm, ppo).

Single process, or under torchrun for DDP / FSDP2:
    mobilemllm train --recipe tiny --stage all --out runs/tiny
    torchrun --nproc-per-node 2 -m mobilemllm train --recipe tiny --stage instruct --out runs/tiny
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def train(
    recipe: str = typer.Option("tiny", "--recipe", "-r", help="A shipped recipe name (tiny, mobilevlm-v2-1.7b) "
                               "or a path to a recipe .yaml file."),
    stage: str = typer.Option("all", "--stage", "-s", help="foundations, pretrain, instruct, dpo, rm, ppo, or all "
                              "(the recipe's `stages` list in order)."),
    out: Path = typer.Option(Path("runs/tiny"), "--out", "-o", help="Output folder: one checkpoint folder per "
                             "stage, logs/<stage>/metrics.jsonl, results.json."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Recipe overrides as key=value, e.g. "
                                                    "instruct.lr=1e-4 instruct.epochs=2 data=/path/to/llava"),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of LLaVA-format training files "
                                        "(default: the recipe's; tiny writes the synthetic world)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint folder the first stage run starts from "
                                        "(default: the previous stage's folder in --out)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted stage from its last "
                                "saved state and reuse finished, unchanged stages; --no-resume retrains them."),
    resume_changed: bool = typer.Option(False, "--resume-changed/--no-resume-changed", help="Continue an "
                                        "interrupted stage even though its settings (lr, steps, batch, data, ...) "
                                        "changed since its state was saved: the new ones apply from the saved step "
                                        "on, and the change is recorded in logs/<stage>/metrics.jsonl and the "
                                        "stage's training_state.json. Without it such a resume is refused."),
    fresh: bool = typer.Option(False, "--fresh/--no-fresh", help="Delete the stages' folders in --out first."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate each trained stage on the recipe's "
                                  "evaluation data."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    allow_outside_images: bool = typer.Option(
        False, "--allow-outside-images/--no-allow-outside-images",
        help="Let records name images outside their image folder (absolute paths, '..', links out)."),
) -> None:
    """Train a model with a recipe: stages run in order, each from the previous stage's checkpoint.

    One run at a time may use an output folder (a second one stops at once). OpenMP threads sleep
    instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy):
    on a CPU shared with other work that is several times faster."""
    from mobilemllm.training.threads import prefer_passive_omp_wait  # lazy: cli startup

    prefer_passive_omp_wait()  # before the import below loads torch and its OpenMP runtime
    from mobilemllm.training.pipeline import print_results, run_recipe  # lazy: cli startup
    from mobilemllm.training.recipes import load_recipe  # lazy: cli startup
    from mobilemllm.training.stages import get_stage  # lazy: cli startup

    if stage != "all":
        get_stage(stage)  # unknown stage: fail before any work
    extra = list(overrides or [])
    if data is not None:
        extra.append(f"data={data}")
    if allow_outside_images:
        extra.append("allow_outside_images=true")
    rec = load_recipe(recipe, extra)
    stages = None if stage == "all" else [stage]
    results = run_recipe(rec, out, stages=stages, resume=resume, fresh=fresh, evaluate_stages=evaluate, init=init,
                         progress=progress, resume_changed=resume_changed)
    from mobilemllm.training.distributed import dist_env  # lazy: cli startup

    if dist_env().is_main:
        print_results(results)
        typer.echo(f"checkpoints in {out}; results in {out / 'results.json'} "
                   f"({results['total_wall_s']:.0f} s)")
