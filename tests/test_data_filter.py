"""`mobilemllm data filter`: a briefly trained tiny vision + text tower drops most mismatched captions of a
synthetic set and keeps nearly all matched ones; the outputs (records, report, histogram) and the errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mobilemllm.config import ModelConfig
from mobilemllm.data.filter import keep_mask
from mobilemllm.data.shapes import write_synthetic
from mobilemllm.data.tokenizer import tiny_tokenizer
from mobilemllm.errors import UserError
from mobilemllm.models.checkpoint import save_checkpoint
from mobilemllm.models.vlm import MobileVLM

MISMATCHED = 0.25


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A tiny tower trained contrastively on 256 caption pairs for ~2 minutes of CPU at most, saved as a
    foundations folder (checkpoint + contrastive.safetensors)."""
    from mobilemllm.data.dataset import ConversationDataset  # noqa: F401 (the data layer loads first)
    from mobilemllm.training.foundations import save_contrastive
    from mobilemllm.training.foundations import CaptionPairs, ContrastiveModel, ContrastiveObjective, collate_pairs
    from mobilemllm.training.trainer import Trainer, TrainConfig

    root = tmp_path_factory.mktemp("filter")
    write_synthetic(root / "train", num_images=256, seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", llm={"num_layers": 1, "hidden_size": 64, "num_heads": 2,
                                               "intermediate_size": 128})
    tok = tiny_tokenizer(cfg.llm.vocab_size, num_images=100)
    model = MobileVLM(cfg)
    pairs = CaptionPairs(root / "train" / "pretrain.json", None, tok, cfg.vision)
    clip = ContrastiveModel(model.vision, cfg.vision.hidden_size, len(tok), image_features="quadrant_mean",
                            num_patches=cfg.vision.grid ** 2)
    tc = TrainConfig(lr=2e-3, global_batch=64, micro_batch=64, max_steps=120, warmup_ratio=0.05, num_threads=1)
    Trainer(clip, ContrastiveObjective(), pairs, lambda s: collate_pairs(s, tok.pad_token_id), tc,
            root / "run", progress=False).fit(resume=False)
    save_checkpoint(model, tok, root / "foundations")
    save_contrastive(clip, root / "foundations")
    return root / "foundations"


def _corrupted(folder: Path, seed: int = 1, n: int = 120) -> tuple[Path, set[str]]:
    """A caption file where a known quarter of the captions belong to another image."""
    write_synthetic(folder, num_images=n, seed=seed)
    recs = json.loads((folder / "pretrain.json").read_text())
    rng = random.Random(0)
    bad = set(rng.sample(range(n), int(MISMATCHED * n)))
    caps = [r["conversations"][1]["value"] for r in recs]
    for i in bad:
        other = rng.choice([j for j in range(n) if caps[j] != caps[i]])
        recs[i]["conversations"][1]["value"] = caps[other]
    path = folder / "noisy.json"
    path.write_text(json.dumps(recs))
    return path, {recs[i]["id"] for i in bad}


def test_filter_drops_mismatched_pairs_and_keeps_matched_ones(scorer_dir, tmp_path):
    from mobilemllm.cli import app

    data, bad = _corrupted(tmp_path / "data")
    out = tmp_path / "data" / "clean.json"
    res = CliRunner().invoke(app, ["data", "filter", "--data", str(data), "--scorer", str(scorer_dir), "--out",
                                   str(out), "--top-fraction", str(1 - MISMATCHED)])
    assert res.exit_code == 0, res.output
    kept = {r["id"] for r in json.loads(out.read_text())}
    ids = {r["id"] for r in json.loads(data.read_text())}
    dropped_bad = len(bad - kept) / len(bad)
    kept_good = len(kept & (ids - bad)) / len(ids - bad)
    assert dropped_bad >= 0.9 and kept_good >= 0.95, (dropped_bad, kept_good)
    report = json.loads((tmp_path / "data" / "clean.report.json").read_text())
    assert report["pairs"] == 120 and report["kept"] == len(kept) == 90
    png = (tmp_path / "data" / "clean.hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a threshold keeps exactly the pairs scoring at least it (a cut between two scores: a second scoring run
    # may differ in the last float bits, which must not decide the test)
    scores = report["scores"]
    ranked = sorted(scores.values())
    cut = (ranked[60] + ranked[61]) / 2
    res = CliRunner().invoke(app, ["data", "filter", "--data", str(data), "--scorer", str(scorer_dir), "--out",
                                   str(tmp_path / "data" / "t.json"), "--threshold", str(cut)])
    assert res.exit_code == 0, res.output
    assert {r["id"] for r in json.loads((tmp_path / "data" / "t.json").read_text())} == \
        {k for k, v in scores.items() if v >= cut}


def test_filter_choices_and_scorer_folders_are_one_line(tmp_path):
    from mobilemllm.training.caption_scorer import load_scorer

    with pytest.raises(UserError, match="exactly one of --threshold and --top-fraction"):
        keep_mask(torch.zeros(3))
    with pytest.raises(UserError, match="exactly one"):
        keep_mask(torch.zeros(3), 0.1, 0.5)
    with pytest.raises(UserError, match=r"--top-fraction must be in \(0, 1\]"):
        keep_mask(torch.zeros(3), top_fraction=1.5)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="no caption scorer.*model_type 'llama'"):
        load_scorer(tmp_path / "x")
    with pytest.raises(UserError, match="does not exist"):
        load_scorer(tmp_path / "missing")


def test_a_transformers_clip_folder_scores_pairs(tmp_path):
    """A local CLIP folder (random tiny weights, written here) loads offline and gives one score per pair."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    from mobilemllm.training.caption_scorer import TransformersScorer, load_scorer

    write_synthetic(tmp_path / "w", num_images=2, seed=0)
    tok_dir = tmp_path / "tok"
    tiny_tokenizer(512, num_images=20).save_pretrained(str(tok_dir))
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 512, "max_position_embeddings": 32},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(str(folder))
    tokenizer = CLIPTokenizerFast.from_pretrained(str(tok_dir))  # the tiny BPE stands in for CLIP's
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(str(folder))
    scorer = load_scorer(folder)
    assert isinstance(scorer, TransformersScorer)
    img = Image.open(next((tmp_path / "w" / "images").glob("*.png")))
    s = scorer([img, img], ["a red circle", "a blue square"])
    assert s.shape == (2,) and bool(torch.isfinite(s).all())
