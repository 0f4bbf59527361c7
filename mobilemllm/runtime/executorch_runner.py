"""Run an ExecuTorch bundle through ``executorch.extension.llm.runner.MultimodalRunner``.

That is the C++ runner the Android ``LlmModule`` (multimodal) and the iOS ``MultimodalRunner`` drive, so
what runs here is what runs on the phone: the same program, the same tokenizer folder, the same prompt
segments from the manifest (BOS + text, image, text), the same greedy/temperature sampling.

The runner's token callback receives raw token pieces; a piece can end inside a multi-byte UTF-8
character, so :class:`Utf8Buffer` holds bytes back until a character is complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mobilemllm.bundle import IMAGE_TOKEN_ID, PROGRAM_NAME, fill_prompt, needs_bos_token, prompt_token_ids, sha256_file
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import BackendUnavailable, UserError
from mobilemllm.runtime.base import Runner, RunResult, Sampling
from mobilemllm.runtime.piece_tokenizer import PieceDecoder, decode_only_tokenizer_dir, piece_token, special_token_ids
from mobilemllm.runtime.rates import rates, wall_rates

__all__ = ["ExecuTorchRunner", "RunResult", "Utf8Buffer", "image_tensor", "load_kernels", "run_program"]


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
def _quiet_stdout(log: list[str] | None = None):
    """The C++ runner prints every piece and a report to stdout (fd 1) itself; send that to /dev/null while
    Python's ``sys.stdout`` (where ``on_text`` streams) keeps writing to the real stdout. With ``log``, its
    log lines on stderr (fd 2) go to a temporary file whose text is appended to ``log`` afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd1 = False  # captured (pytest, notebooks): nothing of ours goes through fd 1
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    captured = tempfile.TemporaryFile() if log is not None else None
    saved_err = os.dup(2) if captured is not None else None
    if captured is not None:
        os.dup2(captured.fileno(), 2)
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
        if captured is not None:
            os.dup2(saved_err, 2)
            os.close(saved_err)
            captured.seek(0)
            log.append(captured.read().decode("utf-8", "replace"))
            captured.close()


def _log_tail(log: list[str], lines: int = 8) -> str:
    """The runner's last log lines (its reason for a failure is there, not in the exception)."""
    text = [ln for ln in "".join(log).splitlines() if ln.strip() and "tokenizers:regex" not in ln]
    return "\n".join(text[-lines:])


def _inputs(manifest: dict[str, Any], tokenizer, image_u8: torch.Tensor, question: str):
    """MultimodalInputs: the manifest's segments, text as token ids from the bundle's tokenizer."""
    from executorch.extension.llm.runner import make_image_input, make_token_input

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
    r = rates(stats) if timing is None else wall_rates(stats, *timing)
    return RunResult(text=text, prompt_tokens=int(stats.get("prompt_tokens", 0)),
                     generated_tokens=int(stats.get("generated_tokens", 0)), ttft_s=r["ttft_s"],
                     prefill_tokens_per_s=r["prefill_tokens_per_s"], decode_tokens_per_s=r["decode_tokens_per_s"],
                     stats=stats)


def set_threads(threads: int | None) -> int | None:
    """Size ExecuTorch's shared CPU threadpool (XNNPACK uses it); returns the thread count in use."""
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return None
    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    return int(portable_lib._threadpool_get_thread_count())


