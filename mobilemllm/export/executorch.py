"""The ExecuTorch format: a MobileVLM -> one ``.pte`` that ExecuTorch's C++ ``MultimodalRunner`` runs.

Methods (executorch 1.5.1 ``extension/llm/runner`` contract):

- ``vision_encoder(uint8 (1, 3, V*S, S)) -> (1, num_visual_tokens, hidden)``; normalisation in the graph.
- ``token_embedding(int64 (1, T)) -> (1, T, hidden)``, T dynamic.
- ``text_decoder(float (1, T, hidden), int64 (1,) start position) -> (1, vocab)`` last-position logits;
  static KV cache in mutable buffers (:mod:`mobilemllm.export.export_llama`).
- constants: ``get_max_seq_len``, ``get_max_context_len``, ``get_bos_id``, ``get_eos_ids``,
  ``get_vocab_size``, ``use_kv_cache``, ``enable_dynamic_shape``, ``get_image_size``,
  ``get_num_visual_tokens``.

The decoder is exported with strict ``torch.export`` (non-strict turns the cache into constants), then
``RemoveRedundantTransposes`` runs on it and it is exported again. Backends
(:mod:`mobilemllm.export.executorch_backends`): ``xnnpack`` (android, ios), ``coreml`` (ios-coreml; lowers
on Linux, runs only on Apple hardware), ``qnn`` (android-qnn, :mod:`mobilemllm.export.qnn`: lowering and
running need the QNN SDK; tested here: quantization, specs, preflight), ``portable`` (no delegate). A
process that loads the program must import ``executorch.extension.llm.custom_ops`` (the apps link the
same kernels). Parity: :mod:`mobilemllm.export.executorch_parity`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, export

from mobilemllm.bundle.layout import PROGRAM_NAME
from mobilemllm.data.tokenizer import eos_ids
from mobilemllm.errors import ConfigError
from mobilemllm.export.executorch_backends import BACKENDS, METHODS, Backend
from mobilemllm.export.executorch_parity import check_parity
from mobilemllm.export.modules import TokenEmbedding, VisionEncoder
from mobilemllm.export.plugin import ExportFormat, Job

REQUIRED_KERNELS = ["executorch/extension/llm/custom_ops (llama::custom_sdpa, llama::update_cache)",
                    "optimized/quantized kernels (quantized_decomposed, torchao dequantize)"]


def backend_of(recipe: dict[str, Any]) -> Backend:
    return BACKENDS[recipe.get("backend") or "xnnpack"]


# ---- the modules ------------------------------------------------------------------------------------
def context_lengths(model, recipe: dict[str, Any]) -> tuple[int, int]:
    """(KV-cache length, most tokens per decoder call) for ``model`` as the recipe and its backend allow."""
    ctx_model = model.config.llm.max_position_embeddings
    ctx = int(recipe.get("max_context_len") or ctx_model)
    if ctx > ctx_model:
        raise ConfigError(f"max_context_len {ctx} is larger than the model's context {ctx_model}")
    seq = int(recipe.get("max_seq_len") or ctx)
    if seq > ctx:
        raise ConfigError(f"max_seq_len {seq} is larger than max_context_len {ctx}")
    nvt = model.config.num_visual_tokens
    seq = backend_of(recipe).prefill_len(nvt, ctx, seq, explicit=bool(recipe.get("max_seq_len")))
    if nvt + 2 > seq:
        raise ConfigError(f"max_seq_len {seq} cannot hold the image's {nvt} visual tokens")
    return ctx, seq


def build_modules(model, max_context_len: int, kv_cache: str = "fp32", backend: str = "xnnpack",
                  max_seq_len: int | None = None) -> dict[str, torch.nn.Module]:
    """{vision_encoder, token_embedding, text_decoder} sharing ``model``'s weights; the decoder is the
    backend's (``ExportLlama``; Core ML: ``CoreMLRunnerDecoder``; QNN: ``QnnRunnerDecoder``)."""
    decoder = BACKENDS[backend].decoder(model, max_context_len, max_seq_len or max_context_len, kv_cache)
    return {"vision_encoder": VisionEncoder(model).eval(),
            "token_embedding": TokenEmbedding(model.llm.get_input_embeddings()).eval(),
            "text_decoder": decoder.eval()}


def _example_image(cfg) -> torch.Tensor:
    v = cfg.vision
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (1, 3, v.num_views * v.image_size, v.image_size), dtype=torch.uint8, generator=g)


