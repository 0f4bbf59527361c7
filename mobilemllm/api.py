"""The public Python API, mirroring the CLI.

    import mobilemllm as mm
    model, tok = mm.load("tiny")                 # a preset (random weights) or a checkpoint folder
    print(mm.answer(model, tok, "cat.png", "What colour is the shape?").text)
"""

from __future__ import annotations

from pathlib import Path

from mobilemllm.config import PRESETS, ModelConfig
from mobilemllm.data.tokenizer import tiny_tokenizer
from mobilemllm.errors import CheckpointError
from mobilemllm.models.checkpoint import CONFIG_NAME, check_checkpoint_dir, load_checkpoint, read_config
from mobilemllm.models.vlm import MobileVLM


def load(name_or_path: str | Path, **overrides):
    """(model, tokenizer) from a checkpoint folder, or a preset name with random weights.

    The ``tiny`` preset gets a byte-level BPE trained on the synthetic shapes text; other presets
    come without a tokenizer (None) unless loaded from a folder.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return load_checkpoint(path)
    name = str(name_or_path)
    if name not in PRESETS:
        if "/" in name or path.suffix or path.exists():
            raise CheckpointError(f"checkpoint folder {path} does not exist; valid presets: {', '.join(sorted(PRESETS))}")
        ModelConfig.from_preset(name)  # raises the unknown-preset error with the valid names
    cfg = ModelConfig.from_preset(name, **overrides)
    tokenizer = None
    if name == "tiny":
        tokenizer = tiny_tokenizer(cfg.llm.vocab_size)
    return MobileVLM(cfg).eval(), tokenizer


def load_config(name_or_path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder, a training run's latest model or a preset, without its weights
    (so a choice the model cannot take is refused before anything heavy loads)."""
    path = Path(name_or_path)
    if path.is_dir():
        return read_config(check_checkpoint_dir(path) / CONFIG_NAME)
    return ModelConfig.from_preset(str(name_or_path))
