"""Collect several runs of a recipe (one per seed) into one JSON: the numbers per seed and stage, and which of
the tiny recipe's targets each seed meets. How reliable a recipe is can only be told across seeds.

    mobilemllm train --recipe tiny --out runs/seed0 seed=0     # ... one run per seed
    python -m mobilemllm.training.seeds runs/seed0 runs/seed1 > seeds.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mobilemllm.data.shapes import POPE_SPLITS
from mobilemllm.evaluation.metrics import object_rate_change

ALIGNED = ("dpo", "ppo")
# the tiny recipe's targets after alignment (docs/training.md); an aligned model that names fewer of the
# image's objects than this below its instruct model has stopped describing (a hacked reward), not improved
POPE_MIN, PARAPHRASE_MIN, RECALL_DROP_MAX = 0.85, 0.90, 0.10


def stage_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one stage's evaluation report that the seeds table shows."""
    pope = report.get("pope", {})
    return {"vqa": report["vqa"]["accuracy"], "paraphrase": report["paraphrase"]["accuracy"],
            "paraphrase_by_type": report["paraphrase"]["by_type"],
            "pope": {s: {k: pope[s][k] for k in ("accuracy", "f1", "yes_ratio")} for s in POPE_SPLITS if s in pope},
            "caption_object_halluc": report["captions"]["object_rate"],
            "caption_object_halluc_ci": report["captions"].get("object_rate_ci"),
            "caption_halluc_captions": report["captions"]["caption_rate"],
            "caption_recall": report["captions"].get("recall")}


def targets(stages: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Which targets a run meets, per aligned stage: POPE accuracy and F1 >= 85 % on every split, paraphrases
    >= 90 %, and fewer hallucinated caption objects than the instruct model while still naming the image's
    objects (caption recall at most 10 points below the instruct model's: a policy that stops describing has no
    hallucinated objects either)."""
    out = {}
    base = stages["instruct"]["caption_object_halluc"]
    base_recall = stages["instruct"].get("caption_recall")
    for stage in ALIGNED:
        s = stages.get(stage)
        if s is None:
            continue
        out[f"{stage}_pope"] = all(p["accuracy"] >= POPE_MIN and p["f1"] >= POPE_MIN for p in s["pope"].values())
        out[f"{stage}_paraphrase"] = s["paraphrase"] >= PARAPHRASE_MIN
        recall, kept = s.get("caption_recall"), True
        if recall is not None and base_recall is not None:
            kept = recall >= base_recall - RECALL_DROP_MAX
        out[f"{stage}_lowers_hallucination"] = s["caption_object_halluc"] < base and kept
    return out


def halluc_change(captions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each aligned stage's change of the hallucinated-object rate against the instruct model, with its
    paired 95 % bootstrap interval (None for reports made before they kept per-caption counts)."""
    base = captions.get("instruct")
    return {stage: object_rate_change(base, captions[stage]) if base else None
            for stage in ALIGNED if stage in captions}


def collect(run_dirs: list[Path]) -> dict[str, Any]:
    """Every run folder's results.json, reduced to the seeds table's numbers."""
    runs = []
    for folder in run_dirs:
        res = json.loads((Path(folder) / "results.json").read_text())
        state = json.loads((Path(folder) / "instruct" / "training_state.json").read_text())
        stages = {name: stage_numbers(e["eval"]) for name, e in res["stages"].items()
                  if e.get("eval") and "vqa" in e["eval"]}
        rm = ((res["stages"].get("rm") or {}).get("eval") or {}).get("reward") or {}
        captions = {name: e["eval"]["captions"] for name, e in res["stages"].items()
                    if (e.get("eval") or {}).get("captions")}
        train_wall = sum(e.get("train_wall_s") or 0 for e in res["stages"].values())
        train_cpu = sum(e.get("train_cpu_s") or 0 for e in res["stages"].values())
        runs.append({"seed": (state.get("config") or {}).get("seed"), "run": str(folder), "stages": stages,
                     "rm_pair_accuracy": rm.get("pair_accuracy"), "targets": targets(stages),
                     "halluc_change": halluc_change(captions),
                     "train_wall_s": round(train_wall, 1), "train_cpu_s": round(train_cpu, 1),
                     "torch_threads": res.get("torch_threads")})
    return {"runs": runs}


if __name__ == "__main__":
    print(json.dumps(collect([Path(a) for a in sys.argv[1:]]), indent=1))
