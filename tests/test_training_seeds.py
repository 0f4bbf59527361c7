"""python -m mobilemllm.training.seeds: runs of several seeds reduced to the table's numbers and the targets
each seed meets."""

from __future__ import annotations

import json
from pathlib import Path

from mobilemllm.training.seeds import collect


def _report(vqa: float, pope_acc: float, halluc: float, recall: float = 0.9) -> dict:
    pope = {s: {"accuracy": pope_acc, "f1": pope_acc, "yes_ratio": 0.5} for s in ("random", "popular", "adversarial")}
    return {"vqa": {"accuracy": vqa}, "paraphrase": {"accuracy": vqa, "by_type": {}}, "pope": pope,
            "captions": {"object_rate": halluc, "caption_rate": halluc, "recall": recall}}


def _run(folder: Path, seed: int, dpo_halluc: float, ppo_pope: float, ppo_recall: float = 0.85) -> Path:
    stages = {"instruct": {"eval": _report(0.99, 0.99, 0.2), "train_wall_s": 10, "train_cpu_s": 20},
              "dpo": {"eval": _report(0.99, 0.99, dpo_halluc), "train_wall_s": 1, "train_cpu_s": 2},
              "rm": {"eval": {"reward": {"pair_accuracy": 1.0}}},
              "ppo": {"eval": _report(0.95, ppo_pope, 0.1, ppo_recall), "train_wall_s": 1, "train_cpu_s": 2}}
    (folder / "instruct").mkdir(parents=True)
    (folder / "instruct" / "training_state.json").write_text(json.dumps({"config": {"seed": seed}}))
    (folder / "results.json").write_text(json.dumps({"stages": stages, "torch_threads": 2}))
    return folder


def test_collect_reports_each_seeds_numbers_and_targets(tmp_path):
    runs = collect([_run(tmp_path / "a", 0, 0.1, 0.99), _run(tmp_path / "b", 1, 0.3, 0.80)])["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(runs[0]["targets"].values())
    assert runs[1]["targets"] == {"dpo_pope": True, "dpo_paraphrase": True, "dpo_lowers_hallucination": False,
                                  "ppo_pope": False, "ppo_paraphrase": True, "ppo_lowers_hallucination": True}
    assert runs[0]["rm_pair_accuracy"] == 1.0 and runs[0]["train_wall_s"] == 12 and runs[0]["train_cpu_s"] == 24


def test_a_policy_that_stops_naming_objects_does_not_lower_hallucination(tmp_path):
    """A reward-hacked policy (captions answered "no": no objects named, none hallucinated) misses the target."""
    hacked = collect([_run(tmp_path / "a", 0, 0.1, 0.99, ppo_recall=0.0)])["runs"][0]
    assert hacked["stages"]["ppo"]["caption_object_halluc"] < hacked["stages"]["instruct"]["caption_object_halluc"]
    assert hacked["targets"]["ppo_lowers_hallucination"] is False
    assert hacked["targets"]["dpo_lowers_hallucination"] is True
