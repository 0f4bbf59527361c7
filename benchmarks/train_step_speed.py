"""Seconds per optimizer step of the tiny recipe's instruct stage, with and without the trainer's savings.

    python benchmarks/train_step_speed.py --run runs/fixture0 --threads 2 --json speed.json

Builds the instruct stage as ``mobilemllm train`` does (the recipe's data files, template, freezing and
curriculum) from ``<run>/data`` and ``<run>/pretrain``, and times optimizer steps of both phases: the
curriculum (the canonically worded one-line questions) and the mixed phase after it (conversations,
captions, grammar-worded questions). Three settings, each the same arithmetic up to float rounding:

- ``full``: the model's plain forward (every row computes the whole prompt, logits at every position),
  each global batch of 64 one micro-batch;
- ``lean``: the objectives' lean forward (the prompt text all rows share once per batch, the LM head at
  the answer tokens only);
- ``lean+tokens``: plus ``micro_batch_tokens: 4096`` (the recipe: micro-batches of bounded padded size).

The settings alternate within a round, each leading one round in turn, so drifting load on a shared machine
reaches all of them alike;
reported per phase and setting: the median seconds per step over all rounds, and its ratio to ``full``.
Every setting trains the same model object on from where the previous one stopped: the timing does not
depend on the weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobilemllm.models.checkpoint import load_checkpoint
from mobilemllm.training import pipeline
from mobilemllm.training.recipes import load_recipe, stage_options, stage_train_config
from mobilemllm.training.stages import get_stage, trainable_parts
from mobilemllm.training.trainer import Trainer

SETTINGS = {"full": (False, None), "lean": (True, None), "lean+tokens": (True, 4096)}


def build(run: Path):
    """The instruct stage's model, objective, data and config as the pipeline makes them."""
    recipe = load_recipe("tiny")
    cfg, opts = stage_train_config(recipe, "instruct"), stage_options(recipe, "instruct")
    data_dir = run / "data" / "train"
    paths = [data_dir / f for f in opts["data"]]
    model, tok = load_checkpoint(run / "pretrain")
    st = get_stage("instruct")
    model.set_trainable(**trainable_parts(st, None, None, None))
    dataset, objective, collate_fn = pipeline._stage_data(recipe, st.objective, model, tok, None, opts, paths,
                                                          opts.get("template") or st.template)
    curriculum = pipeline._curriculum_indices("instruct", cfg, opts, dataset, paths, data_dir)
    return model, objective, dataset, collate_fn, cfg, curriculum


def time_steps(trainer: Trainer, first: int, n: int) -> list[float]:
    out = []
    for step in range(first, first + n):
        t0 = time.perf_counter()
        trainer._step(step, trainer.model)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a tiny recipe run folder (data/ and pretrain/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per phase, setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, objective, dataset, collate_fn, cfg, curriculum = build(args.run)
    phases = {"curriculum": 100, "mixed": cfg.curriculum_steps + 100}  # first step of each timed stretch
    times: dict[str, dict[str, list[float]]] = {s: {p: [] for p in phases} for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(SETTINGS)
            for name in names[r % len(names):] + names[:r % len(names)]:  # each setting leads a round in turn
                lean, tokens = SETTINGS[name]
                objective.lean = lean
                tc = dataclasses.replace(cfg, micro_batch_tokens=tokens, num_threads=args.threads)
                trainer = Trainer(model, objective, dataset, collate_fn, tc, Path(tmp) / name, progress=False,
                                  curriculum=curriculum)
                trainer._build_optimizer(model)
                model.train()
                for phase, first in phases.items():
                    time_steps(trainer, first + r * args.steps, 2)  # warm-up: allocator, first batches
                    times[name][phase] += time_steps(trainer, first + r * args.steps + 2, args.steps)
                print(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                    f"{p} {statistics.median(v):.4f} s/step" for p, v in times[name].items()), file=sys.stderr)
    median = {s: {p: statistics.median(v) for p, v in ph.items()} for s, ph in times.items()}
    out = {"command": " ".join(["python", "benchmarks/train_step_speed.py"] + sys.argv[1:]),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
           "torch": torch.__version__, "steps_per_round": args.steps, "rounds": args.rounds,
           "phase_first_step": phases, "median_s_per_step": median,
           "ratio_to_full": {s: {p: round(median[s][p] / median["full"][p], 3) for p in phases} for s in SETTINGS},
           "s_per_step": times}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"median_s_per_step": median, "ratio_to_full": out["ratio_to_full"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
