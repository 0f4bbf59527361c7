"""Training: stages freeze what they say, DPO loss by hand, resume == uninterrupted, torchrun (gloo)
== one process, NaN stops cleanly, a short run lowers the loss, recipes and CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobilemllm.config import ModelConfig
from mobilemllm.data.dataset import ConversationDataset, PreferenceDataset, collate
from mobilemllm.data.shapes import write_synthetic
from mobilemllm.data.tokenizer import tiny_tokenizer
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.models.checkpoint import load_checkpoint, save_checkpoint
from mobilemllm.models.vlm import MobileVLM
from mobilemllm.training.losses import DPOObjective, LMObjective, dpo_loss, sequence_logps
from mobilemllm.training.recipes import load_recipe, recipe_names
from mobilemllm.training.stages import STAGES, trainable_parts
from mobilemllm.training.trainer import Trainer, TrainConfig, TrainingDiverged, cosine_with_warmup

SMALL = dict(llm={"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128})


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A 64-image synthetic data set, a small tiny-config model checkpoint with its tokenizer."""
    root = tmp_path_factory.mktemp("train_small")
    write_synthetic(root / "data", num_images=64, seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    tok = tiny_tokenizer(cfg.llm.vocab_size, num_images=100)
    model = MobileVLM(cfg)
    save_checkpoint(model, tok, root / "init")
    return root


def _load(world):
    return load_checkpoint(world / "init")


def _instruct_trainer(world, run_dir, curriculum=None, **cfg):
    model, tok = _load(world)
    model.set_trainable(**STAGES["instruct"].trainable)
    ds = ConversationDataset(world / "data" / "instruct.json", None, tok, model.config)
    tc = TrainConfig(**{"lr": 3e-3, "global_batch": 8, "micro_batch": 4, "max_steps": 6, "warmup_ratio": 0.0,
                        **cfg})
    return Trainer(model, LMObjective(), ds, lambda s: collate(s, tok.pad_token_id), tc, run_dir, progress=False,
                   curriculum=curriculum)


# ------------------------------------------------------------------------------------------ stages
@pytest.mark.parametrize("stage", ["pretrain", "instruct", "dpo"])
def test_stage_freezes_exactly_what_it_says(small_world, tmp_path, stage):
    model, tok = _load(small_world)
    st = STAGES[stage]
    parts = trainable_parts(st)
    model.set_trainable(**parts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if st.objective == "dpo":
        ref, _ = _load(small_world)
        ds = PreferenceDataset(small_world / "data" / "dpo.json", None, tok, model.config)
        obj = DPOObjective(ref, beta=0.1)
        coll = lambda items: collate([c for c, _ in items] + [r for _, r in items], tok.pad_token_id)  # noqa: E731
    else:
        ds = ConversationDataset(small_world / "data" / st.data, None, tok, model.config, template=st.template)
        obj, coll = LMObjective(), (lambda s: collate(s, tok.pad_token_id))
    tc = TrainConfig(lr=1e-2, global_batch=4, micro_batch=4, max_steps=2, warmup_ratio=0.0)
    Trainer(model, obj, ds, coll, tc, tmp_path / "run", progress=False).fit(resume=False)
    for part in ("vision", "connector", "llm"):
        params = dict(model.part(part).named_parameters())
        assert all(p.requires_grad == parts[part] for p in params.values()), part
        changed = [n for n, p in params.items() if not torch.equal(p, before[f"{part}.{n}"])]
        if parts[part]:
            assert changed, f"{stage}: trainable {part} did not change"
        else:
            assert not changed, f"{stage}: frozen {part} changed: {changed[:3]}"
    assert parts == {"pretrain": dict(vision=False, connector=True, llm=False),
                     "instruct": dict(vision=False, connector=True, llm=True),
                     "dpo": dict(vision=False, connector=True, llm=True)}[stage]


def test_trainable_overrides():
    assert trainable_parts(STAGES["pretrain"], train_vision=True, train_llm=True) == \
        dict(vision=True, connector=True, llm=True)


# --------------------------------------------------------------------------------------------- DPO
def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.5
    losses, crew, rrew = dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: (pc-rc) - (pr-rr) = 0.5 - (-0.5) = 1.0 ; pair 1: (-1.0) - (1.0) = -2.0
    expected = [-math.log(1 / (1 + math.exp(-beta * 1.0))), -math.log(1 / (1 + math.exp(-beta * -2.0)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert crew.tolist() == pytest.approx([0.25, -0.5])
    assert rrew.tolist() == pytest.approx([-0.25, 0.5])


def test_rpo_adds_the_chosen_answers_mean_token_nll(small_world):
    """dpo.rpo_alpha (RPO, trl's rpo_alpha): the DPO loss plus alpha x each chosen answer's mean token NLL;
    0 leaves plain DPO, and the rejected answers do not enter the added term."""
    model, tok = _load(small_world)
    ref, _ = _load(small_world)
    ds = PreferenceDataset(small_world / "data" / "dpo.json", None, tok, model.config)
    pairs = [ds[i] for i in range(3)]
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], tok.pad_token_id)
    with torch.no_grad():
        plain, _ = DPOObjective(ref, 0.1).loss(model, batch)
        rpo, metrics = DPOObjective(ref, 0.1, rpo_alpha=0.5).loss(model, batch)
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]).logits
    means = []
    for row in range(3):  # by hand: log-softmax at each position that predicts a labelled token
        logp = torch.log_softmax(logits[row, :-1].float(), -1)
        target = batch["labels"][row, 1:]
        keep = target != -100
        means.append(-logp[keep].gather(-1, target[keep].unsqueeze(-1)).mean())
    assert plain.item() == pytest.approx(3 * math.log(2), abs=1e-4)  # policy == reference
    assert metrics["nll/chosen"].item() == pytest.approx(sum(means).item(), rel=1e-4)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * sum(means).item(), rel=1e-4)
    # the pipeline's lean forward (prompt shared, LM head at the answers): the same numbers
    with torch.no_grad():
        lean, lean_metrics = DPOObjective(ref, 0.1, rpo_alpha=0.5, lean=True).loss(model, batch)
    assert lean.item() == pytest.approx(rpo.item(), rel=1e-5)
    assert lean_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert lean_metrics[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key


def test_sequence_logps_sums_only_labelled_tokens():
    logits = torch.log_softmax(torch.randn(1, 4, 5), -1)
    labels = torch.tensor([[-100, 3, -100, 1]])
    want = logits[0, 0, 3] + logits[0, 2, 1]
    assert sequence_logps(logits, labels).item() == pytest.approx(want.item(), rel=1e-5)


def test_dpo_against_itself_starts_at_log2_and_logs_trl_metrics(small_world, tmp_path):
    model, tok = _load(small_world)
    ref, _ = _load(small_world)
    model.set_trainable(**STAGES["dpo"].trainable)
    ds = PreferenceDataset(small_world / "data" / "dpo.json", None, tok, model.config)
    coll = lambda items: collate([c for c, _ in items] + [r for _, r in items], tok.pad_token_id)  # noqa: E731
    tc = TrainConfig(lr=1e-3, global_batch=4, micro_batch=2, max_steps=3, warmup_ratio=0.0)
    Trainer(model, DPOObjective(ref, 0.1), ds, coll, tc, tmp_path, progress=False).fit(resume=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in rows[-1]
    assert rows[-1]["rewards/margins"] > 0  # it learns to prefer the faithful caption


# ---------------------------------------------------------------------------------------- trainer
def test_cosine_schedule_with_warmup():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_short_run_lowers_the_loss(small_world, tmp_path):
    t = _instruct_trainer(small_world, tmp_path, max_steps=12, lr=3e-3)
    t.fit(resume=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.8 * sum(r["loss"] for r in rows[:3]) / 3
    assert all(k in rows[0] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"))


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run(small_world, tmp_path):
    full = _instruct_trainer(small_world, tmp_path / "full", save_every=2)
    full.fit(resume=False)
    want = {n: p.detach().clone() for n, p in full.model.named_parameters()}

    def kill_at_5(step, _m):  # dies after step 5, so the last saved state is step 4
        if step == 5:
            raise _Interrupt()

    first = _instruct_trainer(small_world, tmp_path / "cut", save_every=2)
    with pytest.raises(_Interrupt):
        first.fit(resume=False, on_step=kill_at_5)
    assert json.loads((tmp_path / "cut" / "last" / "step.json").read_text())["step"] == 4
    # A new process: fresh model from the same init, resumes from step 4.
    second = _instruct_trainer(small_world, tmp_path / "cut", save_every=2)
    summary = second.fit(resume=True)
    assert summary["resumed_from"] == 4
    for n, p in second.model.named_parameters():
        assert torch.equal(p, want[n]), n
    losses_full = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses_cut = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert losses_cut == losses_full


def test_group_by_length_batches_similar_lengths_and_stays_resumable(small_world, tmp_path):
    """group_by_length: each epoch still uses every sample at most once (a pure function of seed and epoch),
    but a batch holds samples of similar length; a run with it resumes to the same weights."""
    model, tok = _load(small_world)
    data = small_world / "data"
    ds = torch.utils.data.ConcatDataset([ConversationDataset(data / "instruct.json", None, tok, model.config),
                                         ConversationDataset(data / "eval_questions.json", None, tok, model.config)])
    lengths = torch.tensor([n for part in ds.datasets for n in part.lengths])
    assert len(lengths) == len(ds) and lengths.max() > 3 * lengths.min()  # conversations vs one-line questions

    def trainer(grouped: bool, seed: int = 0):
        tc = TrainConfig(global_batch=8, micro_batch=8, max_steps=4, group_by_length=grouped, seed=seed)
        return Trainer(model, LMObjective(), ds, lambda s: collate(s, tok.pad_token_id), tc, tmp_path, progress=False)

    def spread(t):  # mean over an epoch's batches of (longest - shortest) in the batch
        batches = [lengths[t.step_indices(k)] for k in range(t.steps_per_epoch)]
        return sum(float(b.max() - b.min()) for b in batches) / len(batches)

    grouped, plain = trainer(True), trainer(False)
    for t in (grouped, plain):
        used = [i for k in range(t.steps_per_epoch) for i in t.step_indices(k)]
        assert len(used) == len(set(used)) == t.steps_per_epoch * 8
    assert spread(grouped) < 0.5 * spread(plain)
    # coarse buckets, not a sort: a batch of one-line questions still mixes question types (their lengths)
    short = [lengths[grouped.step_indices(k)] for k in range(grouped.steps_per_epoch)]
    short = [b for b in short if b.max() < 4 * b.min()]
    assert short and all(len(set(b.tolist())) > 1 for b in short)
    assert grouped.step_indices(3) == trainer(True).step_indices(3)  # reproducible
    assert grouped.step_indices(3) != trainer(True, seed=1).step_indices(3)
    epoch1 = grouped.step_indices(grouped.steps_per_epoch)
    assert epoch1 != grouped.step_indices(0)

    class NoLengths(torch.utils.data.Dataset):
        def __len__(self):
            return 16

    with pytest.raises(ConfigError, match="group_by_length needs sample lengths.*NoLengths"):
        Trainer(model, LMObjective(), NoLengths(), collate, TrainConfig(global_batch=8, micro_batch=8,
                                                                         group_by_length=True),
                tmp_path, progress=False)

    full = _instruct_trainer(small_world, tmp_path / "full", save_every=2, group_by_length=True)
    full.fit(resume=False)

    def kill_at_3(step, _m):
        if step == 3:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        _instruct_trainer(small_world, tmp_path / "cut", save_every=2, group_by_length=True).fit(
            resume=False, on_step=kill_at_3)
    resumed = _instruct_trainer(small_world, tmp_path / "cut", save_every=2, group_by_length=True)
    assert resumed.fit(resume=True)["resumed_from"] == 2
    for (n, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert torch.equal(p, q), n


def test_micro_batch_tokens_cuts_the_batch_by_padded_size_with_the_same_update(small_world, tmp_path):
    """micro_batch_tokens: a global batch is cut, longest first, into micro-batches of at most micro_batch rows
    and that many padded tokens (a sample longer than the budget goes alone); every sample is used once and
    the step's loss and weights are those of one 8-row micro-batch (the loss is normalised globally)."""
    model, tok = _load(small_world)
    ds = ConversationDataset(small_world / "data" / "instruct.json", None, tok, model.config)
    lengths = [len(ds[i].input_ids) for i in range(len(ds))]
    budget = 3 * sorted(lengths)[len(lengths) // 2]
    t = _instruct_trainer(small_world, tmp_path / "cut", micro_batch=8, micro_batch_tokens=budget)
    for step in range(4):
        samples = [ds[i] for i in t.step_indices(step)]
        parts = t._split(samples)
        assert sorted(len(s.input_ids) for p in parts for s in p) == sorted(len(s.input_ids) for s in samples)
        assert all(len(p) <= 8 and (len(p) == 1 or len(p) * max(len(s.input_ids) for s in p) <= budget)
                   for p in parts)
        flat = [len(s.input_ids) for p in parts for s in p]
        assert flat == sorted(flat, reverse=True)
    assert any(len(t._split([ds[i] for i in t.step_indices(k)])) > 1 for k in range(4))
    whole = _instruct_trainer(small_world, tmp_path / "whole", micro_batch=8, max_steps=3)
    cut = _instruct_trainer(small_world, tmp_path / "cut", micro_batch=8, micro_batch_tokens=budget, max_steps=3)
    a, b = whole.fit(resume=False), cut.fit(resume=False)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
    for (n, p), q in zip(cut.model.named_parameters(), whole.model.parameters()):
        # Adam divides by each gradient's scale: float-order differences of ~1e-6 of an update (3 steps of lr 3e-3)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5, msg=n)
    with pytest.raises(ConfigError, match="micro_batch_tokens must be >= 1"):
        TrainConfig(micro_batch_tokens=0).validate()


def test_curriculum_steps_draw_from_their_samples_first_and_stay_resumable(small_world, tmp_path):
    """curriculum_steps: the first steps use only the curriculum samples (every one once per curriculum epoch),
    then the whole data set in the usual order; a pure function of the step, so a cut run resumes exactly."""
    model, tok = _load(small_world)
    data = small_world / "data"
    ds = torch.utils.data.ConcatDataset([ConversationDataset(data / "instruct.json", None, tok, model.config),
                                         ConversationDataset(data / "eval_questions.json", None, tok, model.config)])
    n_conv = len(ds.datasets[0])
    questions = list(range(n_conv, len(ds)))

    def trainer(steps: int, **kw):
        tc = TrainConfig(global_batch=8, micro_batch=8, max_steps=40, curriculum_steps=steps, **kw)
        return Trainer(model, LMObjective(), ds, lambda s: collate(s, tok.pad_token_id), tc, tmp_path,
                       progress=False, curriculum=questions)

    c = 3 * (len(questions) // 8)  # three curriculum epochs
    t, plain = trainer(c), trainer(0)
    first = [t.step_indices(k) for k in range(c)]
    assert all(i >= n_conv for b in first for i in b)
    epoch0 = [i for b in first[:len(questions) // 8] for i in b]
    assert len(epoch0) == len(set(epoch0))  # no repeats inside a curriculum epoch
    assert first[0] != first[len(questions) // 8]  # each curriculum epoch its own order
    # afterwards: the plain run's order, shifted by the curriculum steps
    assert [t.step_indices(c + k) for k in range(5)] == [plain.step_indices(k) for k in range(5)]
    assert any(i < n_conv for k in range(5) for i in t.step_indices(c + k))
    # the logged epoch counts passes over what the steps draw from
    assert t.epoch_at(len(questions) // 8) == 1.0 and t.epoch_at(c) == 3.0
    assert t.epoch_at(c + plain.steps_per_epoch) == 1.0 == plain.epoch_at(plain.steps_per_epoch)
    assert all(i >= n_conv for k in range(c) for i in trainer(c, group_by_length=True).step_indices(k))
    with pytest.raises(ConfigError, match="curriculum_steps must be >= 0"):
        TrainConfig(curriculum_steps=-1).validate()
    with pytest.raises(ConfigError, match="needs at least global_batch 8 curriculum samples, got 3"):
        Trainer(model, LMObjective(), ds, collate, TrainConfig(global_batch=8, micro_batch=8, curriculum_steps=2),
                tmp_path, progress=False, curriculum=[0, 1, 2])

    n = len(json.loads((data / "instruct.json").read_text()))

    def cut_trainer(run_dir):  # the curriculum: the samples after the first eight
        return _instruct_trainer(small_world, run_dir, save_every=2, curriculum_steps=3, curriculum=range(8, n))

    full = cut_trainer(tmp_path / "full")
    assert all(i >= 8 for k in range(3) for i in full.step_indices(k))
    full.fit(resume=False)

    def kill_at_3(step, _m):
        if step == 3:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        cut_trainer(tmp_path / "cut").fit(resume=False, on_step=kill_at_3)
    resumed = cut_trainer(tmp_path / "cut")
    assert resumed.fit(resume=True)["resumed_from"] == 2
    for (n, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert torch.equal(p, q), n


def test_curriculum_data_in_a_recipe(small_world, tmp_path):
    """instruct.curriculum_data names files among instruct.data; a file not listed, or steps without files,
    is a one-line error before training starts."""
    from mobilemllm.training.pipeline import _curriculum_indices
    from mobilemllm.training.recipes import stage_options, stage_train_config

    r = load_recipe("tiny", ["instruct.curriculum_steps=5", "instruct.curriculum_data=[eval_questions.json]"])
    cfg, opts = stage_train_config(r, "instruct"), stage_options(r, "instruct")
    assert cfg.curriculum_steps == 5 and opts["curriculum_data"] == ["eval_questions.json"]
    model, tok = _load(small_world)
    data = small_world / "data"
    paths = [data / "instruct.json", data / "eval_questions.json"]
    ds = torch.utils.data.ConcatDataset([ConversationDataset(p, None, tok, model.config) for p in paths])
    idx = _curriculum_indices("instruct", cfg, opts, ds, paths, data)
    assert idx == list(range(len(ds.datasets[0]), len(ds)))
    with pytest.raises(ConfigError, match="curriculum_data .*captions.json is not in the stage's data.*curriculum_steps=0"):
        _curriculum_indices("instruct", cfg, {"curriculum_data": ["captions.json"]}, ds, paths, data)
    with pytest.raises(ConfigError, match="curriculum_steps=5 needs curriculum_data"):
        _curriculum_indices("instruct", cfg, {}, ds, paths, data)
    # curriculum_steps=0 turns it off, whatever curriculum_data names (e.g. after overriding instruct.data)
    off = load_recipe("tiny", ["instruct.curriculum_steps=0", "instruct.data=[instruct.json]"])
    assert _curriculum_indices("instruct", stage_train_config(off, "instruct"), stage_options(off, "instruct"),
                               ds.datasets[0], paths[:1], data) is None


def test_nan_loss_stops_with_step_and_keeps_last_good_state(small_world, tmp_path):
    t = _instruct_trainer(small_world, tmp_path, lr=1e30, max_grad_norm=1e30, save_every=1, max_steps=6)
    with pytest.raises(TrainingDiverged, match=r"at step \d+/6.*last good state \(step \d+\)"):
        t.fit(resume=False)
    from mobilemllm.training.resume_state import read_state

    state = read_state(tmp_path / "last")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_global_batch_must_split_into_micro_batches(small_world, tmp_path):
    with pytest.raises(ConfigError, match="not a multiple"):
        _instruct_trainer(small_world, tmp_path, global_batch=6, micro_batch=4)


def _write_recipe(world: Path, path: Path, steps: int = 4) -> Path:
    path.write_text(
        "# mobilemllm train --recipe THIS --stage instruct\n"
        f"model: {world / 'init'}\n"
        f"data: {world / 'data'}\n"
        "stages: [instruct]\n"
        "seed: 0\n"
        f"instruct: {{lr: 3.0e-3, global_batch: 8, micro_batch: 2, max_steps: {steps}, warmup_ratio: 0.0}}\n")
    return path


def test_torchrun_two_processes_match_one_process(small_world, tmp_path):
    """2-process DDP (gloo) with the same global batch gives the same loss curve as one process."""
    recipe = _write_recipe(small_world, tmp_path / "r.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, "-m", "mobilemllm", "train", "--recipe", str(recipe), "--stage", "instruct",
            "--init", str(small_world / "init"), "--no-eval", "--no-progress"]
    one = subprocess.run(base + ["--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517"] + base[1:] + ["--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(d):
        return [json.loads(x) for x in (d / "logs" / "instruct" / "metrics.jsonl").read_text().splitlines()]

    c1, c2 = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [r["step"] for r in c1] == [r["step"] for r in c2] == [1, 2, 3, 4]
    assert [r["loss"] for r in c2] == pytest.approx([r["loss"] for r in c1], rel=1e-4)
    st = json.loads((tmp_path / "two" / "instruct" / "training_state.json").read_text())
    assert st["train"]["world_size"] == 2
    m1, _ = load_checkpoint(tmp_path / "one" / "instruct")
    m2, _ = load_checkpoint(tmp_path / "two" / "instruct")
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    # FSDP2 (fully_shard, gloo on CPU) follows the same curve and saves a plain checkpoint.
    fsdp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29518"] + base[1:] + ["--out", str(tmp_path / "fsdp"), "instruct.fsdp=true"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert [r["loss"] for r in curve(tmp_path / "fsdp")] == pytest.approx([r["loss"] for r in c1], rel=1e-4)
    m3, _ = load_checkpoint(tmp_path / "fsdp" / "instruct")
    for (n, a), (_, b) in zip(m1.named_parameters(), m3.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n


def test_pipeline_resume_refuses_other_data_unless_resume_changed(small_world, tmp_path, monkeypatch):
    """An interrupted stage resumed with other data files is refused in one line naming them; with
    resume_changed it goes on from the saved step and the stage's training_state.json records the change."""
    from mobilemllm.training.pipeline import run_recipe

    recipe = _write_recipe(small_world, tmp_path / "r.yaml", steps=4)
    real_save = Trainer.save_state

    def save_then_die(self, step):
        real_save(self, step)
        if step == 2:
            raise _Interrupt()

    def run(extra=(), **kw):
        return run_recipe(load_recipe(recipe, list(extra)), tmp_path / "out", stages=["instruct"],
                          init=small_world / "init", evaluate_stages=False, progress=False, log=lambda m: None, **kw)

    monkeypatch.setattr(Trainer, "save_state", save_then_die)
    with pytest.raises(_Interrupt):
        run()
    monkeypatch.undo()
    more = ["instruct.data=[instruct.json,eval_questions.json]"]
    with pytest.raises(ConfigError, match=r'data \[".*instruct.json"\] -> \[.*eval_questions.json"\].*--resume-changed'):
        run(more)
    run(more, resume_changed=True)
    train = json.loads((tmp_path / "out" / "instruct" / "training_state.json").read_text())["train"]
    assert train["resumed_from"] == 2 and set(train["resume_changes"]) == {"data", "samples"}


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_instruct_trains_adapters_and_merges(small_world, tmp_path):
    from mobilemllm.training.pipeline import run_recipe

    recipe = load_recipe(_write_recipe(small_world, tmp_path / "r.yaml", steps=3),
                         ["instruct.lora={r: 4, alpha: 8}"])
    run_recipe(recipe, tmp_path / "out", stages=["instruct"], init=small_world / "init", evaluate_stages=False,
               progress=False, log=lambda m: None)
    merged, _ = load_checkpoint(tmp_path / "out" / "instruct")  # a plain checkpoint: LoRA folded in
    init, _ = _load(small_world)
    diff = {n for (n, a), (_, b) in zip(merged.named_parameters(), init.named_parameters()) if not torch.equal(a, b)}
    assert any(n.startswith("llm.") and "q_proj" in n for n in diff)
    assert not any(n.startswith("vision.") for n in diff)
    assert (tmp_path / "out" / "logs" / "instruct" / "lora_adapter" / "adapter_config.json").exists()


# --------------------------------------------------------------------------------------- recipes
def test_shipped_recipes_load_and_start_with_their_command():
    names = recipe_names()
    assert {"tiny", "mobilevlm-v2-1.7b"} <= set(names)
    from mobilemllm.training.recipes import recipe_path

    for name in names:
        first = recipe_path(name).read_text().splitlines()[0]
        assert first.startswith("# mobilemllm train") and f"--recipe {name}" in first
        load_recipe(name)


def test_recipe_overrides_and_errors():
    r = load_recipe("tiny", ["instruct.lr=1e-4", "instruct.epochs=2", "stages=[pretrain,instruct]"])
    assert r["instruct"]["lr"] == 1e-4 and r["instruct"]["epochs"] == 2 and r["stages"] == ["pretrain", "instruct"]
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*tiny"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="instruct: unknown key.*lrr"):
        load_recipe("tiny", ["instruct.lrr=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_recipe("tiny", ["instruct.lr"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_recipe("tiny", ["stages=[pretrain,rlhf]"])


def test_adam_beta2_reaches_the_optimizer_and_is_checked(small_world, tmp_path):
    """adam_beta2: AdamW's second-moment decay (default torch's 0.999); out of (0, 1) it is a one-line recipe
    error, and it is among the settings a resume compares."""
    tr = _instruct_trainer(small_world, tmp_path / "a", adam_beta2=0.95)
    tr._build_optimizer(tr.model)
    assert all(g["betas"] == (0.9, 0.95) for g in tr.optimizer.param_groups)
    assert tr.settings()["adam_beta2"] == 0.95  # what a resume compares
    older = {k: v for k, v in tr.settings().items() if k != "adam_beta2"}  # a state saved before the key existed
    with pytest.raises(ConfigError, match="other settings .adam_beta2 0.999 -> 0.95"):
        tr._setting_changes({"settings": older}, allow=False)
    default = _instruct_trainer(small_world, tmp_path / "b")
    default._build_optimizer(default.model)
    assert all(g["betas"] == (0.9, 0.999) for g in default.optimizer.param_groups)  # torch's default
    assert default._setting_changes({"settings": older}, allow=False) == {}  # it ran with the default
    assert load_recipe("tiny", ["instruct.adam_beta2=0.95"])["instruct"]["adam_beta2"] == 0.95
    for bad, why in (("1", "must be < 1"), ("0", "must be > 0"), ("x", "")):
        with pytest.raises(ConfigError, match=f"instruct.adam_beta2 {why}"):
            load_recipe("tiny", [f"instruct.adam_beta2={bad}"])


def test_warmup_steps_overrides_the_ratio_so_a_longer_run_starts_alike(small_world, tmp_path):
    """warmup_steps: a fixed warmup, whatever max_steps is, so the first steps of a longer or shorter run see
    the same learning rates (warmup_ratio scales with max_steps); negative is a one-line recipe error."""
    short = _instruct_trainer(small_world, tmp_path / "a", max_steps=6, warmup_ratio=0.5)
    longer = _instruct_trainer(small_world, tmp_path / "b", max_steps=12, warmup_ratio=0.5)
    assert (short.warmup_steps, longer.warmup_steps) == (3, 6)
    pinned = [_instruct_trainer(small_world, tmp_path / n, max_steps=m, warmup_ratio=0.5, warmup_steps=3)
              for n, m in (("c", 6), ("d", 12))]
    assert [t.warmup_steps for t in pinned] == [3, 3]
    for t in pinned:
        t._build_optimizer(t.model)
    lrs = [[g["lr"] for g in t.optimizer.param_groups] for t in pinned]
    assert lrs[0] == lrs[1] and lrs[0][0] == pytest.approx(3e-3 / 3)  # the same first lr, 1/3 of lr, in both
    assert load_recipe("tiny", ["instruct.warmup_steps=165"])["instruct"]["warmup_steps"] == 165
    with pytest.raises(ConfigError, match="instruct.warmup_steps must be >= 0"):
        load_recipe("tiny", ["instruct.warmup_steps=-1"])


def test_contrastive_image_features_patches_keep_the_layout_inside_a_quadrant():
    """foundations.vision.image_features: quadrant_mean averages each quadrant's patches, patches keeps them all
    (so the contrastive loss sees a shape's outline, not only its colour); a bad value is a one-line error."""
    from mobilemllm.training.foundations import ContrastiveModel
    from mobilemllm.training.recipes import foundations_config, foundations_image_features

    r = load_recipe("tiny", ["foundations.vision.image_features=quadrant_mean", "foundations.vision.epochs=3"])
    assert foundations_image_features(r) == "quadrant_mean" and foundations_config(r, "vision").epochs == 3
    assert foundations_image_features(load_recipe("tiny")) == "patches"  # the shipped recipe's choice
    assert foundations_image_features({}) == "quadrant_mean"  # the default
    with pytest.raises(ConfigError, match="image_features must be one of quadrant_mean, patches"):
        load_recipe("tiny", ["foundations.vision.image_features=mean"])

    class Patches(torch.nn.Module):  # a "tower" that returns the pixels as 16 patch features (4 x 4 grid)
        def forward(self, x):
            return x.reshape(x.shape[0], 16, 1)

    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    swapped = feats.clone()
    swapped[0, 0, 0, [0, 1]] = swapped[0, 0, 0, [1, 0]]  # two patches of the top-left quadrant exchanged
    for mode, differs in (("quadrant_mean", False), ("patches", True)):
        torch.manual_seed(0)
        clip = ContrastiveModel(Patches(), 1, 32, image_features=mode, num_patches=16)
        a, b = clip.image_embeds(feats), clip.image_embeds(swapped)
        assert a.shape == (1, 128) and torch.allclose(a.norm(dim=-1), torch.ones(1))
        assert (not torch.allclose(a, b)) == differs, mode


def test_cli_train_and_eval_help_and_errors(tmp_path):
    from mobilemllm.cli import main

    assert main(["train", "--help"]) == 0
    assert main(["eval", "--help"]) == 0
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path)]) == 2
    assert main(["train", "--stage", "rlhf", "--out", str(tmp_path)]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2


def test_initial_weights_follow_the_recipe_seed():
    """The first stage's random initial model is a function of the recipe's seed (reruns reproduce a run)."""
    from mobilemllm.training.pipeline import initial_model

    def weights(seed):
        torch.manual_seed(1234 + seed * 7)  # whatever the global RNG holds, the recipe's seed decides
        model, _ = initial_model(load_recipe("tiny", [f"seed={seed}"]))
        return dict(model.state_dict())

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_auto_threads_count_what_other_processes_use_now():
    """num_threads: auto takes every core when idle and leaves the cores other processes keep busy *now*
    (sampled, not the 1-minute load average, which counts this process's own earlier work)."""
    from mobilemllm.training.pipeline import busy_cores, cpu_threads

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(3) == 3 and cpu_threads(4, world_size=2) == 2 and cpu_threads(None) is None
    assert cpu_threads("auto", busy=0.1) == cores
    assert cpu_threads("auto", busy=cores + 3.0) == 1
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(0.5)
        assert busy_cores(1.0) > 0.6  # one spinning process is about one busy core
    finally:
        spin.kill()
        spin.wait()


def test_stage_without_previous_checkpoint_is_a_clear_error(tmp_path):
    from mobilemllm.training.pipeline import run_recipe

    with pytest.raises(UserError, match="run `mobilemllm train --stage pretrain` first"):
        run_recipe("tiny", tmp_path, stages=["instruct"], overrides=["synthetic.train_images=16",
                                                                      "synthetic.eval_images=4"],
                   progress=False, log=lambda m: None)


# ------------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_tiny_pipeline_runs_and_learns(tmp_path_factory):
    """Foundations + pretrain + instruct + dpo + rm + ppo on the CPU: every stage written, instruct learns,
    reruns reuse."""
    from _trained import trained_tiny

    t = trained_tiny(tmp_path_factory)
    res, table = t["results"], t["results"]["table"]
    assert set(table) == {"pretrain", "instruct", "dpo", "rm", "ppo"}
    for stage in ("foundations", "pretrain", "instruct", "dpo", "rm", "ppo"):
        assert (t["checkpoints"][stage] / "model.safetensors").exists()
    assert (t["checkpoints"]["rm"] / "reward_head.safetensors").exists()
    assert (t["checkpoints"]["foundations"] / "contrastive.safetensors").exists()
    assert table["rm"]["rm_pair_accuracy"] is not None and table["ppo"]["paraphrase_accuracy"] is not None
    # what the pipeline reaches today: instruction tuning lifts accuracy far above pretrain-only
    assert table["instruct"]["vqa_accuracy"] >= table["pretrain"]["vqa_accuracy"] + 0.3, table
    # re-running reuses every finished stage and the cached evaluations
    from mobilemllm.training.pipeline import run_tiny_pipeline

    def written():  # every checkpoint and cached evaluation, with when it was written
        return {p: p.stat().st_mtime_ns for p in sorted(t["out_dir"].glob("*/*")) if p.suffix in (".safetensors",
                                                                                                  ".json")}

    before = written()
    again = run_tiny_pipeline(t["out_dir"], progress=False)
    assert again["table"] == table and written() == before  # nothing retrained or re-evaluated (not timed)
    # ... also when the run folder is reached through a symlink (the data path is fingerprinted resolved)
    link = tmp_path_factory.mktemp("linked") / "tiny"
    link.symlink_to(t["out_dir"], target_is_directory=True)
    via_link = run_tiny_pipeline(link, progress=False)
    assert via_link["table"] == table and written() == before
    assert res["stages"]["instruct"]["eval"]["vqa"]["n"] >= 500


@pytest.mark.slow
def test_tiny_pipeline_meets_the_issue_targets(tmp_path_factory):
    """The issue's targets: >= 90% VQA after instruct; DPO lowers caption hallucination at a cost of <= 1 point
    of VQA; after DPO and after PPO, POPE accuracy and F1 >= 85 % on every split and the held-out paraphrases
    >= 90 %; PPO costs <= 1 point of VQA and does not raise the hallucinated-object rate by more than a point.
    Whether PPO lowers it depends on the seed (seed 0 at two threads: 24.1 % -> 24.1 %, its captions naming
    fewer objects); docs/training.md reports the comparison on five seeds, as the issue allows."""
    from _trained import trained_tiny

    from mobilemllm.training.seeds import stage_numbers, targets

    results = trained_tiny(tmp_path_factory)["results"]
    table = results["table"]
    met = targets({s: stage_numbers(e["eval"]) for s, e in results["stages"].items()
                   if s in ("instruct", "dpo", "ppo")})
    # "lowers hallucination" also needs the captions to keep naming the image's objects (a hacked reward does not)
    assert all(met[f"{s}_{t}"] for s in ("dpo", "ppo") for t in ("pope", "paraphrase")), met
    assert met["dpo_lowers_hallucination"], met
    assert table["ppo"]["caption_object_halluc"] <= table["instruct"]["caption_object_halluc"] + 0.01, table
    assert table["instruct"]["vqa_accuracy"] >= 0.90, table
    assert table["dpo"]["vqa_accuracy"] >= table["instruct"]["vqa_accuracy"] - 0.01, table
    assert table["dpo"]["caption_object_halluc"] < table["instruct"]["caption_object_halluc"], table
    assert table["ppo"]["vqa_accuracy"] >= table["instruct"]["vqa_accuracy"] - 0.01, table
    assert table["dpo"]["pope_hallucination"] <= table["instruct"]["pope_hallucination"] + 0.01, table
