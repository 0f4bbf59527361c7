"""ONNX Runtime backend for an ``onnx`` bundle (``vision.onnx``, ``embed.onnx``, ``decoder.onnx``).

Opens the bundle through :func:`mobilemllm.runtime.open_runner` (the runner ``mobilemllm generate`` uses)
and times each call of its engine's graphs: image encode, prompt embedding + one prefill call, then
``new_tokens`` decode calls feeding ``present.*`` back, greedy with EOS ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import mobilemllm.runtime.onnx_runner
from mobilemllm.bench import timing
from mobilemllm.bench.backends.bundle_common import bundle_config, bundle_prompt, case_info, check_fits, read_bundle
from mobilemllm.bench.harness import Backend, Repetition
from mobilemllm.bench.prompt import BenchPrompt, bench_image
from mobilemllm.bench.roofline import kv_cache_bytes
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import BackendUnavailable
from mobilemllm.runtime import open_runner

GRAPHS = ("vision_encoder", "token_embedding", "text_decoder")


def graph_bytes(bundle: Path, manifest: dict, part: str) -> int:
    """Bytes of one graph on disk, with its external-data files (``decoder.onnx`` + ``decoder.onnx.data``...)."""
    name = manifest["graphs"][part]["file"]
    stem = name.rsplit(".onnx", 1)[0]
    return sum(e["size"] for rel, e in manifest["files"].items() if rel == name or rel.startswith(stem + ".onnx"))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def open(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs onnxruntime: pip install onnxruntime") from None

        self.bundle = Path(self.target)
        self.manifest = read_bundle(self.bundle, "onnx")

    def load(self) -> None:
        self.runner = open_runner(self.bundle, threads=self.threads).load().engine
        self.tokenizer = self.runner.tokenizer
        self.info = case_info(self.bundle, self.manifest)
        pre = self.manifest["preprocessing"]
        self.views = bench_image(pre["image_size"], pre.get("views", 1))
        self.vision_input = self.runner.vision.get_inputs()[0].name

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        self.prompt = bundle_prompt(self.manifest, self.tokenizer, prompt_tokens)
        check_fits(self.manifest, self.prompt, new_tokens, self.target)
        self.new_tokens = new_tokens
        cfg = bundle_config(self.manifest)
        self.info.decode_bytes_per_token = graph_bytes(self.bundle, self.manifest, "text_decoder") + kv_cache_bytes(
            cfg.llm, self.prompt.prefill_tokens + new_tokens // 2)
        return self.prompt

    def run_once(self) -> Repetition:
        r, p = self.runner, self.prompt
        spent = {n: {"calls": 0, "seconds": 0.0} for n in GRAPHS}

        def timed(name, fn, *args):
            t = timing.now()
            out = fn(*args)
            spent[name]["seconds"] += timing.now() - t
            spent[name]["calls"] += 1
            return out

        ids = p.prefix_ids + [IMAGE_TOKEN_ID] * p.num_visual_tokens + p.suffix_ids
        t0 = timing.now()
        img = timed("vision_encoder", r.vision.run, None, {self.vision_input: self.views})[0]
        t1 = timing.now()
        emb = timed("token_embedding", r.embed, ids, img)
        logits, past = timed("text_decoder", r.step, emb, r.empty_past())
        token = int(np.argmax(logits))
        t2 = timing.now()
        for _ in range(self.new_tokens):
            e = timed("token_embedding", r.embed_session.run, None, {"input_ids": np.asarray([[token]], np.int64)})[0]
            logits, past = timed("text_decoder", r.step, e, past)
            token = int(np.argmax(logits))
        t3 = timing.now()
        return Repetition(prefill_tokens=p.prefill_tokens, decode_tokens=self.new_tokens,
                          ttft_s=timing.time_to_first_token(t0, t2), prefill_s=t2 - t1, decode_s=t3 - t2,
                          total_s=t3 - t0, image_encode_s=t1 - t0, methods=spent)

    def close(self) -> None:
        self.runner = None
