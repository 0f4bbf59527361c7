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


def test_collect_gives_each_aligned_stage_its_hallucination_change_with_an_interval(tmp_path):
    """With per-caption counts in the reports (evaluation reports of version 2) each aligned stage gets its
    paired change against the instruct model; an older report without them gets None, not a made-up interval."""
    from mobilemllm.evaluation.metrics import caption_hallucination

    truth = [["red circle", "blue square"]] * 100
    folder = _run(tmp_path / "a", 0, 0.1, 0.99)
    res = json.loads((folder / "results.json").read_text())
    for stage, every in (("instruct", 2), ("dpo", 4)):
        said = [{"red circle"} | ({"green diamond"} if i % every == 0 else set()) for i in range(100)]
        res["stages"][stage]["eval"]["captions"] = caption_hallucination(said, truth)
    (folder / "results.json").write_text(json.dumps(res))
    run = collect([folder])["runs"][0]
    dpo = run["halluc_change"]["dpo"]
    assert dpo["change"] < 0 and dpo["ci"][0] <= dpo["change"] <= dpo["ci"][1] < 0
    assert run["halluc_change"]["ppo"] is None
    assert run["stages"]["dpo"]["caption_object_halluc_ci"][1] < run["stages"]["instruct"]["caption_object_halluc_ci"][0]


def test_a_policy_that_stops_naming_objects_does_not_lower_hallucination(tmp_path):
    """A reward-hacked policy (captions answered "no": no objects named, none hallucinated) misses the target."""
    hacked = collect([_run(tmp_path / "a", 0, 0.1, 0.99, ppo_recall=0.0)])["runs"][0]
    assert hacked["stages"]["ppo"]["caption_object_halluc"] < hacked["stages"]["instruct"]["caption_object_halluc"]
    assert hacked["targets"]["ppo_lowers_hallucination"] is False
    assert hacked["targets"]["dpo_lowers_hallucination"] is True


def _sweep():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_sweep.py"
    spec = importlib.util.spec_from_file_location("seed_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_sweep_reads_its_arguments_and_a_run_folder(tmp_path, monkeypatch, capsys):
    """benchmarks/seed_sweep.py: seeds and settings parsed, data overrides refused before any work, and a run's
    results.json reduced to the look-up targets (a stopped run: the stage and step it reached)."""
    import pytest

    sweep = _sweep()
    assert sweep._seeds("0-2,5") == [0, 1, 2, 5]
    assert sweep._setting("wd=instruct.weight_decay=0.1 ppo.lr=3e-5") == (
        "wd", ["instruct.weight_decay=0.1", "ppo.lr=3e-5"])
    assert sweep._setting("base=") == ("base", [])
    monkeypatch.setattr("sys.argv", ["seed_sweep.py", "--setting", "x=synthetic.train_images=10", "--out",
                                     str(tmp_path), "--json", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit):
        sweep.main()
    assert "put synthetic/data overrides in --common" in capsys.readouterr().err
    assert not (tmp_path / "shared").exists()

    run = tmp_path / "run"
    (run / "logs" / "dpo").mkdir(parents=True)
    (run / "instruct").mkdir()
    (run / "instruct" / "training_state.json").write_text("{}")
    (run / "logs" / "dpo" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 7}\n')
    assert sweep._stage_reached(run, ["instruct", "dpo"]) == {"finished": "instruct", "stage": "dpo", "step": 7}
    (run / "results.json").write_text(json.dumps({"stages": {"instruct": {"train_wall_s": 3, "eval": _report(
        0.95, 0.9, 0.3)}}}))
    out = sweep._summary(run, "instruct")
    assert out["meets_lookup_targets"] and out["pope_accuracy"]["adversarial"] == 0.9
    assert sweep._summary(run, "dpo") == {}
    rows = [{"step": i + 1, "loss": 1.0 if i < 100 else 0.5} for i in range(150)] + [{"event": "saved"}]
    (run / "logs" / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep._loss_windows(run, "dpo") == [1.0, 0.5]  # means over 100 steps, non-loss lines skipped
    assert sweep._loss_windows(run, "ppo") == []
