"""Training under faults: a crafted run folder cannot run code, a resume refuses other settings, two runs cannot
share an output folder, a half-written log line or a crash at any point of a save does not break a resume,
and the thread count follows the CPU load. A toy model (one linear layer with dropout) keeps each run at
milliseconds; the exactness of a resume on the real model is in test_training.py."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilemllm import atomic
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.training import resume_state
from mobilemllm.training.resume_state import read_state, saved_step
from mobilemllm.training.threads import ThreadTuner, adaptive_threads, cpu_threads, prefer_passive_omp_wait
from mobilemllm.training.trainer import TrainConfig, Trainer, cosine_with_warmup

PACKAGE = Path(__file__).resolve().parents[1] / "mobilemllm"


class Toy(nn.Module):
    """A linear layer behind dropout: the dropout makes the result depend on the restored RNG state."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25)
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(self.drop(x)).squeeze(-1)


class SquaredError:
    def units(self, batch):
        return batch["x"].shape[0]

    def loss(self, model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).sum(), {}


def _collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items]),
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long)}


DATA = [(torch.randn(4, generator=torch.Generator().manual_seed(i)), torch.tensor(float(i % 3))) for i in range(32)]


def _toy(run_dir: Path, run_keys=None, **cfg) -> Trainer:
    torch.manual_seed(0)
    tc = TrainConfig(**{"lr": 0.05, "global_batch": 8, "micro_batch": 4, "max_steps": 6, "warmup_ratio": 0.0,
                        "save_every": 2, **cfg})
    return Trainer(Toy(), SquaredError(), DATA, _collate, tc, run_dir, progress=False, run_keys=run_keys)


class _Kill(BaseException):
    """A simulated kill: not an Exception, so nothing on the way up treats it as an ordinary error."""


def _kill_at(step_to_die: int):
    def on_step(step, _row):
        if step == step_to_die:
            raise _Kill()
    return on_step


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    t = _toy(tmp_path_factory.mktemp("full"))
    t.fit(resume=False)
    return _weights(t), [r["loss"] for r in _rows(t.run_dir)]


