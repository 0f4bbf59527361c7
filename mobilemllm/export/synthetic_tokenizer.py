"""A stand-in tokenizer for presets with random weights (benchmarks): the tiny model's byte-level BPE
(trained on the shapes world's text) padded with filler tokens to exactly ``vocab_size`` ids, so every
id a random model samples decodes, and ExecuTorch's C++ tokenizer encodes text exactly as Python does."""

from __future__ import annotations

from tokenizers import AddedToken

from mobilemllm.data.tokenizer import tiny_tokenizer


def synthetic_tokenizer(vocab_size: int):
    base = min(vocab_size, 512)
    tok = tiny_tokenizer(vocab_size=base)
    filler = [AddedToken(f"<f{i}>", special=False, normalized=False) for i in range(vocab_size - len(tok))]
    if filler:
        tok.add_tokens(filler)
    return tok
