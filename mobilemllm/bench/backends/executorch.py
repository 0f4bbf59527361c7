"""ExecuTorch backends for an ``executorch`` bundle (``model.pte`` + tokenizer + manifest).

- ``executorch``: the C++ ``MultimodalRunner`` through its Python bindings, i.e. the runner the Android
  and iOS apps drive. The prompt goes in as token inputs ([BOS] text, image, filler + text), greedy.
  Times come from per-token callbacks (microseconds); the runner's own stats line (``PyTorchObserver
  {...}``, printed by the C++ code to stdout) is captured from the process's stdout, parsed, and kept
  with every repetition. The runner times image encoding inside prefill, so the image encode is timed
  apart: before the runner loads, the program's own ``vision_encoder`` method (what the runner calls, same
  XNNPACK delegate and threads) runs once per planned request, and is freed again (the peak-memory mark is
  reset after it); each request's prefill is then its time to first token minus that image encode.
  ExecuTorch 1.5.1's ``GenerationConfig`` cannot ignore EOS; the warm-up checks that the request
  decodes the full count and otherwise switches to another filler token (greedy decoding is
  deterministic, so the timed runs then decode the full count too).
- ``executorch-methods``: the program's methods (``vision_encoder``, ``token_embedding``,
  ``text_decoder``) called one by one through the ExecuTorch runtime, each timed, EOS ignored: where
  the time goes.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

import torch

from mobilemllm.bench import timing
from mobilemllm.bench.adb import parse_observer_lines
from mobilemllm.bench.backends.bundle_common import bundle_config, bundle_prompt, case_info, check_fits, read_bundle
from mobilemllm.bench.harness import Backend, Repetition
from mobilemllm.bench.prompt import BenchPrompt, bench_image
from mobilemllm.bench.roofline import decoder_weight_bytes, kv_cache_bytes
from mobilemllm.bundle import sha256_file
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import BackendUnavailable, UserError
from mobilemllm.runtime.executorch_runner import load_kernels, set_threads
from mobilemllm.runtime.piece_tokenizer import decode_only_tokenizer_dir

PROGRAM = "model.pte"
MAX_FILLER_TRIES = 8


def _program_path(bundle: Path, manifest: dict) -> Path:
    programs = [rel for rel, e in manifest["files"].items() if e.get("role") == "program" or rel.endswith(".pte")]
    if not programs:
        raise UserError(f"bundle {bundle} lists no .pte program")
    return bundle / programs[0]


def image_input_tensor(manifest: dict, seed: int = 0):
    """The vision_encoder's input as the apps build it: uint8 views stacked (1, 3, V*S, S)."""
    pre = manifest["preprocessing"]
    s, views = pre["image_size"], pre.get("views", 1)
    x = torch.from_numpy(bench_image(s, views, seed))
    x = x.permute(1, 0, 2, 3).reshape(1, 3, views * s, s).contiguous()
    if pre["input_dtype"] == "float32":
        x = x.float()
    return x


def decode_bytes_per_token(manifest: dict, position: int) -> int:
    cfg = bundle_config(manifest)
    q = (manifest.get("quantization") or {}).get("text_decoder") or {}
    gs = q.get("group_size")
    # an int8 cache reads 1 byte per value plus a float scale and an int8 zero point per head_dim values
    kv_bytes = 1 + 5 / cfg.llm.head_dim if (manifest.get("context") or {}).get("kv_cache") == "int8" else 4
    return (decoder_weight_bytes(cfg.llm, q.get("scheme", "fp32"), gs if gs else None)
            + int(kv_cache_bytes(cfg.llm, position, dtype_bytes=kv_bytes)))


