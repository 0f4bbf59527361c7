"""Tokenizers: train the tiny model's byte-level BPE, load a real model's tokenizer folder, and turn
template segments into token ids and labels.

Everything is saved as a transformers tokenizer folder with ``tokenizer.json`` (the format the
ExecuTorch C++ runner, ONNX Runtime GenAI and the apps read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mobilemllm.errors import CheckpointError
from mobilemllm.templates import IMAGE

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def train_bpe(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, clean_up_tokenization_spaces=False)


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder (tokenizer.json, or a sentencepiece tokenizer.model) without network."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def encode_segments(tokenizer, segments: list[tuple[str, bool]], num_image_tokens: int,
                    add_bos: bool = True, add_eos_to_answers: bool = True) -> tuple[list[int], list[int]]:
    """Template segments -> (input_ids, labels). Labels are IGNORE_INDEX except on answers (+EOS)."""
    from mobilemllm.bundle.layout import IGNORE_INDEX, IMAGE_TOKEN_ID

    ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_answer in segments:
        if text == IMAGE:
            ids.extend([IMAGE_TOKEN_ID] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            continue
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        if is_answer and add_eos_to_answers:
            piece = piece + [tokenizer.eos_token_id]
        ids.extend(piece)
        labels.extend(piece if is_answer else [IGNORE_INDEX] * len(piece))
    return ids, labels


def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tiny_tokenizer(vocab_size: int = 512, seed: int = 0, num_images: int = 400):
    """The tiny default's tokenizer: a BPE trained on the synthetic shapes world's text and templates."""
    from mobilemllm.data.shapes import corpus_lines
    from mobilemllm.templates import TEMPLATES

    lines = list(corpus_lines(num_images=num_images, seed=seed))
    for t in TEMPLATES.values():
        if t.question_first:  # same pieces as its image-first twin; leaves the BPE's counts as they were
            continue
        lines += [t.prompt_prefix(), t.prompt_suffix("Describe the image in detail.")]
    return train_bpe(lines, vocab_size=vocab_size)
