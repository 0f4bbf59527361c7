"""Shared, session-scoped fixtures: a tiny config, tokenizer, seeded model, saved checkpoint and a small
synthetic "shapes" data set. Everything is built in seconds on a CPU and reused by every test module.

The session fixtures are shared: a test that changes a model (trains it, freezes parts) must build its
own with :func:`make_tiny_model` instead of mutating ``tiny_model``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from intra-op threads, and on a shared CPU the thread hand-offs make tests 2-3x
# slower (measured: tests/test_models.py 70 s with 2 threads vs 28 s with 1 under load). Set before torch
# is imported so subprocesses inherit it too; export OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The tiny preset shrunk further for tests: 2 LLM layers of width 64 (the vision tower is already
# 2 layers x 64 at 32 px, 16 visual tokens through LDPv2).
TINY_OVERRIDES = {"llm": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128}}
TOKENIZER_IMAGES = 60  # scenes whose text trains the test tokenizer's BPE
SHAPES_IMAGES = 40


def make_tiny_config(**overrides):
    """The test config (``tiny`` preset, 2 layers x 64), with extra overrides merged into the nested parts."""
    from mobilemllm.config import ModelConfig

    merged = {k: dict(v) for k, v in TINY_OVERRIDES.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in merged:
            merged[key].update(value)
        else:
            merged[key] = value
    return ModelConfig.from_preset("tiny", **merged)


def make_tiny_model(config=None, seed: int = 0):
    """A fresh, seeded, eval-mode MobileVLM (random weights) for tests that need to modify a model."""
    import torch

    from mobilemllm.models.vlm import MobileVLM

    torch.manual_seed(seed)
    return MobileVLM(config or make_tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_config():
    return make_tiny_config()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    """A byte-level BPE trained (train_bpe) on the shapes world's text plus the templates' prompts."""
    from mobilemllm.data.tokenizer import tiny_tokenizer as build

    tok = build(vocab_size=tiny_config.llm.vocab_size, seed=0, num_images=TOKENIZER_IMAGES)
    assert len(tok) <= tiny_config.llm.vocab_size
    return tok


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """Seeded random-weight tiny model in eval mode. Do not modify it (use make_tiny_model)."""
    return make_tiny_model(tiny_config, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """``tiny_model`` + ``tiny_tokenizer`` saved as a checkpoint folder. Treat it as read-only."""
    from mobilemllm.models.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small synthetic shapes split (images/ + LLaVA-format JSON files). Treat it as read-only."""
    from mobilemllm.data.shapes import write_synthetic

    out = tmp_path_factory.mktemp("shapes") / "train"
    write_synthetic(out, num_images=SHAPES_IMAGES, seed=0)
    return out


@pytest.fixture(scope="session")
def shapes_image(shapes_data) -> Path:
    """One image file of ``shapes_data``."""
    return sorted((shapes_data / "images").glob("*.png"))[0]
