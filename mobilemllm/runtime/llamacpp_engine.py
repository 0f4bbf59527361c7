"""llama.cpp itself, through llama-cpp-python: load a GGUF text model + mmproj, encode images, decode.

The image goes through llama.cpp's multimodal library (mtmd / clip.cpp): each view, already padded and resized
by the manifest's preprocessing (:func:`~mobilemllm.runtime.base.bundle_views`), is handed over as an RGB
bitmap of the encoder's size, so clip.cpp only normalises it (its resize is a copy at that size), and
``mtmd_encode_chunk`` returns the projected image embeddings. The prompt is our token ids: runs of text ids go
to ``llama_decode`` as tokens, the runs of IMAGE_TOKEN_ID as those embeddings, at the positions training used;
one ``llama_decode`` per sampled token after that. llama.cpp keeps the KV cache between turns.

:class:`LlamaCppEngine` (load, encode a view, decode, logits) is used by the bundle's runner
(:mod:`.llamacpp_runner`), export's parity check, the class-token probe (:mod:`.llamacpp_probe`) and the
llama.cpp bench backend.

Needs llama-cpp-python: ``python scripts/install_llama_cpp.py`` builds 0.3.36 with the CLIP class-token fix
(docs/gguf.md), then ``pip install 'mobilemllm[gguf]'``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.errors import BackendUnavailable, CheckpointError

INSTALL = ("python scripts/install_llama_cpp.py (llama-cpp-python with llama.cpp's CLIP fix, built from source; "
           "docs/gguf.md), then pip install 'mobilemllm[gguf]'")


def import_llama_cpp():
    """(llama_cpp, mtmd_cpp) modules, quiet; BackendUnavailable in one line when llama-cpp-python is missing."""
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError as e:
        raise BackendUnavailable(f"running GGUF bundles needs llama-cpp-python ({e}): {INSTALL}") from None
    _quiet(llama_cpp)
    return llama_cpp, mtmd_cpp


_LOG_CALLBACK = None  # kept alive: llama.cpp calls it from C


def _quiet(llama_cpp) -> None:
    """Send llama.cpp's and clip.cpp's log lines nowhere (they print every tensor at load otherwise)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        try:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        except (AttributeError, ImportError):  # older bindings: clip.cpp logs through llama_log_set
            pass


def check_gguf(path: Path, what: str) -> None:
    """Refuse a file that is not a readable GGUF in one line (before llama.cpp parses it)."""
    if not path.is_file():
        raise CheckpointError(f"the {what} {path} is missing; re-export the bundle with `mobilemllm export --target "
                              "gguf`")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"the {what} {path} is not a GGUF file (it starts with {magic!r}); re-export the "
                              "bundle with `mobilemllm export --target gguf`")