class ExecuTorchRunner(Runner):
    """A bundle's ``model.pte`` in ExecuTorch's C++ ``MultimodalRunner`` (the runner the apps drive).

    The C++ runner keeps its KV position across ``generate`` calls until ``reset``: a follow-up turn hands
    it only the new token ids. Sampling is its own: greedy at temperature 0, otherwise top-p 0.9 with a
    clock seed, so a ``seed`` or another ``top_p`` is refused when sampling.
    """

    format = "executorch"
    options = ("threads",)

    def __init__(self, bundle_dir, manifest, **kw):
        if manifest["export"].get("backend") == "coreml":
            raise BackendUnavailable("this bundle uses ExecuTorch's Core ML delegate, which runs only on Apple "
                                     "hardware; run it in the iOS demo app, or export --target ios for XNNPACK")
        super().__init__(bundle_dir, manifest, **kw)
        self.max_seq_len = int(manifest["context"]["max_seq_len"])
        self._runner = None
        self._pos = 0  # the C++ runner's KV position, checked against its stats after every turn

    def describe(self) -> str:
        return f"ExecuTorch MultimodalRunner, {self.manifest['target']} bundle"

    def check_sampling(self, sampling: Sampling) -> None:
        if sampling.temperature <= 0:
            return  # greedy: top_p and seed change nothing
        if sampling.seed is not None:
            raise UserError("ExecuTorch's MultimodalRunner seeds its sampler from the clock and cannot take a seed; "
                            "use temperature 0 for repeatable answers")
        if sampling.top_p is not None and abs(sampling.top_p - 0.9) > 1e-9:
            raise UserError(f"ExecuTorch's MultimodalRunner samples with top_p 0.9 and cannot use top_p "
                            f"{sampling.top_p}; leave top_p unset (or 0.9), or use temperature 0")

    def _load(self) -> None:
        try:
            load_kernels()
            from executorch.extension.llm.runner import MultimodalRunner
        except (ImportError, RuntimeError) as e:
            raise BackendUnavailable(f"running ExecuTorch bundles needs the executorch package ({e}): "
                                     "pip install executorch==1.5.1") from None
        if self.opts.get("threads"):
            set_threads(self.opts["threads"])
        tok_dir = self.bundle_dir / self.manifest["tokenizer"]["dir"]
        pieces = decode_only_tokenizer_dir(self.tokenizer, sha256_file(tok_dir / "tokenizer.json"))
        self._specials = special_token_ids(self.tokenizer)
        self.pte = self.bundle_dir / PROGRAM_NAME
        log: list[str] = []
        try:
            with _quiet_stdout(log):
                self._runner = MultimodalRunner(str(self.pte), str(pieces))
        except RuntimeError as e:
            raise BackendUnavailable(f"ExecuTorch's MultimodalRunner cannot load {self.pte} ({e}); its last log "
                                     f"lines:\n{_log_tail(log)}") from None
        self._pos = 0

    def _reset_cache(self) -> None:
        self._runner.reset()
        self._pos = 0

    def _inputs(self, ids: list[int], views) -> list:
        """Token ids with IMAGE_TOKEN_ID runs -> MultimodalInputs: the image, and token runs cut to the
        program's max_seq_len (the most one prefill call takes)."""
        from executorch.extension.llm.runner import make_image_input, make_token_input

        out, i = [], 0
        while i < len(ids):
            image = ids[i] == IMAGE_TOKEN_ID
            j = i
            while j < len(ids) and (ids[j] == IMAGE_TOKEN_ID) == image:
                j += 1
            if image:
                if j - i != self.manifest["prompt"]["num_visual_tokens"]:
                    raise RuntimeError(f"an image run of {j - i} positions; the bundle's image fills "
                                       f"{self.manifest['prompt']['num_visual_tokens']}")
                out.append(make_image_input(image_tensor(self.manifest, views)))
            else:
                out += [make_token_input([int(t) for t in ids[k:min(j, k + self.max_seq_len)]])
                        for k in range(i, j, self.max_seq_len)]
            i = j
        return out

    def _run(self, ids, views, max_new, sampling, on_token):
        from executorch.extension.llm.runner import GenerationConfig

        runner = self._runner
        config = GenerationConfig(echo=False, max_new_tokens=int(max_new), temperature=float(sampling.temperature),
                                  num_bos=0, num_eos=0, seq_len=self.max_context)
        stats: dict[str, Any] = {}
        calls = [0]

        def on_piece(piece: str) -> None:
            calls[0] += 1
            if on_token(piece_token(piece, self._specials)):
                runner.stop()

        start = self._pos
        self._pos = -1  # unknown until the run completes
        log: list[str] = []
        try:
            with _quiet_stdout(log):
                runner.generate(self._inputs(ids, views), config, on_piece,
                                lambda s: stats.update(json.loads(s.to_json_string())))
        except RuntimeError as e:
            raise RuntimeError(f"ExecuTorch's MultimodalRunner failed on {self.pte} ({e}); its last log lines:\n"
                               f"{_log_tail(log)}") from None
        # the C++ runner's position must be ours: the prompt after what was cached, then every token but the last
        if int(stats.get("prompt_tokens", -1)) != start + len(ids) or \
                int(stats.get("generated_tokens", -1)) != calls[0] - 1:
            raise RuntimeError(f"ExecuTorch's runner is at another KV position than expected (stats {stats}, "
                               f"cached {start} + prefilled {len(ids)}, {calls[0]} tokens)")
        self._pos = start + len(ids) + calls[0] - 1
        return stats