# --------------------------------------------------------------------------------- 1. no pickle
class _Payload:
    """Unpickling this creates the marker file: what any code in a crafted state file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_package_never_unpickles():
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "weights_only=False" in line or re.search(r"\bpickle\.loads?\(", line)]
    assert not hits, hits


def test_crafted_pickle_state_is_not_loaded(tmp_path):
    """A run folder holding the old pickle format (here with a payload) is refused in one line, unread."""
    marker = tmp_path / "ran"
    last = tmp_path / "run" / "last"
    last.mkdir(parents=True)
    (last / "state.pt").write_bytes(pickle.dumps({"step": 2, "x": _Payload(marker)}))
    (last / "step.json").write_text(json.dumps({"step": 2, "total_steps": 6}))
    with pytest.raises(UserError) as e:
        _toy(tmp_path / "run").fit(resume=True)
    assert not marker.exists()
    assert "\n" not in str(e.value) and "pickle" in str(e.value) and "--no-resume" in str(e.value)


@pytest.mark.parametrize("damage", ["tensor missing", "object array", "state.json garbage", "tensors garbage",
                                    "wrong shapes"])
def test_damaged_state_is_one_line(tmp_path, damage):
    t = _toy(tmp_path)
    with pytest.raises(_Kill):
        t.fit(resume=False, on_step=_kill_at(3))
    last = tmp_path / "last"
    meta = json.loads((last / "state.json").read_text())
    if damage == "tensor missing":
        meta["state"]["rng"]["torch"] = {"__tensor__": "nowhere"}
    elif damage == "object array":
        meta["state"]["rng"]["numpy"]["__tuple__"][1]["dtype"] = "|O"
    elif damage == "wrong shapes":
        meta["state"]["model"] = {"lin.bias": meta["state"]["model"]["lin.weight"]}
    if damage == "state.json garbage":
        (last / "state.json").write_text('{"format": 1, "state": ')
    elif damage == "tensors garbage":
        (last / "tensors.safetensors").write_bytes(b"\xff" * 40)
    else:
        (last / "state.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        _toy(tmp_path).fit(resume=True)
    assert "\n" not in str(e.value) and str(last) in str(e.value)


def test_state_round_trip_keeps_types():
    import numpy as np

    value = {"t": torch.arange(3, dtype=torch.uint8), 0: (1, 2.5, None), "np": np.arange(4, dtype=np.uint32),
             "nested": [{"a": torch.zeros(())}]}
    tensors: dict = {}
    back = resume_state.unpack(json.loads(json.dumps(resume_state.pack(value, tensors))), tensors)
    assert torch.equal(back["t"], value["t"]) and back[0] == (1, 2.5, None)
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3]
    assert torch.equal(back["nested"][0]["a"], torch.zeros(()))


# ------------------------------------------------------------------------------ 2. changed settings
def test_resume_refuses_changed_settings_and_applies_them_when_asked(tmp_path, caplog):
    with pytest.raises(_Kill):
        _toy(tmp_path, run_keys={"data": ["a.json"]}).fit(resume=False, on_step=_kill_at(5))
    with pytest.raises(ConfigError) as e:
        _toy(tmp_path, run_keys={"data": ["a.json", "b.json"]}, lr=0.02, max_steps=8).fit(resume=True)
    msg = str(e.value)
    assert "\n" not in msg and "--resume-changed" in msg and "--no-resume" in msg
    assert 'data ["a.json"] -> ["a.json", "b.json"]' in msg and "lr 0.05 -> 0.02" in msg and "max_steps 6 -> 8" in msg
    # cosmetic settings may change freely
    _toy(tmp_path, run_keys={"data": ["a.json"]}, log_every=2, num_threads=1, save_every=3)
    t = _toy(tmp_path, run_keys={"data": ["a.json"]}, lr=0.02, max_steps=8)
    with caplog.at_level(logging.WARNING, logger="mobilemllm.training"):
        summary = t.fit(resume=True, resume_changed=True)
    assert summary["resumed_from"] == 4
    assert summary["resume_changes"] == {"lr": [0.05, 0.02], "max_steps": [6, 8]}
    assert "lr 0.05 -> 0.02" in caplog.text
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[4]["resume_changes"] == summary["resume_changes"] and "resume_changes" not in rows[5]
    # the new lr and the new schedule length apply from the first resumed step on
    assert rows[4]["lr"] == pytest.approx(0.02 * cosine_with_warmup(4, 8, 0))
    assert rows[3]["lr"] == pytest.approx(0.05 * cosine_with_warmup(3, 6, 0))


# ---------------------------------------------------------------------------------------- 3. lock
def test_second_run_into_the_same_folder_fails_at_once(tmp_path):
    from mobilemllm.training.pipeline import run_lock, run_recipe

    with run_lock(tmp_path):
        with pytest.raises(UserError, match=rf"another run is using {re.escape(str(tmp_path))} \(pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        with pytest.raises(UserError, match="another run is using"):  # before any work: nothing written
            run_recipe("tiny", tmp_path, overrides=["synthetic.train_images=8"], progress=False, log=lambda m: None)
        assert not (tmp_path / "data").exists()
    with run_lock(tmp_path):  # released: the next run may start
        pass


# ------------------------------------------------------------------------------------- 4. metrics
def test_half_written_metrics_line_is_dropped_on_resume(tmp_path, uninterrupted, caplog):
    with pytest.raises(_Kill):
        _toy(tmp_path).fit(resume=False, on_step=_kill_at(5))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "epoch": 1.5, "lo')  # killed while writing the next line
    with caplog.at_level(logging.WARNING, logger="mobilemllm.training"):
        t = _toy(tmp_path)
        assert t.fit(resume=True)["resumed_from"] == 4
    assert "dropped 1 unreadable line" in caplog.text
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 5 of the cut run is not there twice
    assert [r["loss"] for r in rows] == uninterrupted[1]
    assert all(r["steps_per_s"] > 0 and r["threads"] >= 1 for r in rows)


# ---------------------------------------------------------------------------------- 5. --out a file
def test_out_pointing_at_a_file_is_one_line(tmp_path, capsys):
    from mobilemllm.cli import main

    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    assert main(["train", "--out", str(out), "--no-eval", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err
    assert main(["train", "--out", str(out / "sub"), "--no-eval", "--no-progress"]) == 2


# ------------------------------------------------------------------------ 6. a kill during a save
class _CountingOs:
    """``os`` for mobilemllm.atomic with ``replace`` routed through ``wrap``."""

    def __init__(self, wrap):
        self._wrap = wrap

    def __getattr__(self, name):
        value = getattr(os, name)
        return self._wrap(value) if name == "replace" else value


# The operations of one save, in order: tensors, state.json, step.json written in the new folder, then
# the old folder renamed aside and the new one renamed into place (then the old one deleted).
SAVE_OPS = 5


@pytest.mark.parametrize("ops_done", range(SAVE_OPS + 1))
def test_kill_at_each_point_of_a_save_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted, ops_done):
    armed, done = [False], [0]

    def wrap(fn):
        def op(*args, **kwargs):
            if armed[0] and done[0] == ops_done:
                armed[0] = False
                raise _Kill()
            out = fn(*args, **kwargs)
            if armed[0]:
                done[0] += 1
                if done[0] == ops_done == SAVE_OPS:
                    armed[0] = False
                    raise _Kill()
            return out
        return op

    monkeypatch.setattr(resume_state, "_save_tensors", wrap(resume_state._save_tensors))
    monkeypatch.setattr(resume_state, "_write_json", wrap(resume_state._write_json))
    monkeypatch.setattr(atomic, "os", _CountingOs(wrap))

    def arm_before_the_second_save(step, _row):  # saves come after steps 2 and 4: die in the second
        armed[0] = armed[0] or step == 3

    with pytest.raises(_Kill):
        _toy(tmp_path).fit(resume=False, on_step=arm_before_the_second_save)
    monkeypatch.undo()
    resumed = _toy(tmp_path)
    assert resumed.fit(resume=True)["resumed_from"] == (4 if ops_done == SAVE_OPS else 2)
    want, losses = uninterrupted
    got = _weights(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert [r["loss"] for r in _rows(tmp_path)] == losses
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".last.old")]


def test_a_save_writes_no_pickle(tmp_path):
    with pytest.raises(_Kill):
        _toy(tmp_path).fit(resume=False, on_step=_kill_at(3))
    last = tmp_path / "last"
    assert sorted(p.name for p in last.iterdir()) == ["state.json", "step.json", "tensors.safetensors"]
    assert saved_step(last) == 2
    state = read_state(last)
    assert state["step"] == 2 and set(state["model"]) == {"lin.weight", "lin.bias"}
    assert state["rng"]["torch"].dtype == torch.uint8


# --------------------------------------------------------------------------------------- 7. threads
def test_thread_tuner_follows_the_load():
    """Every `every_s` seconds the tuner re-measures the others' load; two agreeing measurements move the count."""
    now, threads, loads = [0.0], [4], iter([(0.1, 3.9), (2.2, 1.8), (2.2, 1.8), (0.2, 1.9), (2.0, 2.0), (0.1, 3.8),
                                            (0.1, 3.8)])
    tuner = ThreadTuner(every_s=10, sample=lambda: next(loads), clock=lambda: now[0], cores=4,
                        set_threads=lambda n: threads.__setitem__(0, n), get_threads=lambda: threads[0])
    seen = []
    for t in range(0, 80, 5):
        now[0] = float(t)
        tuner.step()
        seen.append(threads[0])
    # sampled at t=10, 20, ...: idle (keep 4), busy 2 (wait), busy 2 (-> 2 threads), idle, busy (no agreement:
    # stay at 2), idle, idle (-> 4 threads)
    assert seen == [4] * 6 + [2] * 8 + [4] * 2
    with pytest.raises(StopIteration):
        now[0] = 100.0
        tuner.step()


def test_thread_tuner_does_not_count_sibling_ranks_as_other_work():
    tuner = ThreadTuner(world_size=2, sample=lambda: None, cores=8, set_threads=lambda n: None,
                        get_threads=lambda: 4)
    assert tuner.target(others=4.0, own=4.0) == 4  # the other rank's 4 cores: nobody else is busy
    assert tuner.target(others=6.0, own=4.0) == 3  # 2 more cores busy: 6 left for two ranks
    assert cpu_threads("auto", 2, busy=2.0, cores=8) == 3


def test_trainer_adapts_threads_only_when_asked(tmp_path):
    assert not _toy(tmp_path).adapt_threads
    with adaptive_threads():
        assert _toy(tmp_path).adapt_threads
        assert not _toy(tmp_path, num_threads=1).adapt_threads  # a fixed count is kept
    assert not _toy(tmp_path).adapt_threads


def test_passive_omp_wait_only_before_torch_loads(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not prefer_passive_omp_wait()  # torch is loaded in this process: too late, left alone
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert prefer_passive_omp_wait() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not prefer_passive_omp_wait() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