class LlamaCppEngine:
    """A llama.cpp text model with its KV cache, and clip.cpp's mmproj over it."""

    def __init__(self, model_path: str | Path, mmproj_path: str | Path, n_ctx: int, threads: int | None = None):
        self.llama, self.mtmd_cpp = import_llama_cpp()
        model_path, mmproj_path = Path(model_path), Path(mmproj_path)
        check_gguf(model_path, "text model")
        check_gguf(mmproj_path, "mmproj")
        # llama-cpp-python's own default: half the logical CPUs. ggml's OpenMP threads spin while they wait, so
        # one per core (not per hyper-thread, nor one more than the cores) keeps them from stalling each other.
        self.threads = int(threads or max(1, (os.cpu_count() or 2) // 2))
        self.n_ctx = int(n_ctx)
        self.model = self.ctx = self.mtmd = None
        llama = self.llama
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.model:
            raise CheckpointError(f"llama.cpp cannot load the text model {model_path} (damaged or not a LLaMA "
                                  "GGUF); re-export the bundle with `mobilemllm export --target gguf`")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise CheckpointError(f"llama.cpp cannot make a context of {self.n_ctx} tokens for {model_path}")
        mparams = self.mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        mparams.warmup = False
        mparams.n_threads = self.threads
        self.mtmd = self.mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.model, mparams)
        if not self.mtmd:
            raise CheckpointError(f"llama.cpp's clip.cpp cannot load the mmproj {mmproj_path} (damaged, or a "
                                  "projector this llama.cpp does not know); re-export the bundle with "
                                  "`mobilemllm export --target gguf`")
        self.n_embd = int(llama.llama_model_n_embd_inp(self.model))
        self.n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model)))
        self.n_past = 0

    # ---- image -------------------------------------------------------------------------------------
    def encode_view(self, view: np.ndarray) -> np.ndarray:
        """One uint8 view (3, S, S) -> its image embeddings (T, n_embd) from clip.cpp."""
        m = self.mtmd_cpp
        hwc = np.ascontiguousarray(np.asarray(view, dtype=np.uint8).transpose(1, 2, 0))
        h, w = hwc.shape[:2]
        bitmap = m.mtmd_bitmap_init(w, h, hwc.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            marker = m.mtmd_default_marker()
            text = m.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise CheckpointError(f"clip.cpp could not take a {w}x{h} image (mtmd_tokenize returned {rc})")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                if m.mtmd_encode_chunk(self.mtmd, chunk) != 0:
                    raise CheckpointError("clip.cpp failed to encode the image (mtmd_encode_chunk)")
                out = m.mtmd_get_output_embd(self.mtmd)
                return np.ctypeslib.as_array(out, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            raise CheckpointError("clip.cpp made no image chunk from the image")
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def encode_views(self, views: np.ndarray) -> np.ndarray:
        """Views (V, 3, S, S) -> their embeddings, concatenated (V*T, n_embd) as the prompt holds them."""
        return np.concatenate([self.encode_view(v) for v in views], axis=0)

    # ---- text model --------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the KV cache."""
        self.llama.llama_memory_clear(self.llama.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, tokens: Sequence[int] | None, embeds: np.ndarray | None, want_logits: bool) -> None:
        llama = self.llama
        n = len(tokens) if tokens is not None else int(embeds.shape[0])
        if self.n_past + n > self.n_ctx:
            raise CheckpointError(f"the context is full ({self.n_past} + {n} > {self.n_ctx} tokens)")
        batch = llama.llama_batch_init(n, 0 if tokens is not None else self.n_embd, 1)
        try:
            if tokens is not None:
                for i, t in enumerate(tokens):
                    batch.token[i] = int(t)
            else:
                flat = np.ascontiguousarray(embeds, dtype=np.float32)
                ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (want_logits and i == n - 1) else 0
            batch.n_tokens = n
            rc = llama.llama_decode(self.ctx, batch)
            if rc != 0:
                raise CheckpointError(f"llama.cpp failed to decode {n} positions (llama_decode returned {rc})")
        finally:
            llama.llama_batch_free(batch)
        self.n_past += n

    def logits(self) -> np.ndarray:
        """The last decoded position's logits (n_vocab,)."""
        ptr = self.llama.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, ids: Sequence[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Decode ``ids`` after the cache (IMAGE_TOKEN_ID runs take ``image_embeds`` rows in order); returns the
        logits after the last one."""
        runs: list[tuple[bool, int, int]] = []  # (is_image, start, end)
        for i, t in enumerate(ids):
            image = int(t) == IMAGE_TOKEN_ID
            if runs and runs[-1][0] == image:
                runs[-1] = (image, runs[-1][1], i + 1)
            else:
                runs.append((image, i, i + 1))
        used = 0
        for k, (image, start, end) in enumerate(runs):
            last = k == len(runs) - 1
            if image:
                if image_embeds is None or used + (end - start) > len(image_embeds):
                    raise CheckpointError("the prompt has more image positions than the image gave embeddings")
                self._decode(None, image_embeds[used:used + end - start], last)
                used += end - start
            else:
                self._decode(list(ids[start:end]), None, last)
        return self.logits()

    def step(self, token: int) -> np.ndarray:
        """Decode one token after the cache; its logits."""
        self._decode([token], None, True)
        return self.logits()

    def close(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is None:
            return
        if self.mtmd:
            self.mtmd_cpp.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def bundle_files(manifest: dict[str, Any]) -> tuple[str, str]:
    """(text model, mmproj) file names of a GGUF bundle's manifest."""
    graphs = manifest.get("graphs") or {}
    try:
        return graphs["text_decoder"]["file"], graphs["vision_encoder"]["file"]
    except (KeyError, TypeError):
        raise CheckpointError("the GGUF bundle's manifest names no text_decoder/vision_encoder files; re-export it "
                              "with `mobilemllm export --target gguf`") from None
