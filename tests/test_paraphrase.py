"""The held-out paraphrase evaluation: every question type (and POPE's question) in wordings that no training
file holds, in any casing or punctuation; `mobilemllm eval` reports its accuracy per type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobilemllm.data.shapes import OBJECTS, PARAPHRASE_TYPES, POSITIONS, write_synthetic
from mobilemllm.data.wordings import HELD_OUT_DETAIL_PROMPTS, HELD_OUT_WORDINGS, POPE_WORDING, TRAIN_WORDINGS
from mobilemllm.evaluation.metrics import normalize_answer
from mobilemllm.training.pipeline import SYNTHETIC_OPTIONS
from mobilemllm.training.recipes import load_recipe

# what a stage of any recipe may train on: every file of a train split but the evaluation files it is not
# trained on (the shipped tiny recipe trains instruct on eval_questions.json, so that one counts)
NOT_TRAINED_ON = ("eval_paraphrase.json", "eval_captions.json", "scenes.json", "meta.json", "eval_pope_random.json",
                  "eval_pope_popular.json", "eval_pope_adversarial.json")


def _texts(folder: Path) -> list[str]:
    """Every string in the folder's JSON files (but the evaluation-only ones) and corpus.txt, normalised."""
    out: list[str] = []

    def walk(x):
        if isinstance(x, str):
            out.append(normalize_answer(x.replace("<image>", " ")))
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    for f in sorted(folder.glob("*.json")):
        if f.name not in NOT_TRAINED_ON:
            walk(json.loads(f.read_text()))
    out += [normalize_answer(line) for line in (folder / "corpus.txt").read_text().splitlines()]
    return out


def _held_out_questions() -> set[str]:
    """Every held-out paraphrase and POPE's own question, for every position and object, normalised."""
    every = set()
    for templates in (*HELD_OUT_WORDINGS.values(), (POPE_WORDING,)):
        for t in templates:
            every |= {normalize_answer(t.format(pos=p, obj=o)) for p in POSITIONS for o in OBJECTS}
    return every | {normalize_answer(p) for p in HELD_OUT_DETAIL_PROMPTS}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("para")
    syn = {**SYNTHETIC_OPTIONS, **load_recipe("tiny")["synthetic"]}  # the shipped recipe's world
    opts = {k: syn[k] for k in SYNTHETIC_OPTIONS}
    write_synthetic(root / "train", num_images=120, seed=0, split="train", **opts)
    write_synthetic(root / "canonical", num_images=120, seed=0, split="train")
    write_synthetic(root / "compositional", num_images=120, seed=0, split="train", single_turn=True,
                    question_wordings="compositional", question_copies=4)
    write_synthetic(root / "eval", num_images=30, seed=1, split="eval", **opts)
    return root


def test_held_out_wordings_are_in_no_training_file(splits):
    held = _held_out_questions()
    for folder in ("train", "canonical", "compositional"):
        texts = _texts(splits / folder)
        whole = set(texts)
        assert not held & whole, sorted(held & whole)[:5]
        joined = "\n".join(texts)
        inside = [h for h in held if h in joined]  # not even inside a longer line of the corpus
        assert not inside, inside[:5]
    # and none of them is a training wording in disguise
    train = {normalize_answer(t) for ts in TRAIN_WORDINGS.values() for t in ts}
    assert not train & {normalize_answer(t) for ts in HELD_OUT_WORDINGS.values() for t in ts}


def test_paraphrase_file_asks_every_type_with_the_right_answers(splits):
    recs = json.loads((splits / "eval" / "eval_paraphrase.json").read_text())
    assert {r["type"] for r in recs} == set(PARAPHRASE_TYPES)
    held = _held_out_questions()
    for r in recs:
        assert normalize_answer(r["conversations"][0]["value"].replace("<image>", "")) in held
    # the same scenes' canonical questions give the same answers to the same content
    canon = {r["id"].rsplit("_", 1)[0] + "_" + r["type"]: r for r in
             json.loads((splits / "eval" / "eval_questions.json").read_text()) if r["type"] == "count"}
    for r in recs:
        if r["type"] == "count":
            key = r["id"].replace("_para_count", "") + "_count"
            assert r["conversations"][1]["value"] == canon[key]["conversations"][1]["value"]
    yes = sum(r["conversations"][1]["value"] == "yes" for r in recs if r["type"] in ("existence", "pope"))
    assert 0.25 < yes / sum(r["type"] in ("existence", "pope") for r in recs) < 0.75


def test_eval_reports_paraphrase_accuracy_per_type(splits):
    from mobilemllm.config import ModelConfig
    from mobilemllm.data.tokenizer import tiny_tokenizer
    from mobilemllm.evaluation import evaluate
    from mobilemllm.evaluation.run import summarize
    from mobilemllm.models.vlm import MobileVLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", llm={"num_layers": 1, "hidden_size": 64, "num_heads": 2,
                                               "intermediate_size": 128})
    report = evaluate(MobileVLM(cfg), tiny_tokenizer(cfg.llm.vocab_size, num_images=50), splits / "eval",
                      limit=12, answer_tokens=3, caption_tokens=4)
    para = report["paraphrase"]
    assert para["n"] == 12 and set(para["by_type"]) <= set(PARAPHRASE_TYPES) and len(para["by_type"]) == 6
    assert summarize(report)["paraphrase_accuracy"] == para["accuracy"]
