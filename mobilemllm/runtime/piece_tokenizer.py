"""Loss-free token streaming from ExecuTorch's Python runner bindings.

The executorch 1.5.1 Python bindings hand each generated piece to the token callback as a Python
``str``; a byte-level piece that ends inside a multi-byte UTF-8 character makes pybind11 raise
``UnicodeDecodeError`` and aborts generation (and the runner's own stdout printing drops such bytes).
So the Python runner gives ``MultimodalRunner`` a *decode-only* copy of the bundle's tokenizer whose
every token decodes to an ASCII envelope of its raw bytes and its id (``\\x01<hex>\\x02\\x03<id>\\x04``);
:class:`PieceDecoder` turns the envelopes back into bytes, :func:`piece_token` into the token id (which the
conversation runner needs to know what its KV cache holds), and :class:`~mobilemllm.runtime.executorch_runner.Utf8Buffer`
emits text only when characters are complete. The prompt goes in as token ids (the bundle tokenizer's
encoding, checked at export to equal the C++ tokenizer's), so this copy is never used to encode.

The apps use the bundle's real ``tokenizer.json`` with text inputs and buffer bytes natively.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

START, END = "\x01", "\x02"
ID_START, ID_END = "\x03", "\x04"
FORMAT = "pieces2"  # in the cache folder's name: a folder written by an older envelope format is not reused
_ID = re.compile("\x03([0-9]+)\x04")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_maps() -> tuple[dict[int, str], dict[str, int]]:
    # GPT-2's reversible byte <-> printable-char table (the ByteLevel alphabet)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    enc = {b: chr(c) for b, c in zip(bs, cs)}
    return enc, {v: k for k, v in enc.items()}


def token_bytes(tokenizer) -> list[bytes | None]:
    """Raw bytes of every token id (None for special tokens, which decode to nothing)."""
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    dec = tj.get("decoder") or {}
    kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
    byte_level = "ByteLevel" in kinds
    _, from_char = _byte_level_maps()
    specials = set(tokenizer.all_special_ids)
    out: list[bytes | None] = []
    n = len(tokenizer)
    for i in range(n):
        if i in specials:
            out.append(None)
            continue
        s = tokenizer.convert_ids_to_tokens(i)
        if s is None:
            out.append(b"")
        elif byte_level:
            out.append(bytes(from_char[c] for c in s if c in from_char))
        elif m := _BYTE_TOKEN.match(s):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(s.replace("\u2581", " ").encode("utf-8"))
    return out


def decode_only_tokenizer_dir(tokenizer, cache_key: str) -> Path:
    """A folder with a tokenizer.json whose token i decodes to ``\\x01<hex of token i's bytes>\\x02\\x03<i>\\x04``
    (special tokens decode to their own text)."""
    pieces = token_bytes(tokenizer)
    # the key names the tokenizer, and its pieces decide the folder too: a cached folder of another tokenizer
    # under the same key would decode to the wrong text
    content = hashlib.sha256(repr(pieces).encode())
    content.update(cache_key.encode())
    digest = content.hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"mobilemllm-{FORMAT}-{digest}"
    target = folder / "tokenizer.json"
    if target.exists():
        return folder
    to_char, _ = _byte_level_maps()
    vocab: dict[str, int] = {}
    added = []
    for i, b in enumerate(pieces):
        if b is None:
            content = tokenizer.convert_ids_to_tokens(i)
            added.append({"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True})
            vocab[content] = i
            continue
        envelope = (START + b.hex() + END + ID_START + str(i) + ID_END).encode("ascii")
        vocab["".join(to_char[x] for x in envelope)] = i
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tokenizer.json.{id(spec)}.tmp"
    tmp.write_text(json.dumps(spec))
    tmp.replace(target)
    return folder


class PieceDecoder:
    """Envelope pieces from the decode-only tokenizer -> raw bytes (specials and junk -> nothing)."""

    _ENVELOPE = re.compile("\x01([0-9a-f]*)\x02")

    def __init__(self, sink):
        self.sink = sink  # called with bytes
        self.tokens = 0

    def __call__(self, piece: str) -> None:
        self.tokens += 1
        data = b"".join(bytes.fromhex(h) for h in self._ENVELOPE.findall(piece))
        if data:
            self.sink(data)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Text of each special token -> its id (the runner hands special tokens over as their text)."""
    return {tokenizer.convert_ids_to_tokens(i): int(i) for i in tokenizer.all_special_ids}


def piece_token(piece: str, specials: dict[str, int]) -> int:
    """The token id of one piece from the decode-only tokenizer."""
    m = _ID.search(piece)
    if m:
        return int(m.group(1))
    if piece in specials:
        return specials[piece]
    raise RuntimeError(f"the ExecuTorch runner returned a piece {piece!r} that names no token of the bundle")
