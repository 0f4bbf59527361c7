"""llama.cpp backend: a ``gguf`` bundle, or a bare GGUF pair made elsewhere, run by llama.cpp itself.

Uses :class:`mobilemllm.runtime.llamacpp_engine.LlamaCppEngine` (llama-cpp-python's C API, what ``mobilemllm
generate`` runs): clip.cpp / mtmd encodes the image (``mtmd_encode_chunk``, timed as the image encode), one
``llama_decode`` prefills the text runs and the image embeddings, then ``new_tokens`` single-token decodes,
greedy with EOS ignored.

The target is a bundle folder, or ``MODEL.gguf,MMPROJ.gguf`` (``--gguf`` on the command line): a text model
and its mmproj converted by llama.cpp's own scripts. A bare pair has no manifest, so the prompt is BOS + filler
tokens around the image, the image size comes from the mmproj's ``clip.vision.image_size`` and the context
from the text model's ``llama.context_length``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mobilemllm.bench import timing
from mobilemllm.bench.backends.bundle_common import bundle_config, bundle_prompt, case_info, check_fits, read_bundle
from mobilemllm.bench.harness import Backend, CaseInfo, Repetition
from mobilemllm.bench.prompt import BenchPrompt, bench_image, build_prompt, check_context
from mobilemllm.bench.roofline import kv_cache_bytes
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import UserError
from mobilemllm.runtime.llamacpp_engine import LlamaCppEngine, bundle_files, check_gguf, import_llama_cpp

KV_BYTES = 2  # llama.cpp's default KV cache type is f16
# tensors a decode step does not read in full (one row of the token embedding; unless it is also the output)
NOT_READ_PER_TOKEN = ("token_embd.weight",)


def split_pair(target: str) -> tuple[Path, Path | None]:
    """``MODEL.gguf[,MMPROJ.gguf]`` -> the two paths (the mmproj may be missing: refused at open)."""
    parts = [p.strip() for p in str(target).split(",") if p.strip()]
    if not parts or len(parts) > 2:
        raise UserError(f"--gguf {target!r}: give MODEL.gguf,MMPROJ.gguf (the text model and its mmproj)")
    return Path(parts[0]), (Path(parts[1]) if len(parts) == 2 else None)


def is_gguf_pair(target: str) -> bool:
    """True for ``x.gguf`` / ``x.gguf,y.gguf`` (a bare pair), False for a bundle folder."""
    return str(target).split(",")[0].strip().lower().endswith(".gguf")


def _fields(path: Path) -> dict[str, Any]:
    """The scalar metadata of a GGUF file (its tensor data stays on disk)."""
    from gguf import GGUFReader  # the gguf package llama.cpp publishes (installed with llama-cpp-python)

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001 - arrays of odd types: not needed here
            continue
        if isinstance(value, (int, float, str)):
            out[key] = value
    out["_tensor_bytes"] = {t.name: int(t.n_bytes) for t in reader.tensors}
    return out


def decode_weight_bytes(tensor_bytes: dict[str, int]) -> int:
    """Bytes of weights one decode step reads: every tensor but the token embedding (one row of it), which
    the output projection reads in full when the model ties them (no ``output.weight``)."""
    tied = "output.weight" not in tensor_bytes
    return sum(n for name, n in tensor_bytes.items() if tied or name not in NOT_READ_PER_TOKEN)


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def open(self) -> None:
        import_llama_cpp()  # one line when llama-cpp-python is missing
        if is_gguf_pair(self.target):
            self.model_path, self.mmproj_path = split_pair(self.target)
            self.manifest = None
            if self.mmproj_path is None:
                raise UserError(f"--gguf {self.target}: the benchmark encodes an image; give the mmproj too "
                                "(--gguf MODEL.gguf,MMPROJ.gguf)")
        else:
            self.manifest = read_bundle(self.target, "gguf")
            text, mmproj = bundle_files(self.manifest)
            self.model_path, self.mmproj_path = Path(self.target) / text, Path(self.target) / mmproj
        check_gguf(self.model_path, "text model")
        check_gguf(self.mmproj_path, "mmproj")
        self.text_meta, self.mmproj_meta = _fields(self.model_path), _fields(self.mmproj_path)

    def load(self) -> None:
        self.engine = LlamaCppEngine(self.model_path, self.mmproj_path, self._context(), threads=self.threads)
        self.threads = self.engine.threads

    def _context(self) -> int:
        if self.manifest is not None:
            return int(self.manifest["context"]["max_context_len"])
        return int(self.text_meta.get("llama.context_length", 2048))

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        self.new_tokens = new_tokens
        if self.manifest is not None:
            self.info = case_info(self.target, self.manifest)
            tokenizer = load_tokenizer(Path(self.target) / self.manifest["tokenizer"]["dir"])
            self.prompt = bundle_prompt(self.manifest, tokenizer, prompt_tokens)
            check_fits(self.manifest, self.prompt, new_tokens, self.target)
            pre = self.manifest["preprocessing"]
            self.views = bench_image(pre["image_size"], pre.get("views", 1))
            llm = bundle_config(self.manifest).llm
            kv = kv_cache_bytes(llm, self.prompt.prefill_tokens + new_tokens // 2, dtype_bytes=KV_BYTES)
        else:
            self.views = bench_image(int(self.mmproj_meta.get("clip.vision.image_size", 336)))
            visual = len(self.engine.encode_views(self.views))
            llama = self.engine.llama
            bos = int(llama.llama_vocab_bos(llama.llama_model_get_vocab(self.engine.model)))
            self.prompt = build_prompt(prompt_tokens, visual, bos_id=bos if bos >= 0 else None,
                                       filler=self.engine.n_vocab // 2)
            check_context(self.prompt, new_tokens, self._context(), f"--gguf {self.target}")
            self.info = self._pair_info()
            m = self.text_meta
            layers, heads = int(m.get("llama.block_count", 0)), int(m.get("llama.attention.head_count", 1))
            kv_heads = int(m.get("llama.attention.head_count_kv", heads))
            head_dim = int(m.get("llama.embedding_length", 0)) // max(heads, 1)
            kv = 2 * layers * kv_heads * head_dim * (self.prompt.prefill_tokens + new_tokens // 2) * KV_BYTES
        self.info.decode_bytes_per_token = decode_weight_bytes(self.text_meta["_tensor_bytes"]) + int(kv)
        self.info.quantization = self._quant_label()
        return self.prompt

    def _pair_info(self) -> CaseInfo:
        return CaseInfo(model_name=str(self.text_meta.get("general.name", self.model_path.stem)), format="gguf",
                        size_bytes=timing.size_on_disk(self.model_path) + timing.size_on_disk(self.mmproj_path),
                        max_context=self._context(), num_visual_tokens=self.prompt.num_visual_tokens,
                        notes=["a bare GGUF pair: BOS + filler tokens around the image (no bundle template)"])

    def _quant_label(self) -> str:
        """The text model's llama.cpp type, from the bundle's manifest, else from its file type."""
        if self.manifest is not None:
            q = (self.manifest.get("quantization") or {}).get("text_decoder") or {}
            if q.get("scheme"):
                return str(q["scheme"])
        ftype = self.text_meta.get("general.file_type")
        try:
            from gguf import LlamaFileType

            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").lower()
        except (TypeError, ValueError, ImportError):
            return "gguf"

    def run_once(self) -> Repetition:
        e, p = self.engine, self.prompt
        ids = p.prefix_ids + [IMAGE_TOKEN_ID] * p.num_visual_tokens + p.suffix_ids
        e.clear()
        t0 = timing.now()
        embeds = e.encode_views(self.views)
        t1 = timing.now()
        token = int(np.argmax(e.prefill(ids, embeds)))
        t2 = timing.now()
        for _ in range(self.new_tokens):
            token = int(np.argmax(e.step(token)))
        t3 = timing.now()
        return Repetition(prefill_tokens=p.prefill_tokens, decode_tokens=self.new_tokens,
                          ttft_s=timing.time_to_first_token(t0, t2), prefill_s=t2 - t1, decode_s=t3 - t2,
                          total_s=t3 - t0, image_encode_s=t1 - t0)

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        self.engine = None