def export_programs(model, modules: dict[str, torch.nn.Module], max_seq_len: int) -> dict[str, Any]:
    """Strict ``torch.export`` of each method (decoder: export, RemoveRedundantTransposes, export again)."""
    from executorch.extension.llm.export.export_passes import RemoveRedundantTransposes

    hidden = model.config.llm.hidden_size
    tok_dim = Dim("tokens", min=1, max=max_seq_len)
    seq_dim = Dim("seq", min=1, max=max_seq_len)
    with torch.no_grad():
        # transformers' vision models use context managers dynamo cannot trace; the encoder has no state,
        # so non-strict export is exact here (only the stateful decoder needs strict export). Eager attention:
        # SDPA's exported form adds ops XNNPACK does not delegate (VisionTower.attention).
        with model.vision.attention("eager"):
            ep_v = export(modules["vision_encoder"], (_example_image(model.config),), strict=False)
        ep_t = export(modules["token_embedding"], (torch.zeros(1, 4, dtype=torch.long),),
                      dynamic_shapes=({1: tok_dim},), strict=True)
        dec_in = (torch.zeros(1, 4, hidden), torch.tensor([0], dtype=torch.long))
        dec_shapes = ({1: seq_dim}, None)
        ep_d = export(modules["text_decoder"], dec_in, dynamic_shapes=dec_shapes, strict=True)
        gm = ep_d.module()
        RemoveRedundantTransposes()(gm)
        ep_d = export(gm, dec_in, dynamic_shapes=dec_shapes, strict=True)
    return {"vision_encoder": ep_v, "token_embedding": ep_t, "text_decoder": ep_d}


def constant_methods(model, tokenizer, max_context_len: int, max_seq_len: int) -> dict[str, Any]:
    bos = tokenizer.bos_token_id
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_context_len,
        "get_bos_id": bos if bos is not None else -1,
        "get_eos_ids": eos_ids(tokenizer),
        "get_vocab_size": model.config.llm.vocab_size,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_image_size": model.config.vision.image_size,
        "get_num_visual_tokens": model.config.num_visual_tokens,
    }


def lower(programs: dict[str, Any], constants: dict[str, Any], backend: str, recipe: dict[str, Any]):
    """Edge dialect + the backend's delegate + ExecuTorch program (an ExecutorchProgramManager)."""
    return BACKENDS[backend].lower(programs, constants, recipe)


def delegation_summary(et_program) -> dict[str, dict[str, Any]]:
    """Per method: how many delegate calls and how many non-delegated operator calls the program has."""
    out = {}
    for plan in et_program._emitter_output.program.execution_plan:
        if plan.name not in METHODS:
            continue
        ops = sum(1 for c in plan.chains for i in c.instructions if type(i.instr_args).__name__ == "KernelCall")
        out[plan.name] = {"delegate_calls": len(plan.delegates), "kernel_calls": ops,
                          "backends": sorted({d.id for d in plan.delegates}),
                          "operators": sorted({op.name for op in plan.operators})}
    return out


# ---- the manifest -------------------------------------------------------------------------------------
def methods_section(cfg, summary: dict[str, dict[str, Any]], constants: dict[str, Any]) -> dict[str, Any]:
    """manifest["methods"]: each method's inputs/outputs and delegation, and the constant methods' values."""
    hidden, vocab = cfg.llm.hidden_size, cfg.llm.vocab_size
    s, views, nvt = cfg.vision.image_size, cfg.vision.num_views, cfg.num_visual_tokens
    methods: dict[str, Any] = {
        "vision_encoder": {"inputs": [{"name": "image", "dtype": "uint8", "shape": [1, 3, views * s, s]}],
                           "outputs": [{"name": "image_embeddings", "dtype": "float32", "shape": [1, nvt, hidden]}]},
        "token_embedding": {"inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"]}],
                            "outputs": [{"name": "embeddings", "dtype": "float32", "shape": [1, "T", hidden]}]},
        "text_decoder": {"inputs": [{"name": "embeddings", "dtype": "float32", "shape": [1, "T", hidden]},
                                    {"name": "start_pos", "dtype": "int64", "shape": [1]}],
                         "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, vocab]}]},
    }
    for name in METHODS:
        if name in summary:
            methods[name]["delegate_calls"] = summary[name]["delegate_calls"]
            methods[name]["backends"] = summary[name].get("backends", [])
            # what runs outside the delegates (ExecuTorch's own kernels): where a slow op would hide
            methods[name]["kernel_operators"] = summary[name].get("operators", [])
    for name, value in constants.items():
        methods[name] = {"value": value}
    return methods


