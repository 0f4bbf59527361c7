"""The rm and ppo stages: Bradley-Terry, GAE and PPO's clipped losses by hand; both stages train a small model,
write checkpoint folders, report what they should, and resume exactly after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobilemllm.config import ModelConfig
from mobilemllm.data.shapes import write_synthetic
from mobilemllm.data.tokenizer import tiny_tokenizer
from mobilemllm.errors import ConfigError
from mobilemllm.models.checkpoint import load_checkpoint, save_checkpoint
from mobilemllm.models.vlm import MobileVLM
from mobilemllm.training.ppo import AdaptiveKL, gae, masked_whiten, ppo_losses
from mobilemllm.training.recipes import load_recipe
from mobilemllm.training.reward import bradley_terry_loss, load_reward_model
from mobilemllm.training.trainer import Trainer

SMALL = dict(llm={"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128})


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    write_synthetic(root / "data", num_images=32, seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    save_checkpoint(MobileVLM(cfg), tiny_tokenizer(cfg.llm.vocab_size, num_images=100), root / "instruct")
    return root


def _recipe(world: Path, path: Path, *extra: str) -> dict:
    path.write_text(
        "# mobilemllm train --recipe THIS --stage rm\n"
        f"data: {world / 'data'}\neval_data: {world / 'data'}\nseed: 0\nnum_threads: 1\n"
        "stages: [instruct, rm, ppo]\n"
        "rm: {lr: 1.0e-3, global_batch: 8, micro_batch: 4, max_steps: 4, warmup_ratio: 0.0, save_every: 2}\n"
        "ppo: {lr: 1.0e-4, global_batch: 4, micro_batch: 2, max_steps: 4, warmup_ratio: 0.0, save_every: 2,\n"
        "      max_new_tokens: 6, ppo_epochs: 2, kl_coef: 0.1, target_kl: 0.5, kl_horizon: 10}\n"
        "eval: {limit: 8, batch_size: 8}\n")
    return load_recipe(path, list(extra))


def _run(recipe, out, stages, init, **kw):
    from mobilemllm.training.pipeline import run_recipe

    return run_recipe(recipe, out, stages=stages, init=init, progress=False, log=lambda m: None, **kw)


def _die_after_saving(monkeypatch, at: int):
    real = Trainer.save_state

    def save_then_die(self, step):
        real(self, step)
        if step == at:
            raise _Interrupt()

    monkeypatch.setattr(Trainer, "save_state", save_then_die)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in folder.read_text().splitlines()]


# ---------------------------------------------------------------------------------------- by hand
def test_bradley_terry_gae_and_clipped_losses_by_hand():
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0])).item() == pytest.approx(
        -torch.log(torch.sigmoid(torch.tensor(2.0))).item())
    # one row of 3 answer tokens, gamma=1, lam=1: advantages are reward-to-go minus the value
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.8, 0.9])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])
    # lam=0: one-step TD errors; a padded last position is ignored
    adv0, _ = gae(torch.tensor([[0.0, 1.0, 7.0]]), v, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.0)
    assert adv0.tolist()[0] == pytest.approx([0.2 - 0.5, 1.0 - 0.2, 0.0])
    w = masked_whiten(torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0
    # a ratio beyond 1 + clip with a positive advantage: the clipped term wins and counts in clipfrac
    out = ppo_losses(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.0]]),
                     torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), clip=0.2, clip_value=0.2)
    assert out["pg_loss"].item() == pytest.approx(-1.2) and out["clipfrac"].item() == 1.0
    assert out["vf_loss"].item() == pytest.approx(0.5)  # max((1-0)^2, (0.2-0)^2) / 2
    kl = AdaptiveKL(0.1, target=1.0, horizon=10)
    kl.update(3.0, 5)  # KL far above target: +20 % x 5/10
    assert kl.value == pytest.approx(0.11)
    fixed = AdaptiveKL(0.1, target=None, horizon=10)
    fixed.update(3.0, 5)
    assert fixed.value == 0.1


def test_alignment_stages_start_from_instruct_in_either_branch():
    from mobilemllm.training.pipeline import _previous

    both = ["pretrain", "instruct", "dpo", "rm", "ppo"]
    assert [_previous(both, s) for s in ("dpo", "rm", "ppo")] == ["instruct"] * 3
    assert _previous(["pretrain", "instruct", "rm", "ppo"], "ppo") == "instruct"


def test_bad_alignment_configs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"ppo.ppo_epochs must be >= 1, got 0; ppo.clip_range must be > 0.0, got -1"):
        load_recipe("tiny", ["ppo.clip_range=-1", "ppo.ppo_epochs=0"])
    with pytest.raises(ConfigError, match=r"unknown stage.*rlhf.*valid: .*rm, ppo"):
        load_recipe("tiny", ["stages=[pretrain,rlhf]"])
    with pytest.raises(ConfigError, match=r"rm: unknown key\(s\) beta"):
        load_recipe("tiny", ["rm.beta=0.1"])


# ------------------------------------------------------------------------------------- the stages
def test_rm_stage_learns_reports_pair_accuracy_and_resumes_exactly(world, tmp_path, monkeypatch):
    recipe = _recipe(world, tmp_path / "r.yaml", "rm.data=[dpo.json,dpo_omissions.json]")
    full = _run(recipe, tmp_path / "full", ["rm"], world / "instruct")
    report = full["stages"]["rm"]["eval"]["reward"]
    # held out: each file it was trained on, 8 pairs each (eval.limit), and pooled
    assert sorted(report["by_file"]) == ["dpo.json", "dpo_omissions.json"] and report["n"] == 16
    assert report["pair_accuracy"] == pytest.approx(sum(r["pair_accuracy"] for r in report["by_file"].values()) / 2)
    assert 0.0 <= report["pair_accuracy"] <= 1.0
    rows = _metrics(tmp_path / "full" / "logs" / "rm" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "rewards/accuracies" in rows[0]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=0.05)  # a fresh head scores both answers alike

    _die_after_saving(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        _run(recipe, tmp_path / "cut", ["rm"], world / "instruct", evaluate_stages=False)
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "rm").exists()
    resumed = _run(recipe, tmp_path / "cut", ["rm"], world / "instruct", evaluate_stages=False)
    assert json.loads((tmp_path / "cut" / "rm" / "training_state.json").read_text())["train"]["resumed_from"] == 2
    cut = _metrics(tmp_path / "cut" / "logs" / "rm" / "metrics.jsonl")
    assert [r["loss"] for r in cut] == [r["loss"] for r in rows]
    a, _ = load_reward_model(tmp_path / "full" / "rm")
    b, _ = load_reward_model(tmp_path / "cut" / "rm")
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    assert resumed["stages"]["rm"]["checkpoint"].endswith("rm")

    from mobilemllm.training.pipeline import _evaluate_reward_model
    state = json.loads((tmp_path / "full" / "rm" / "training_state.json").read_text())
    state["config"]["eval_pairs"] = "dpo.json"  # rm.eval_pairs names the held-out file(s)
    one = _evaluate_reward_model(tmp_path / "full" / "rm", world / "data", state, {"limit": 8, "batch_size": 8})
    assert list(one["reward"]["by_file"]) == ["dpo.json"] and one["reward"]["n"] == 8


def test_ppo_stage_logs_rl_metrics_and_resumes_exactly(world, tmp_path, monkeypatch):
    recipe = _recipe(world, tmp_path / "r.yaml")
    _run(recipe, tmp_path / "full", ["rm"], world / "instruct", evaluate_stages=False)
    for d in ("cut",):
        (tmp_path / d).mkdir()
        import shutil

        shutil.copytree(tmp_path / "full" / "rm", tmp_path / d / "rm")
    full = _run(recipe, tmp_path / "full", ["ppo"], world / "instruct", evaluate_stages=False)
    # `--stage ppo` keeps the reward model's entry in results.json (same checkpoint, same settings) ...
    written = json.loads((tmp_path / "full" / "results.json").read_text())["stages"]
    assert list(written) == ["rm", "ppo"] and written["rm"]["fingerprint"]
    # ... but not one written for other settings of the stage
    (tmp_path / "full" / "results.json").write_text(json.dumps({"stages": {"rm": dict(written["rm"], fingerprint="0")}}))
    _run(recipe, tmp_path / "full", ["ppo"], world / "instruct", evaluate_stages=False)
    assert list(json.loads((tmp_path / "full" / "results.json").read_text())["stages"]) == ["ppo"]
    rows = _metrics(tmp_path / "full" / "logs" / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "pg_loss", "vf_loss", "loss"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollouts come from the reference itself
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive
    assert (tmp_path / "full" / "ppo" / "value_head.safetensors").is_file()
    policy, _ = load_checkpoint(tmp_path / "full" / "ppo")
    start, _ = load_checkpoint(world / "instruct")
    assert any(not torch.equal(a, b) for (n, a), (_, b) in zip(policy.named_parameters(), start.named_parameters())
               if n.startswith("llm."))
    assert all(torch.equal(a, b) for (n, a), (_, b) in zip(policy.named_parameters(), start.named_parameters())
               if n.startswith("vision."))

    _die_after_saving(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        _run(recipe, tmp_path / "cut", ["ppo"], world / "instruct", evaluate_stages=False)
    monkeypatch.undo()
    _run(recipe, tmp_path / "cut", ["ppo"], world / "instruct", evaluate_stages=False)
    cut = _metrics(tmp_path / "cut" / "logs" / "ppo" / "metrics.jsonl")
    strip = ("tokens_per_s", "steps_per_s", "elapsed_s", "threads")
    assert [{k: v for k, v in r.items() if k not in strip} for r in cut] == \
        [{k: v for k, v in r.items() if k not in strip} for r in rows]
    again, _ = load_checkpoint(tmp_path / "cut" / "ppo")
    for (n, a), (_, b) in zip(policy.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    assert full["stages"]["ppo"]["checkpoint"].endswith("ppo")


def test_ppo_without_a_reward_model_says_what_to_run(world, tmp_path):
    from mobilemllm.errors import UserError

    recipe = _recipe(world, tmp_path / "r.yaml")
    with pytest.raises(UserError, match="not a reward model.*--stage rm"):
        _run(recipe, tmp_path / "out", ["ppo"], world / "instruct", evaluate_stages=False)
