"""The source folder's tokenizer, loaded offline."""

from __future__ import annotations

from pathlib import Path

from mobilemllm.data.cpp_tokenizer import cpp_compatible
from mobilemllm.errors import CheckpointError


def load_source_tokenizer(src: Path, fmt: str = "auto"):
    """The source's tokenizer (sentencepiece tokenizer.model or tokenizer.json), loaded offline, in the form
    ExecuTorch's C++ tokenizer reads (:func:`mobilemllm.data.cpp_tokenizer.cpp_compatible`), so the checkpoint's
    tokenizer.json is the one every bundle ships."""
    return cpp_compatible(_load(src, fmt))


def _load(src: Path, fmt: str):
    from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

    files = [f for f in ("tokenizer.json", "tokenizer.model") if (src / f).exists()]
    if not files:
        raise CheckpointError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model); copy the model's tokenizer "
                              "files into it")
    # MobileVLM's model_type is unknown to transformers: hand AutoTokenizer a LLaMA config instead of config.json
    kwargs = {"config": LlamaConfig()} if fmt == "mobilevlm" else {}
    try:
        return AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
    except Exception as first:  # noqa: BLE001 - AutoTokenizer raises many kinds; fall back before reporting
        if "tokenizer.json" in files:
            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
            except Exception:  # noqa: BLE001
                pass
        if "tokenizer.model" in files:
            try:
                from transformers import LlamaTokenizer

                return LlamaTokenizer.from_pretrained(src, local_files_only=True)
            except Exception:  # noqa: BLE001
                pass
        raise CheckpointError(f"cannot load the tokenizer in {src} ({first.__class__.__name__}: {first})") from None
