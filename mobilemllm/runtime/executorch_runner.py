"""Run an ExecuTorch bundle through ``executorch.extension.llm.runner.MultimodalRunner``.

That is the C++ runner the Android ``LlmModule`` (multimodal) and the iOS ``MultimodalRunner`` drive, so
what runs here is what runs on the phone: the same program, the same tokenizer folder, the same prompt
segments from the manifest (BOS + text, image, text), the same greedy/temperature sampling.

The runner's token callback receives raw token pieces; a piece can end inside a multi-byte UTF-8
character, so :class:`Utf8Buffer` holds bytes back until a character is complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mobilemllm.errors import UserError


@dataclass
class RunResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float  # inference start -> first generated token (prefill included)
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    stats: dict[str, Any] = field(default_factory=dict)


class Utf8Buffer:
    """Pieces (str or bytes) in, complete UTF-8 text out: an incomplete trailing character waits."""

    def __init__(self, on_text: Callable[[str], None] | None):
        self.on_text = on_text
        self.pending = b""
        self.parts: list[str] = []

    def put(self, piece: str | bytes) -> None:
        data = piece if isinstance(piece, bytes) else piece.encode("utf-8", "surrogateescape")
        data = self.pending + data
        cut = _complete_prefix(data)
        self.pending = data[cut:]
        if cut:
            self._emit(data[:cut].decode("utf-8", "replace"))

    def flush(self) -> None:
        if self.pending:
            self._emit(self.pending.decode("utf-8", "replace"))
            self.pending = b""

    def _emit(self, text: str) -> None:
        self.parts.append(text)
        if self.on_text is not None and text:
            self.on_text(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    i = n - 1
    # walk back over at most 3 continuation bytes to the last lead byte
    while i >= 0 and n - i <= 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0:
        return 0 if n and n < 4 else n
    lead = data[i]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return n if n - i >= need else i


@contextmanager
def _quiet_stdout():
    """The C++ runner prints every piece and a report to stdout (fd 1) itself; send that to /dev/null while
    Python's ``sys.stdout`` (where ``on_text`` streams) keeps writing to the real stdout."""
    import ctypes

    sys.stdout.flush()
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd1 = False  # captured (pytest, notebooks): nothing of ours goes through fd 1
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    old = sys.stdout
    if on_fd1:
        sys.stdout = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                               errors="replace")
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # the runner's buffered C stdio output goes to /dev/null, not later
        except (OSError, AttributeError):
            pass
        if on_fd1:
            sys.stdout.flush()
            sys.stdout.close()
            sys.stdout = old
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _inputs(manifest: dict[str, Any], tokenizer, image_u8: torch.Tensor, question: str):
    """MultimodalInputs: the manifest's segments, text as token ids from the bundle's tokenizer."""
    from executorch.extension.llm.runner import make_image_input, make_token_input

    from mobilemllm.bundle import fill_prompt, needs_bos_token

    inputs = []
    bos = manifest["tokenizer"]["bos_id"]
    if needs_bos_token(manifest["prompt"]) and bos is not None:
        inputs.append(make_token_input([int(bos)]))
    for seg in fill_prompt(manifest["prompt"], question):
        if seg["type"] == "image":
            inputs.append(make_image_input(image_u8))
        else:
            ids = tokenizer.encode(seg["text"], add_special_tokens=False)
            if ids:
                inputs.append(make_token_input([int(i) for i in ids]))
    return inputs


def image_tensor(manifest: dict[str, Any], views_u8) -> torch.Tensor:
    """uint8 views (V, 3, S, S) -> the program's vision_encoder input (1, 3, V*S, S), views stacked."""
    views = torch.as_tensor(np.asarray(views_u8))
    pre = manifest["preprocessing"]
    s = pre["image_size"]
    if views.dtype != torch.uint8 or views.dim() != 4 or tuple(views.shape[1:]) != (3, s, s):
        raise UserError(f"image views must be uint8 (V, 3, {s}, {s}); got {views.dtype} {tuple(views.shape)}")
    return views.permute(1, 0, 2, 3).reshape(1, 3, -1, s).contiguous()


def count_prompt_tokens(manifest: dict[str, Any], tokenizer, question: str) -> int:
    from mobilemllm.bundle import prompt_token_ids

    return len(prompt_token_ids(manifest["prompt"], tokenizer, question, manifest["tokenizer"]["bos_id"]))


def load_kernels() -> None:
    """Register the kernels our programs call outside the delegates, in this process: the LLM custom ops
    (``llama::custom_sdpa``, ``llama::update_cache``) and the quantized ones (``quantized_decomposed::
    embedding_4bit`` etc.). Without them a bundle loads but its first run fails with "Missing operator"."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401


def run_program(pte: str | Path, tokenizer_dir: str | Path, manifest: dict[str, Any], views_u8, question: str, *,
                max_new_tokens: int = 64, temperature: float = 0.0,
                on_text: Callable[[str], None] | None = None) -> RunResult:
    """Generate with MultimodalRunner; ``views_u8`` is the preprocessed uint8 image (V, 3, S, S)."""
    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner

    from mobilemllm.data.tokenizer import load_tokenizer
    from mobilemllm.bundle import sha256_file
    from mobilemllm.runtime.piece_tokenizer import PieceDecoder, decode_only_tokenizer_dir

    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    pieces_dir = decode_only_tokenizer_dir(tokenizer, sha256_file(tokenizer_dir / "tokenizer.json"))
    image = image_tensor(manifest, views_u8)
    ctx = manifest["context"]["max_context_len"]
    inputs = _inputs(manifest, tokenizer, image, question)
    stats: dict[str, Any] = {}
    buf = Utf8Buffer(on_text)
    pieces = PieceDecoder(buf.put)
    config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=float(temperature),
                              num_bos=0, num_eos=0, seq_len=ctx)
    stamps: list[float] = []

    def on_token(piece: str) -> None:
        stamps.append(time.perf_counter())
        pieces(piece)

    with _quiet_stdout():
        runner = MultimodalRunner(str(pte), str(pieces_dir))
        t0 = time.perf_counter()
        runner.generate(inputs, config, on_token, lambda s: stats.update(json.loads(s.to_json_string())))
        t1 = time.perf_counter()
    buf.flush()
    return _result(buf.text, stats, (t0, stamps, t1))


def _result(text: str, stats: dict[str, Any], timing: tuple[float, list[float], float] | None = None) -> RunResult:
    from mobilemllm.runtime.metrics import rates, wall_rates

    r = rates(stats) if timing is None else wall_rates(stats, *timing)
    return RunResult(text=text, prompt_tokens=int(stats.get("prompt_tokens", 0)),
                     generated_tokens=int(stats.get("generated_tokens", 0)), ttft_s=r["ttft_s"],
                     prefill_tokens_per_s=r["prefill_tokens_per_s"], decode_tokens_per_s=r["decode_tokens_per_s"],
                     stats=stats)
