"""``format: gguf`` in the export pipeline: write the text GGUF and the mmproj, quantize the text model with
llama.cpp, and check both against eager through llama.cpp itself (:mod:`mobilemllm.runtime.llamacpp_engine`).

The bundle holds ``model.gguf`` (LLaMA architecture, its tokenizer and chat template inside), ``mmproj.gguf``
(tower + connector), ``tokenizer/`` and ``manifest.json`` like every other format; ``graphs`` names the two
files. Quantization is one llama.cpp file type for the text model (``f16``, ``q8_0``, ``q4_0``, ``q4_k_m``);
the mmproj stays fp16.

A CLIP tower needs a llama.cpp with the class-token fix (ggml-org/llama.cpp#25814): :mod:`.probe` asks the
installed one before anything is written.

Parity: the mmproj's image embeddings against eager's (fp16 weights; clip.cpp normalises and multiplies in its
own order), the logits of the eager greedy answer fed token by token, and llama.cpp's own greedy answer. f16
must give eager's greedy tokens; quantized files are held to the scheme's logit-cosine gate.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilemllm import quantization as Q
from mobilemllm.data.images import preprocess
from mobilemllm.errors import BackendUnavailable, ConfigError
from mobilemllm.export import manifest_sections as S, parity as P
from mobilemllm.export.gguf.mmproj import write_mmproj_gguf
from mobilemllm.runtime.llamacpp_probe import clip_problem
from mobilemllm.export.gguf.quantize import quantize_text_gguf, tensor_type, tensor_types
from mobilemllm.export.gguf.support import problems
from mobilemllm.export.gguf.text import write_text_gguf
from mobilemllm.export.gguf.vocab import chat_template, tokenizer_kind, tokenizer_spec
from mobilemllm.export.plugin import PARITY_KEYS, ExportFormat, Job
from mobilemllm.inference import prompt_ids
from mobilemllm.runtime.base import bundle_views
from mobilemllm.runtime.llamacpp_engine import INSTALL, LlamaCppEngine

TEXT_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
F16_TEXT = "_model-f16.gguf"  # the converter's output before llama.cpp quantizes it (staging only)
PARITY_QUESTION = "What is in the image?"
# f16 gates: the mmproj's embeddings and the logits within fp16 rounding of eager's, the same greedy answer.
F16_GATES = {"image_max_rel_diff": 2e-2, "logits_max_rel_diff": 2e-2, "min_cosine": 0.9999, "min_greedy": 1.0}


def scheme_of(job_or_plan) -> str:
    plan = getattr(job_or_plan, "plan", job_or_plan)
    return plan.scheme("text_decoder")


class GgufFormat(ExportFormat):
    name = "gguf"
    label = "GGUF"
    recipe_keys = ("name", "format", "description", "quantization", "parity")
    parity_keys = PARITY_KEYS
    default_target = "gguf"

    # ---- preflight -----------------------------------------------------------------------------------
    def check(self, recipe: dict[str, Any]) -> list[str]:
        """One llama.cpp file type for the whole text model; the mmproj stays f16; no group sizes."""
        plan_errors = Q.check(recipe)
        if plan_errors:
            return []  # the registry names them
        plan = Q.resolve(recipe)
        errors = []
        if plan.scheme("token_embedding") != plan.scheme("text_decoder"):
            errors.append("llama.cpp quantizes the text model with one file type: token_embedding must be "
                          f"{plan.scheme('text_decoder')} like text_decoder (or left out)")
        spec = recipe.get("quantization")
        if isinstance(spec, dict) and any(isinstance(v, dict) and "group_size" in v for v in spec.values()):
            errors.append("GGUF types have fixed block sizes (32 weights for q8_0/q4_0, 256 for q4_k_m); "
                          "--group-size does not apply")
        return errors

    def require(self, recipe: dict[str, Any]) -> None:
        """The gguf writer and llama-cpp-python (llama.cpp's quantizer and the parity run) must be installed."""
        missing = []
        for module, package in (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")):
            try:
                __import__(module)
            except ImportError:
                missing.append(package)
        if missing:
            raise BackendUnavailable(f"--target gguf needs {' and '.join(missing)} (llama.cpp's GGUF writer, "
                                     f"quantizer and runtime): {INSTALL}")

    def check_model(self, config) -> list[str]:
        """What llama.cpp cannot run in this model config, one line each: enough to refuse a model before its
        weights load (connector, patch grid, views); :meth:`prepare` adds what needs the loaded model."""
        return problems(config)

    # ---- export --------------------------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        """Refuse, in one line, a model llama.cpp cannot run, before anything is written."""
        model = job.model
        found = problems(model.config, model.vision.model.config, type(model.llm).__name__)
        try:
            tokenizer_kind(tokenizer_spec(job.tokenizer))
        except ConfigError as e:
            found.append(str(e))
        if found:
            raise ConfigError("cannot export to GGUF: " + "; ".join(found))
        self._check_clip_graph(job)

    @staticmethod
    def _check_clip_graph(job: Job) -> None:
        """A CLIP tower (class token) needs a llama.cpp whose clip.cpp keeps the class token first: ask the
        installed one (a probe of a few milliseconds) and refuse in one line naming the fix, before anything is
        written; with --force, warn and go on (parity then marks the bundle)."""
        if job.model.config.vision.kind != "clip":
            return
        problem = clip_problem()
        if problem is None:
            return
        if not job.force:
            raise ConfigError(f"cannot export to GGUF: {problem}; or pass --force to write the bundle anyway "
                              "(marked as failing parity)")
        job.log(f"warning: {problem} (exporting anyway because of --force)")

    def modules(self, job: Job) -> dict[str, Any]:
        return {"model": job.model}  # written from the weights as they are: nothing to trace

    def convert(self, job: Job, modules: dict[str, Any]) -> None:
        """The fp16 text GGUF (with tokenizer and chat template) and the fp16 mmproj, into the staging folder."""
        t0 = time.perf_counter()
        model, cfg = job.model, job.model.config
        prompt = S.prompt_section(cfg, job.tokenizer)
        template = chat_template(prompt)
        f16 = job.staging / (TEXT_FILE if scheme_of(job) == "f16" else F16_TEXT)
        job.state["text"] = write_text_gguf(model, job.tokenizer, f16, prompt, template, cfg.name)
        job.state["mmproj"] = write_mmproj_gguf(model, job.staging / MMPROJ_FILE, cfg.name)
        job.state["chat_template"] = template
        job.log(f"{TEXT_FILE} and {MMPROJ_FILE} written (fp16, {time.perf_counter() - t0:.1f} s)")

    def quantize_files(self, job: Job) -> None:
        """llama.cpp's quantizer on the text model; ``job.qinfo`` from the types the files hold."""
        scheme = scheme_of(job)
        text = job.staging / TEXT_FILE
        if scheme != "f16":
            t0 = time.perf_counter()
            src = job.staging / F16_TEXT
            quantize_text_gguf(src, text, scheme)
            os.unlink(src)
            job.log(f"{TEXT_FILE} quantized to {scheme} by llama.cpp ({time.perf_counter() - t0:.1f} s)")
        types = tensor_types(text)
        backend = "llama.cpp llama_model_quantize" if scheme != "f16" else "gguf (fp16 matrices, fp32 norms)"
        job.qinfo = {
            "vision_encoder": {"scheme": "f16", "group_size": None, "backend": "gguf (mmproj: fp16 matrices and "
                               "kernels, fp32 norms and biases)", "tensor_types": tensor_types(job.staging / MMPROJ_FILE)},
            "token_embedding": {"scheme": scheme, "group_size": None, "backend": backend,
                                "tensor_type": tensor_type(text, "token_embd.weight")},
            "text_decoder": {"scheme": scheme, "group_size": None, "backend": backend, "tensor_types": types},
        }

    def manifest(self, job: Job) -> dict[str, Any]:
        versions = {}
        for package in ("gguf", "llama-cpp-python"):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                pass
        return {
            "graphs": {
                "text_decoder": {"file": TEXT_FILE, **job.state["text"], "holds": ["token_embedding", "text_decoder"],
                                 "chat_template": job.state["chat_template"]},
                "vision_encoder": {"file": MMPROJ_FILE, **job.state["mmproj"]},
            },
            "export": {"backend": "llama.cpp", "versions": versions},
        }

    def parity(self, job: Job, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        cfg = job.model.config
        engine = LlamaCppEngine(job.staging / TEXT_FILE, job.staging / MMPROJ_FILE, cfg.llm.max_position_embeddings)
        try:
            checks = measure_parity(job.model, job.tokenizer, engine, manifest, scheme_of(job),
                                    int(job.parity_recipe.get("greedy_tokens", 16)), job.parity_recipe)
        finally:
            engine.close()
        return checks, None

    def roles(self, job: Job) -> dict[str, str]:
        return {TEXT_FILE: "graph", MMPROJ_FILE: "graph"}

    def files_summary(self, job: Job, out: Path) -> str:
        return ", ".join(f"{name} {(out / name).stat().st_size / 1e6:.1f} MB" for name in (TEXT_FILE, MMPROJ_FILE))

    def quant_summary(self, job: Job) -> str:
        return f"text {scheme_of(job)}, mmproj f16"


def gates(scheme: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parity gates of a text-model scheme, with a recipe's ``parity`` overrides."""
    overrides = overrides or {}
    if scheme == "f16":
        out = dict(F16_GATES)
        if "max_rel_diff" in overrides:
            out["logits_max_rel_diff"] = float(overrides["max_rel_diff"])
        return out
    cosine = overrides.get("min_logit_cosine", Q.scheme("llamacpp", scheme).parity_cosine)
    return {"image_max_rel_diff": F16_GATES["image_max_rel_diff"], "logits_max_rel_diff": None,
            "min_cosine": float(cosine), "min_greedy": None}


def teacher_forced(engine, ids: list[int], image_embeds, tokens: list[int]):
    """llama.cpp's logits (len(tokens), V) when fed the reference tokens one by one after the prompt."""
    engine.clear()
    rows = [engine.prefill(ids, image_embeds)]
    for tok in tokens[:-1]:
        rows.append(engine.step(tok))
    return np.stack(rows)


def greedy(engine, ids: list[int], image_embeds, num_tokens: int) -> list[int]:
    """llama.cpp's own greedy answer (argmax, no stop token), ``num_tokens`` long."""
    engine.clear()
    logits = engine.prefill(ids, image_embeds)
    out = []
    for i in range(num_tokens):
        out.append(int(np.argmax(logits)))
        if i < num_tokens - 1:
            logits = engine.step(out[-1])
    return out


def measure_parity(model, tokenizer, engine, manifest: dict[str, Any], scheme: str, num_tokens: int = 16,
                   overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parity checks of the GGUF files (through ``engine``, a LlamaCppEngine) against the eager model."""
    cfg = model.config
    image = P.parity_image(cfg.vision)  # at the encoder's size: clip.cpp's resize is then a copy
    ids = prompt_ids(cfg, tokenizer, PARITY_QUESTION)
    num_tokens = max(1, min(num_tokens, cfg.llm.max_position_embeddings - len(ids)))
    ref_logits, ref_tokens = P.eager_reference(model, ids, image, num_tokens)
    with torch.inference_mode():
        ref_img = model.encode_images(preprocess(image, cfg.vision).unsqueeze(0))[0]
    got_img = engine.encode_views(bundle_views(manifest, image))
    got_logits = torch.from_numpy(teacher_forced(engine, ids, got_img, ref_tokens))
    got_tokens = greedy(engine, ids, got_img, num_tokens)

    g = gates(scheme, overrides)
    img_rel = P.max_rel_diff(got_img, ref_img)
    img_cos = P.logit_cosine(got_img, ref_img)
    rel = P.max_rel_diff(got_logits, ref_logits)
    cos = P.logit_cosine(got_logits, ref_logits)
    agree = P.greedy_agreement(got_tokens, ref_tokens)
    checks = [
        P.check("image_embedding_max_rel_diff", img_rel, g["image_max_rel_diff"], img_rel <= g["image_max_rel_diff"]),
        P.check("image_embedding_cosine", img_cos),
        P.check("logits_max_rel_diff", rel, g["logits_max_rel_diff"],
                None if g["logits_max_rel_diff"] is None else rel <= g["logits_max_rel_diff"]),
        P.check("logit_cosine", cos, g["min_cosine"], cos >= g["min_cosine"]),
        P.check(f"greedy_agreement_{num_tokens}", agree, g["min_greedy"],
                None if g["min_greedy"] is None else agree >= g["min_greedy"]),
        P.check("logits_max_abs_diff", float((got_logits - ref_logits).abs().max())),
        P.check("prompt_tokens", len(ids)),
    ]
    return checks
