"""Tokenizers: train the tiny model's byte-level BPE, load a real model's tokenizer folder, and turn
template segments into token ids and labels.

Everything is saved as a transformers tokenizer folder with ``tokenizer.json`` (the format the
ExecuTorch C++ runner, ONNX Runtime GenAI and the apps read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mobilemllm.bundle.layout import IGNORE_INDEX, IMAGE_TOKEN_ID
from mobilemllm.data.cpp_tokenizer import cpp_compatible
from mobilemllm.data.shapes import corpus_lines
from mobilemllm.errors import CheckpointError, DataError
from mobilemllm.templates import IMAGE, TEMPLATES

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def check_text(text: str, what: str) -> str:
    """Refuse text no tokenizer can encode (lone UTF-16 surrogates) with one ``DataError`` line naming
    ``what``; return ``text`` unchanged otherwise.

    Python decodes bytes that are not UTF-8 in command-line arguments to U+DC80..U+DCFF
    (surrogateescape), and JSON allows ``"\\ud800"``; a tokenizer given either fails deep inside with an
    unrelated TypeError. Call it where text enters: a prompt, a record's fields.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        kind = (f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                else f"a lone surrogate U+{code:04X}")
        raise DataError(f"{what} is not valid UTF-8 text: character {e.start} is {kind}") from None
    return text


def train_bpe(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on ``texts``; returns a transformers fast tokenizer."""
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
    check_tokenizer_files(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers/tokenizers/sentencepiece raise many types on a damaged folder
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e.__class__.__name__}: "
                              f"{' '.join(str(e).split())[:200]}") from None
    tok = cpp_compatible(tok)  # a folder written before (or by transformers' LlamaTokenizer) gets the same ids
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_tokenizer_files(path: Path) -> None:
    """Read a tokenizer folder's JSON files before transformers does, so a damaged file is named in one
    line (transformers and the Rust tokenizers library fail with a traceback, often without the name)."""
    for name in TOKENIZER_JSON_FILES:
        f = path / name
        if not f.exists():
            continue
        if not f.is_file():
            raise CheckpointError(f"{f} is not a regular file")
        try:
            text = f.read_bytes().decode("utf-8")
            data = json.loads(text)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{f} is damaged: not UTF-8 text (byte offset {e.start}); copy the "
                                  "tokenizer files again") from None
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{f} is damaged: not valid JSON ({' '.join(str(e).split())[:120]}); copy the "
                                  "tokenizer files again") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{f} is damaged: expected a JSON object, got {type(data).__name__}")
        if name == "tokenizer.json":
            try:
                Tokenizer.from_str(text)
            except Exception as e:  # the Rust library raises a bare Exception
                raise CheckpointError(f"{f} is not a tokenizer the tokenizers library can read "
                                      f"({' '.join(str(e).split())[:160]})") from None


def encode_segments(tokenizer, segments: list[tuple[str, bool]], num_image_tokens: int,
                    add_bos: bool = True, add_eos_to_answers: bool = True) -> tuple[list[int], list[int]]:
    """Template segments -> (input_ids, labels). Labels are IGNORE_INDEX except on answers (+EOS)."""
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
        check_text(text, "the text to tokenize")
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
    lines = list(corpus_lines(num_images=num_images, seed=seed))
    for t in TEMPLATES.values():
        if t.question_first:  # same pieces as its image-first twin; leaves the BPE's counts as they were
            continue
        lines += [t.prompt_prefix(), t.prompt_suffix("Describe the image in detail.")]
    return train_bpe(lines, vocab_size=vocab_size)