def manifest_sections(cfg, recipe: dict[str, Any], summary: dict[str, Any], constants: dict[str, Any]) -> dict:
    """What an ExecuTorch manifest adds to the sections every format writes."""
    s, views = cfg.vision.image_size, cfg.vision.num_views
    return {
        "methods": methods_section(cfg, summary, constants),
        # the runner passes one image: views (tiles, then the global view) stacked top to bottom
        "preprocessing": {"input_shape": [1, 3, views * s, s], "views_stacked": "vertical"},
        "context": {"max_seq_len": constants["get_max_seq_len"], "max_context_len": constants["get_max_context_len"],
                    "kv_cache": recipe.get("kv_cache") or "fp32"},
        "export": {"backend": recipe.get("backend", "xnnpack"), "required_kernels": REQUIRED_KERNELS},
    }


# ---- the format plug-in -----------------------------------------------------------------------------------
class ExecuTorchFormat(ExportFormat):
    """One program, three methods and constants; the backend (XNNPACK, portable, Core ML, QNN) lowers it."""

    name = "executorch"
    label = "ExecuTorch"
    default_target = "custom"

    def check(self, recipe: dict[str, Any]) -> list[str]:
        backend = recipe.get("backend") or "xnnpack"
        if backend not in BACKENDS:
            return [f"unknown ExecuTorch backend {backend!r}; valid: {', '.join(BACKENDS)}"]
        return BACKENDS[backend].check(recipe)

    def require(self, recipe: dict[str, Any]) -> None:
        backend_of(recipe).require(recipe)

    def prepare(self, job: Job) -> None:
        ctx, seq = context_lengths(job.model, job.recipe)
        job.state.update(backend=backend_of(job.recipe), ctx=ctx, seq=seq, kv=job.recipe.get("kv_cache") or "fp32")

    def modules(self, job: Job) -> dict[str, Any]:
        st = job.state
        job.log(f"building {', '.join(METHODS)} ({st['backend'].name}, context {st['ctx']}, prefill up to "
                f"{st['seq']} tokens, {st['kv']} KV cache)")
        return build_modules(job.model, st["ctx"], st["kv"], st["backend"].name, st["seq"])

    def quantize_modules(self, job: Job, modules: dict[str, Any]) -> dict[str, Any]:
        modules, job.qinfo = job.state["backend"].quantize(job, modules)
        job.log("quantization: " + ", ".join(f"{k} {v['scheme']}" + (f"/g{v['group_size']}" if v.get("group_size")
                                                                     else "") for k, v in job.qinfo.items()))
        return modules

    def convert(self, job: Job, modules: dict[str, Any]) -> None:
        """torch.export of each method, lowering by the backend, the program written into the bundle."""
        st = job.state
        t0 = time.perf_counter()
        programs = export_programs(job.model, modules, st["seq"])
        job.log(f"torch.export done in {time.perf_counter() - t0:.1f} s; lowering to {st['backend'].name}")
        st["constants"] = constant_methods(job.model, job.tokenizer, st["ctx"], st["seq"])
        t0 = time.perf_counter()
        et_program = st["backend"].lower(programs, st["constants"], job.recipe)
        del programs
        st["summary"] = summary = delegation_summary(et_program)
        job.log(f"lowered in {time.perf_counter() - t0:.1f} s: " + ", ".join(
            f"{k} {v['delegate_calls']} delegate call(s) + {v['kernel_calls']} kernel call(s)"
            for k, v in summary.items()))
        with open(job.staging / PROGRAM_NAME, "wb") as f:
            et_program.write_to_file(f)

    def manifest(self, job: Job) -> dict[str, Any]:
        return manifest_sections(job.model.config, job.recipe, job.state["summary"], job.state["constants"])

    def parity(self, job: Job, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        backend = job.state["backend"]
        if backend.skip_reason:
            job.log(f"note: {backend.skip_reason}; the program's structure was checked, its numbers were not")
            return [], backend.skip_reason
        # an int8 KV cache rounds keys, values and queries: checked like a quantized bundle, not to 1e-4
        fp32 = all(q["scheme"] == "fp32" for q in job.qinfo.values()) and job.state["kv"] == "fp32"
        return check_parity(job.model, job.tokenizer, job.staging / PROGRAM_NAME, job.staging, manifest,
                            job.recipe, fp32, job.log), None

    def roles(self, job: Job) -> dict[str, str]:
        return {PROGRAM_NAME: "program"}

    def files_summary(self, job: Job, out: Path) -> str:
        return f"{PROGRAM_NAME} {(out / PROGRAM_NAME).stat().st_size / 1e6:.2f} MB"
