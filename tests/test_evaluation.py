"""Evaluation: metric helpers by hand, batched greedy decoding == per-prompt generate(), the suite and
the `mobilemllm eval` command on a small synthetic split."""

from __future__ import annotations

import json

import pytest
import torch

from mobilemllm.config import ModelConfig
from mobilemllm.data.images import load_image, preprocess
from mobilemllm.data.shapes import write_synthetic
from mobilemllm.data.tokenizer import tiny_tokenizer
from mobilemllm.evaluation import evaluate
from mobilemllm.evaluation.generate import greedy_batch
from mobilemllm.evaluation.metrics import caption_hallucination, exact_match, normalize_answer, pope_metrics, yes_no
from mobilemllm.inference import prompt_ids
from mobilemllm.models.checkpoint import save_checkpoint
from mobilemllm.models.vlm import MobileVLM

SMALL = dict(llm={"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_small")
    write_synthetic(root / "eval", num_images=12, seed=1)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    tok = tiny_tokenizer(cfg.llm.vocab_size, num_images=100)
    model = MobileVLM(cfg).eval()
    save_checkpoint(model, tok, root / "ckpt")
    return root, model, tok


def test_normalize_and_exact_match():
    assert normalize_answer("  Top-Left. ") == "top left"
    assert exact_match("Red.", "red") and not exact_match("red circle", "red")
    assert yes_no("Yes, there is.") == "yes" and yes_no("no") == "no" and yes_no("") == "no"
    assert yes_no("yesterday") == "no"


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "yes", "no"]
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    m = pope_metrics(preds, labels)  # tp=2 fp=1 fn=1 tn=2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["hallucination_rate"] == pytest.approx(1 / 3)


def test_caption_hallucination_by_hand():
    said = [{"red circle", "blue square"}, {"green diamond"}, set()]
    truth = [["red circle"], ["green diamond", "white square"], ["red circle"]]
    m = caption_hallucination(said, truth)
    assert m["object_rate"] == pytest.approx(1 / 3)  # 1 of 3 mentioned objects is not there
    assert m["caption_rate"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["per_caption"] == {"mentioned": [2, 1, 0], "hallucinated": [1, 0, 0], "objects": [1, 2, 1],
                                "named": [1, 1, 0]}


def _captions(n: int, wrong_every: int) -> dict:
    """n captions naming two objects each (both there) plus, every ``wrong_every``-th, an absent one."""
    said = [{"red circle", "blue square"} | ({"green diamond"} if i % wrong_every == 0 else set()) for i in range(n)]
    return caption_hallucination(said, [["red circle", "blue square"]] * n)


def test_hallucination_rate_interval_and_paired_change():
    """The object rate's 95 % bootstrap interval holds the rate and is reproducible; a model that hallucinates
    on a third of the captions against one on every second has a change whose interval is below zero, and a
    change of one caption in 200 has an interval that spans zero (noise, not an improvement)."""
    from mobilemllm.evaluation.metrics import object_rate_change

    worse, better = _captions(200, 2), _captions(200, 3)
    lo, hi = worse["object_rate_ci"]
    assert lo < worse["object_rate"] < hi and hi - lo < 0.15
    assert _captions(200, 2)["object_rate_ci"] == worse["object_rate_ci"]
    clear = object_rate_change(worse, better)
    assert clear["change"] == pytest.approx(better["object_rate"] - worse["object_rate"]) and clear["ci"][1] < 0
    said = [{"red circle", "blue square"} | ({"green diamond"} if i % 2 == 0 or i == 1 else set()) for i in range(200)]
    one_more = caption_hallucination(said, [["red circle", "blue square"]] * 200)
    noise = object_rate_change(worse, one_more)
    assert noise["change"] > 0 and noise["ci"][0] <= 0 <= noise["ci"][1]
    assert object_rate_change(worse, worse) == {"change": 0.0, "ci": [0.0, 0.0]}
    assert object_rate_change(worse, _captions(100, 3)) is None  # not the same captions
    assert object_rate_change({"object_rate": 0.1}, better) is None  # a report without per-caption counts


def test_batched_greedy_equals_per_prompt_generate(small):
    root, model, tok = small
    recs = json.loads((root / "eval" / "eval_questions.json").read_text())[:6]
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in recs]
    questions[1] = "Describe the image in detail please, with every shape and where it is."  # a longer prompt
    pix = torch.stack([preprocess(load_image(root / "eval" / "images" / r["image"]), model.config.vision)
                       for r in recs])
    prompts = [prompt_ids(model.config, tok, q) for q in questions]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    batched = greedy_batch(model, prompts, pix, pad_id=tok.pad_token_id, eos_ids=[], max_new_tokens=6)
    for p, x, got in zip(prompts, pix, batched):
        want = model.generate(torch.tensor([p]), x.unsqueeze(0), max_new_tokens=6)
        assert got == want


def test_evaluate_reports_every_metric(small):
    root, model, tok = small
    rep = evaluate(model, tok, root / "eval", limit=8, caption_tokens=8)
    assert rep["vqa"]["n"] == 8 and 0 <= rep["vqa"]["accuracy"] <= 1
    assert set(rep["pope"]) == {"random", "popular", "adversarial", "mean"}
    for split in ("random", "popular", "adversarial"):
        assert set(rep["pope"][split]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "hallucination_rate"}
    assert set(rep["captions"]) >= {"object_rate", "caption_rate", "recall"}


def test_evaluate_missing_folder_is_a_user_error(tmp_path, small):
    from mobilemllm.errors import DataError

    _, model, tok = small
    with pytest.raises(DataError, match="does not exist"):
        evaluate(model, tok, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="none of the evaluation files"):
        evaluate(model, tok, tmp_path / "empty")


def test_cli_eval_prints_table_and_writes_json(small, tmp_path, capsys):
    from mobilemllm.cli import main

    root, _, _ = small
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(root / "ckpt"), "--data", str(root / "eval"), "--limit", "4",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["vqa"]["n"] == 4 and "pope" in rep and "captions" in rep
    assert "VQA acc" in capsys.readouterr().out