class _ExecuTorchBase(Backend):
    def open(self) -> None:
        try:
            load_kernels()  # custom SDPA / cache update and the quantized embedding kernels
        except ImportError as e:
            raise BackendUnavailable(f"the executorch backend needs the executorch package ({e}): "
                                     "pip install executorch==1.5.1") from None
        self.bundle = Path(self.target)
        self.manifest = read_bundle(self.bundle, "executorch")
        self.pte = _program_path(self.bundle, self.manifest)
        self.tokenizer_dir = self.bundle / self.manifest["tokenizer"]["dir"]
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.info = case_info(self.bundle, self.manifest)

        with _CapturedOutput():  # the threadpool logs its CPU probing to stderr
            used = set_threads(self.threads)
        if used and not self.threads:
            self.threads = used

    def _prompt(self, prompt_tokens: int, new_tokens: int, filler_index: int = 0) -> BenchPrompt:
        prompt = bundle_prompt(self.manifest, self.tokenizer, prompt_tokens, filler_index)
        check_fits(self.manifest, prompt, new_tokens, self.target)
        max_seq = self.manifest["context"]["max_seq_len"]
        for part in (prompt.prefix_ids, prompt.suffix_ids):
            if len(part) > max_seq:
                raise UserError(f"a {len(part)}-token text piece exceeds the bundle's max_seq_len {max_seq} (one "
                                f"prefill call); use a smaller --prompt-tokens or re-export with a larger max_seq_len")
        self.info.decode_bytes_per_token = decode_bytes_per_token(self.manifest, prompt.prefill_tokens + new_tokens // 2)
        return prompt


class _CapturedOutput:
    """Send the process's fds 1 and 2 (the C++ runner's printf()s and ET_LOG lines) to a temporary file."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        try:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers the runner's printf()s
        except (OSError, AttributeError):
            pass
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False


def time_vision_encoder(pte: Path, image, runs: int) -> list[float]:
    """Seconds of ``runs`` calls of the program's ``vision_encoder`` method (after one untimed call)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(pte)).load_method("vision_encoder")
    method.execute([image])
    times = []
    for _ in range(runs):
        t = timing.now()
        method.execute([image])
        times.append(timing.now() - t)
    return times


class ExecuTorchRunnerBackend(_ExecuTorchBase):
    name = "executorch"

    def open(self) -> None:
        super().open()
        self.image = image_input_tensor(self.manifest)
        self.encode_s = time_vision_encoder(self.pte, self.image, max(1, self.planned_requests))
        timing.release_memory()
        timing.reset_peak_rss()  # the method above is freed: the case's peak is the runner's own
        self.info.notes.append("image encode: the program's vision_encoder method timed alone (the runner times it "
                               "inside prefill); prefill = time to first token - image encode")
        self.requests = 0

    def load(self) -> None:
        from executorch.extension.llm.runner import MultimodalRunner

        # the same vocabulary, but every piece is ASCII: the per-token callback (µs timestamps) then works for
        # byte-level BPE too, whose raw pieces can end inside a UTF-8 character and abort pybind11's str()
        pieces = decode_only_tokenizer_dir(self.tokenizer, sha256_file(self.tokenizer_dir / "tokenizer.json"))
        with _CapturedOutput():
            self.runner = MultimodalRunner(str(self.pte), str(pieces))
        self.captured: list[str] = []
        self._first_load = True

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        self.prompt_tokens, self.new_tokens = prompt_tokens, new_tokens
        self.filler_index = 0
        self.prompt = self._prompt(prompt_tokens, new_tokens)
        return self.prompt

    def run_once(self) -> Repetition:
        from executorch.extension.llm.runner import GenerationConfig, make_image_input, make_token_input

        p = self.prompt
        inputs = [make_token_input(p.prefix_ids), make_image_input(self.image), make_token_input(p.suffix_ids)]
        # max_new_tokens counts the token prefill produces: +1 so that decode steps == new_tokens
        config = GenerationConfig(echo=False, max_new_tokens=self.new_tokens + 1, temperature=0.0, num_bos=0,
                                  num_eos=0, seq_len=-1)
        stamps: list[float] = []
        self.runner.reset()
        try:
            with _CapturedOutput() as out:
                t0 = timing.now()
                self.runner.generate(inputs, config, lambda _piece: stamps.append(timing.now()), None)
                t1 = timing.now()
        except RuntimeError as e:  # the runner's reason is in what it logged, not in the exception
            lines = [ln for ln in out.text.splitlines() if ln.strip() and "tokenizers:regex" not in ln]
            raise BackendUnavailable(f"the ExecuTorch runner could not run {self.pte} ({e}); its last log lines:\n"
                               + "\n".join(lines[-8:])) from None
        stats = parse_observer_lines(out.text)
        if not stats:
            raise RuntimeError("the ExecuTorch runner printed no PyTorchObserver stats line; output was:\n"
                               + out.text[-2000:])
        st = stats[-1]
        self.captured.append(out.text)
        if self._first_load:
            self.extra_load_s = max(0, st["model_load_end_ms"] - st["model_load_start_ms"]) / 1e3
            self._first_load = False
        if st["prompt_tokens"] != p.prefill_tokens:
            raise RuntimeError(f"the runner prefilled {st['prompt_tokens']} tokens, the request has {p.prefill_tokens}")
        if not stamps:
            raise RuntimeError("the ExecuTorch runner generated no token")
        ttft, decode_s, decoded = timing.time_to_first_token(t0, stamps[0]), stamps[-1] - stamps[0], len(stamps) - 1
        encode = self.encode_s[self.requests % len(self.encode_s)]
        self.requests += 1
        return Repetition(prefill_tokens=int(st["prompt_tokens"]), decode_tokens=decoded, ttft_s=ttft,
                          prefill_s=max(ttft - encode, 1e-9), decode_s=decode_s, total_s=t1 - t0,
                          image_encode_s=encode, runner_stats=st)

    def on_warmup_done(self, reps: list[Repetition]) -> None:
        """Greedy decoding stopped at EOS: try other filler tokens until the request decodes the full count."""
        if not reps or all(r.decode_tokens >= self.new_tokens for r in reps):
            return
        for i in range(1, MAX_FILLER_TRIES):
            self.filler_index = i
            self.prompt = self._prompt(self.prompt_tokens, self.new_tokens, i)
            if self.run_once().decode_tokens >= self.new_tokens:
                self.info.notes.append(f"filler token #{i}: the first stopped at EOS")
                return
        self.filler_index = 0
        self.prompt = self._prompt(self.prompt_tokens, self.new_tokens, 0)

    def close(self) -> None:
        self.runner = None


class ExecuTorchMethodsBackend(_ExecuTorchBase):
    name = "executorch-methods"

    METHODS = ("vision_encoder", "token_embedding", "text_decoder")

    def load(self) -> None:
        from executorch.runtime import Runtime

        missing = [m for m in self.METHODS if m not in self.manifest.get("methods", {})]
        if missing:
            raise UserError(f"bundle {self.target} has no method(s) {', '.join(missing)}")
        self.program = Runtime.get().load_program(str(self.pte))
        self.methods = {name: self.program.load_method(name) for name in self.METHODS}
        self.image = image_input_tensor(self.manifest)

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        self.prompt = self._prompt(prompt_tokens, new_tokens)
        self.new_tokens = new_tokens
        self.max_seq = self.manifest["context"]["max_seq_len"]
        return self.prompt

    def run_once(self) -> Repetition:
        p = self.prompt
        spent = {n: {"calls": 0, "seconds": 0.0} for n in self.METHODS}

        def call(name, *args):
            t = timing.now()
            out = self.methods[name].execute(list(args))[0]
            spent[name]["seconds"] += timing.now() - t
            spent[name]["calls"] += 1
            return out

        t0 = timing.now()
        img = call("vision_encoder", self.image)
        t1 = timing.now()
        pre = call("token_embedding", torch.tensor([p.prefix_ids], dtype=torch.long))
        post = call("token_embedding", torch.tensor([p.suffix_ids], dtype=torch.long))
        emb = torch.cat([pre, img, post], dim=1)
        pos = 0
        for start in range(0, emb.shape[1], self.max_seq):  # the runner's chunking by max_seq_len
            chunk = emb[:, start:start + self.max_seq].contiguous()
            logits = call("text_decoder", chunk, torch.tensor([pos], dtype=torch.long))
            pos += chunk.shape[1]
        token = int(torch.argmax(logits.reshape(-1)))
        t2 = timing.now()
        for _ in range(self.new_tokens):
            e = call("token_embedding", torch.tensor([[token]], dtype=torch.long))
            logits = call("text_decoder", e, torch.tensor([pos], dtype=torch.long))
            pos += 1
            token = int(torch.argmax(logits.reshape(-1)))
        t3 = timing.now()
        return Repetition(prefill_tokens=p.prefill_tokens, decode_tokens=self.new_tokens,
                          ttft_s=timing.time_to_first_token(t0, t2), prefill_s=t2 - t1, decode_s=t3 - t2,
                          total_s=t3 - t0, image_encode_s=t1 - t0, methods=spent)

    def close(self) -> None:
        self.methods = None
        self.program = None
