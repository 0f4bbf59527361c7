"""Tokenizer metadata for the text GGUF, and the chat template llama.cpp applies.

llama.cpp tokenizes from the GGUF's own vocabulary (``tokenizer.ggml.*``), so it is written to give the ids
our tokenizer (the bundle's ``tokenizer/tokenizer.json``) gives, the way llama.cpp's convert_hf_to_gguf.py
writes each kind:

- byte-level BPE (the tiny model's, GPT-2 style): ``tokenizer.ggml.model = "gpt2"``, the vocabulary in its
  byte-level spelling, the merges, and the ``gpt-2`` pre-tokenizer (the regex ``ByteLevel(use_regex=True)``
  splits with);
- sentencepiece-style BPE with byte fallback (MobileLLaMA's, imported): ``"llama"``, the ``▁`` pieces and a
  score per piece (higher merges first, as llama.cpp's SPM tokenizer merges): minus the rank of the first
  merge that makes the piece, so llama.cpp merges in the order the BPE's merge list does.

Token types: specials are CONTROL, ``<0xNN>`` pieces BYTE, the unknown token UNKNOWN, rows of the embedding
table past the tokenizer's vocabulary ``[PADn]`` UNUSED (the table may be larger than the tokenizer).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import pre_tokenizers

from mobilemllm.bundle.layout import QUESTION
from mobilemllm.errors import ConfigError

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where an image goes in the text llama.cpp tokenizes
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def tokenizer_spec(tokenizer) -> dict[str, Any]:
    """The tokenizer's tokenizer.json as a dict (what it encodes with)."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def tokenizer_kind(spec: dict[str, Any]) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (BPE with byte fallback); ConfigError for anything else."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"--target gguf writes BPE tokenizers; this one is {model.get('type')!r}")
    if model.get("byte_fallback"):
        return "llama"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    raise ConfigError("--target gguf writes byte-level BPE tokenizers with the GPT-2 split (ByteLevel "
                      f"pre-tokenizer) or sentencepiece-style BPE with byte fallback; this one's pre-tokenizer is "
                      f"{pre.get('type')!r}")


def _merges(spec: dict[str, Any]) -> list[str]:
    """The BPE merges as ``"left right"`` strings (tokenizers writes pairs or strings)."""
    out = []
    for m in spec["model"].get("merges") or []:
        out.append(" ".join(m) if isinstance(m, (list, tuple)) else str(m))
    return out


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int], str]:
    """(tokens, scores, token types, ggml tokenizer model) for an embedding table of ``vocab_size`` rows."""
    import gguf

    spec = tokenizer_spec(tokenizer)
    kind = tokenizer_kind(spec)
    by_id: dict[int, str] = {}
    for text, i in spec["model"]["vocab"].items():
        by_id[int(i)] = text
    special_ids = set()
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            special_ids.add(int(added["id"]))
    n_tok = max(by_id) + 1 if by_id else 0
    if n_tok > vocab_size:
        raise ConfigError(f"the tokenizer has {n_tok} tokens but the model's embedding table {vocab_size} rows")
    _check_bytes(kind, set(by_id.values()))
    scores = _scores(spec, by_id, vocab_size) if kind == "llama" else [0.0] * vocab_size
    unk = spec["model"].get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special_ids:
            tokens.append(text)
            types.append(gguf.TokenType.UNKNOWN if text == unk and kind == "llama" else gguf.TokenType.CONTROL)
        elif kind == "llama" and _BYTE_PIECE.fullmatch(text):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types], kind


def _check_bytes(kind: str, texts: set[str]) -> None:
    """llama.cpp looks up a token for every byte (the newline at least) when it loads a vocabulary and aborts the
    process if one is missing: refuse such a tokenizer here, in one line."""
    if kind == "llama":
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in texts]
    else:
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in texts]
    if missing:
        raise ConfigError(f"the tokenizer has no token for {len(missing)} of the 256 bytes (e.g. {missing[0]!r}); "
                          "llama.cpp needs one for every byte, so it cannot be written to GGUF")


def _scores(spec: dict[str, Any], by_id: dict[int, str], vocab_size: int) -> list[float]:
    """SPM scores from the merge list: a piece scores minus the rank of the first merge making it (llama.cpp
    merges the highest score first, as BPE merges the lowest rank); pieces no merge makes score below all."""
    merges = _merges(spec)
    ids = {text: i for i, text in by_id.items()}
    scores: list[float | None] = [None] * vocab_size
    for rank, merge in enumerate(merges):
        made = ids.get(merge.replace(" ", "", 1))
        if made is not None and scores[made] is None:
            scores[made] = -float(rank + 1)
    floor = -float(len(merges) + 1)
    return [s if s is not None else (0.0 if len(by_id.get(i, "")) <= 1 else floor) for i, s in enumerate(scores)]


def add_vocab(writer, tokenizer, vocab_size: int, add_bos: bool, chat_template: str | None) -> str:
    """Write the tokenizer metadata into ``writer`` (a gguf.GGUFWriter); returns the ggml tokenizer model."""
    tokens, scores, types, kind = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(_merges(tokenizer_spec(tokenizer)))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(True)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    return kind


# ---- the chat template ---------------------------------------------------------------------------------
def _literal(text: str) -> str:
    """``text`` as a Jinja expression (a JSON string literal: Jinja and llama.cpp's template engine read it)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def chat_template(prompt: dict[str, Any]) -> str:
    """A Jinja chat template giving the manifest's prompt for the first user turn and its ``follow_up`` for
    later turns, with mtmd's image marker where the image goes.

    The marker the user's text holds (llama.cpp puts it there for each image) is moved to the template's own
    image position; the BOS text is left out (the GGUF's ``add_bos_token`` adds BOS as llama.cpp tokenizes).
    """
    question = "(message['content'] | replace('" + MEDIA_MARKER + "', '') | trim)"
    bos = prompt.get("bos_text") if prompt.get("bos_in_first_text") else None
    first = []
    for i, seg in enumerate(prompt["segments"]):
        if seg["type"] == "image":
            first.append(_literal(MEDIA_MARKER))
            continue
        text = seg["text"]
        if i == 0 and bos and text.startswith(bos):
            text = text[len(bos):]
        first.append(_jinja_text(text, QUESTION, question))
    follow = prompt.get("follow_up")
    parts = ["{%- for message in messages -%}",
             "{%- if message['role'] == 'user' -%}",
             "{%- if ns.turn == 0 -%}" + "".join(first)]
    if follow:
        parts.append("{%- else -%}" + "".join(_jinja_text(s["text"], QUESTION, question) for s in follow["segments"]))
    parts.append("{%- endif -%}{%- set ns.turn = ns.turn + 1 -%}")
    if follow:
        answer = follow["answer"].replace("{answer}", "\x00")
        before, _, after = answer.partition("\x00")
        parts.append("{%- elif message['role'] == 'assistant' -%}" + _literal(before)
                     + "{{ message['content'] | trim }}" + _literal(after) + _literal(follow["end_of_turn"]))
    parts.append("{%- endif -%}{%- endfor -%}")
    return "{%- set ns = namespace(turn=0) -%}" + "".join(parts)


def _jinja_text(text: str, placeholder: str, expr: str) -> str:
    """A text segment with ``placeholder`` replaced by the Jinja expression ``expr``."""
    pieces = text.split(placeholder)
    out = [_literal(p) if p else "" for p in pieces]
    return ("{{ " + expr + " }}").join(out)
