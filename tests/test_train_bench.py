"""`mobilemllm train-bench`: the trainer's throughput on a preset's shapes with random weights."""

from __future__ import annotations

import json

import pytest

from mobilemllm.cli import main


def test_train_bench_times_the_real_trainer_on_tiny(tmp_path, capsys):
    out = tmp_path / "tb.json"
    code = main(["train-bench", "--preset", "tiny", "--steps", "6", "--warmup", "2", "--micro-batch", "2",
                 "--global-batch", "4", "--text-tokens", "40", "--answer-tokens", "8", "--no-progress",
                 "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["preset"] == "tiny" and r["stage"] == "instruct" and r["precision"] == "fp32"
    assert (r["timed_steps"], r["global_batch"], r["micro_batch"]) == (4, 4, 2)
    assert r["sequence_tokens"] == 1 + r["visual_tokens"] + 40 == 57
    assert r["tokens_per_s"] == pytest.approx(57 * 4 * 4 / r["timed_s"], rel=1e-3)
    assert r["text_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * 40 / 57, rel=1e-3)
    # instruct trains connector + LLM, not the vision tower
    assert r["trainable_parameters"] == r["parameters"]["connector"] + r["parameters"]["llm"]
    assert r["peak_memory_bytes"] > 50 * 2**20 and r["model_tflops_per_s"] > 0
    assert r["final_loss"] is not None and 0 < r["final_loss"] < 20
    assert "tokens/s per device" in capsys.readouterr().out


def test_train_bench_pretrain_trains_the_connector_only(tmp_path):
    from mobilemllm.training.throughput import measure

    r = measure("tiny", stage="pretrain", steps=3, warmup=1, micro_batch=2, text_tokens=24, answer_tokens=8,
                progress=False, grad_checkpointing=False)
    assert r["trainable_parameters"] == r["parameters"]["connector"]


@pytest.mark.parametrize("args, message", [
    (["--text-tokens", "4000"], "exceed tiny's context of 256"),
    (["--stage", "dpo"], "unknown stage 'dpo'"),
    (["--steps", "3", "--warmup", "3"], "must be larger than --warmup"),
    (["--text-tokens", "16", "--answer-tokens", "20"], "--answer-tokens must be between 1 and --text-tokens"),
])
def test_train_bench_bad_options_get_one_line(args, message, capsys):
    assert main(["train-bench", "--no-progress", *args]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
