"""Run a GGUF bundle (``model.gguf`` + ``mmproj.gguf``) with llama.cpp itself, behind the same
:class:`~mobilemllm.runtime.base.Runner` interface as the ExecuTorch and ONNX runners (the engine:
:mod:`.llamacpp_engine`). A bundle with a CLIP tower on a llama.cpp without the class-token fix
(ggml-org/llama.cpp#25814) still runs, with a one-line warning: its image tokens are wrong there.
"""

from __future__ import annotations

import numpy as np

from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.runtime.base import Runner
from mobilemllm.runtime.llamacpp_engine import LlamaCppEngine, bundle_files
from mobilemllm.runtime.llamacpp_probe import clip_problem
from mobilemllm.runtime.onnx_runner import pick_token


class LlamaCppRunner(Runner):
    """A GGUF bundle through llama.cpp: clip.cpp encodes the image, llama.cpp decodes; the KV cache is kept
    between turns. Sampling honours temperature, top_p and seed (numpy's generator, the rule eager generation
    uses). Option: ``threads`` (llama.cpp's threads; default half the logical CPUs, as llama-cpp-python's)."""

    format = "gguf"
    options = ("threads",)

    def describe(self) -> str:
        return f"llama.cpp (llama-cpp-python), {self.manifest['target']} bundle"

    def _load(self) -> None:
        text, mmproj = bundle_files(self.manifest)
        self.engine = LlamaCppEngine(self.bundle_dir / text, self.bundle_dir / mmproj, self.max_context,
                                     threads=self.opts.get("threads"))
        self._warn_clip_graph()

    def _warn_clip_graph(self) -> None:
        """A CLIP tower on a llama.cpp whose clip.cpp feeds the class token in place of the first patch
        (export refuses it, but a bundle outlives the llama.cpp it was checked on): warn once, and run."""
        vision = ((self.manifest.get("model") or {}).get("config") or {}).get("vision") or {}
        if vision.get("kind") != "clip" or self.warn is None:
            return
        problem = clip_problem()
        if problem is not None:
            self.warn(f"warning: {problem}; this bundle's image tokens are wrong on it")

    def _reset_cache(self) -> None:
        self.engine.clear()

    def _run(self, ids, views, max_new, sampling, on_token):
        engine = self.engine
        image_embeds = engine.encode_views(views) if IMAGE_TOKEN_ID in ids else None
        logits = engine.prefill(ids, image_embeds)
        rng = np.random.default_rng(sampling.seed)
        top_p = 1.0 if sampling.top_p is None else float(sampling.top_p)
        for i in range(max_new):
            token = pick_token(logits, float(sampling.temperature), top_p, rng)
            if on_token(token) or i == max_new - 1:
                break
            logits = engine.step(token)
        return {}

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        super().close()
