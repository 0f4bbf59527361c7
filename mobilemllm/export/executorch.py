"""ExecuTorch export: a MobileVLM -> one ``.pte`` that ExecuTorch's C++ ``MultimodalRunner`` runs.

Methods (executorch 1.5.1 ``extension/llm/runner`` contract):

- ``vision_encoder(uint8 (1, 3, V*S, S)) -> (1, num_visual_tokens, hidden)``; normalisation in the graph.
- ``token_embedding(int64 (1, T)) -> (1, T, hidden)``, T dynamic.
- ``text_decoder(float (1, T, hidden), int64 (1,) start position) -> (1, vocab)`` last-position logits;
  static KV cache in mutable buffers (:mod:`mobilemllm.export.export_llama`).
- constants: ``get_max_seq_len``, ``get_max_context_len``, ``get_bos_id``, ``get_eos_ids``,
  ``get_vocab_size``, ``use_kv_cache``, ``enable_dynamic_shape``, ``get_image_size``,
  ``get_num_visual_tokens``.

The decoder is exported with strict ``torch.export`` (non-strict turns the cache into constants), then
``RemoveRedundantTransposes`` runs on it and it is exported again. Backends: ``xnnpack`` (android, ios),
``coreml`` (ios-coreml; lowers on Linux, runs only on Apple hardware), ``qnn`` (android-qnn,
:mod:`mobilemllm.export.qnn`: lowering and running need the QNN SDK; tested here: quantization, specs,
preflight), ``portable`` (no delegate). A process that loads the program must import
``executorch.extension.llm.custom_ops`` (the apps link the same kernels).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mobilemllm.errors import BackendUnavailable, ConfigError, UserError
from mobilemllm import bundle as B
from mobilemllm.export import manifest_sections as S
from mobilemllm.export import parity as P

BACKENDS = ("xnnpack", "coreml", "qnn", "portable")
from mobilemllm.bundle.layout import PROGRAM_NAME  # noqa: E402,F401  (re-exported for export code)
METHODS = ("vision_encoder", "token_embedding", "text_decoder")
REQUIRED_KERNELS = ["executorch/extension/llm/custom_ops (llama::custom_sdpa, llama::update_cache)",
                    "optimized/quantized kernels (quantized_decomposed, torchao dequantize)"]
PARITY_PROMPT = "What shape is in the image?"


# ---- preflight -----------------------------------------------------------------------------------
def preflight(recipe: dict[str, Any]) -> None:
    """Fail before any work when the recipe is wrong or its backend cannot be used here."""
    from mobilemllm import quantization as Q

    backend = recipe.get("backend", "xnnpack")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown ExecuTorch backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "qnn":
        from mobilemllm.export import qnn as QNN

        errors = QNN.check_recipe(recipe)
    else:
        errors = Q.check({**recipe, "format": "executorch"})
    if errors:
        raise ConfigError("; ".join(errors))
    if backend == "qnn":
        from mobilemllm.export import qnn as QNN

        root = os.environ.get("QNN_SDK_ROOT")
        problem = QNN.sdk_problem(root)
        if problem:
            raise BackendUnavailable(
                "the android-qnn target needs Qualcomm's QNN SDK (AI Engine Direct) to lower and run; "
                + (problem if root else "QNN_SDK_ROOT is not set")
                + ". Install the SDK from https://www.qualcomm.com/developer/software/qualcomm-ai-engine-direct-sdk, "
                "export QNN_SDK_ROOT=/path/to/qairt/<version>, and build ExecuTorch's QNN backend "
                "(backends/qualcomm/scripts/build.sh); or use --target android (XNNPACK)")
        try:
            import executorch.backends.qualcomm.partition.qnn_partitioner  # noqa: F401
        except Exception as e:  # the python package ships without its compiled QNN bindings
            raise BackendUnavailable(f"QNN_SDK_ROOT is set but ExecuTorch's QNN backend cannot load ({e}); build "
                                     "ExecuTorch with -DEXECUTORCH_BUILD_QNN=ON against that SDK") from None
    if backend == "coreml":
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the ios-coreml target needs coremltools: pip install coremltools==9.0") from None


# ---- the modules ------------------------------------------------------------------------------------
def context_lengths(model, recipe: dict[str, Any]) -> tuple[int, int]:
    ctx_model = model.config.llm.max_position_embeddings
    ctx = int(recipe.get("max_context_len") or ctx_model)
    if ctx > ctx_model:
        raise ConfigError(f"max_context_len {ctx} is larger than the model's context {ctx_model}")
    seq = int(recipe.get("max_seq_len") or ctx)
    if seq > ctx:
        raise ConfigError(f"max_seq_len {seq} is larger than max_context_len {ctx}")
    if recipe.get("backend") == "qnn" and not recipe.get("max_seq_len"):
        from mobilemllm.export.qnn import default_prefill_len

        seq = default_prefill_len(model.config.num_visual_tokens, ctx)  # every QNN call computes seq rows
    if recipe.get("backend") == "coreml" and seq >= ctx:
        seq = ctx - 1  # coremltools needs the prefill length's upper bound below the cache size
    if model.config.num_visual_tokens + 2 > seq:
        raise ConfigError(f"max_seq_len {seq} cannot hold the image's {model.config.num_visual_tokens} visual tokens")
    return ctx, seq


def build_modules(model, max_context_len: int, kv_cache: str = "fp32", backend: str = "xnnpack",
                  max_seq_len: int | None = None):
    """(vision_encoder, token_embedding, text_decoder) modules sharing ``model``'s weights.

    For Core ML the decoder is ``CoreMLRunnerDecoder`` (same signature, no custom ops, the start position
    kept a tensor, fp16 cache buffers that become Core ML states); for QNN ``QnnRunnerDecoder`` (the same
    without a SymInt past the input padding: a static core of ``max_seq_len`` rows, fp32 cache buffers);
    everywhere else ``ExportLlama``."""
    from mobilemllm.export.export_llama import ExportLlama
    from mobilemllm.export.modules import TokenEmbedding, VisionEncoder

    if backend == "coreml":
        from mobilemllm.export.coreml_decoder import CoreMLRunnerDecoder

        decoder = CoreMLRunnerDecoder(model.llm, model.config.llm, max_context_len)
    elif backend == "qnn":
        from mobilemllm.export.qnn import build_decoder, default_prefill_len

        decoder = build_decoder(model, max_context_len, max_seq_len or default_prefill_len(
            model.config.num_visual_tokens, max_context_len))
    else:
        decoder = ExportLlama(model.llm, model.config.llm, max_context_len, kv_cache=kv_cache)
    return (VisionEncoder(model).eval(), TokenEmbedding(model.llm.get_input_embeddings()).eval(), decoder.eval())


def _example_image(cfg) -> torch.Tensor:
    v = cfg.vision
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (1, 3, v.num_views * v.image_size, v.image_size), dtype=torch.uint8, generator=g)


def export_programs(model, modules, max_seq_len: int) -> dict[str, Any]:
    """Strict ``torch.export`` of each method (decoder: export, RemoveRedundantTransposes, export again)."""
    from torch.export import Dim, export

    from executorch.extension.llm.export.export_passes import RemoveRedundantTransposes

    vision, embed, decoder = modules
    hidden = model.config.llm.hidden_size
    tok_dim = Dim("tokens", min=1, max=max_seq_len)
    seq_dim = Dim("seq", min=1, max=max_seq_len)
    with torch.no_grad():
        # transformers' vision models use context managers dynamo cannot trace; the encoder has no state,
        # so non-strict export is exact here (only the stateful decoder needs strict export).
        ep_v = export(vision, (_example_image(model.config),), strict=False)
        ep_t = export(embed, (torch.zeros(1, 4, dtype=torch.long),), dynamic_shapes=({1: tok_dim},), strict=True)
        dec_in = (torch.zeros(1, 4, hidden), torch.tensor([0], dtype=torch.long))
        dec_shapes = ({1: seq_dim}, None)
        ep_d = export(decoder, dec_in, dynamic_shapes=dec_shapes, strict=True)
        gm = ep_d.module()
        RemoveRedundantTransposes()(gm)
        ep_d = export(gm, dec_in, dynamic_shapes=dec_shapes, strict=True)
    return {"vision_encoder": ep_v, "token_embedding": ep_t, "text_decoder": ep_d}


def constant_methods(model, tokenizer, max_context_len: int, max_seq_len: int) -> dict[str, Any]:
    from mobilemllm.data.tokenizer import eos_ids

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


def _partitioners(backend: str, recipe: dict[str, Any]) -> dict[str, list] | None:
    if backend == "portable":
        return None
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # One partitioner per method: fewer, larger partitions and a faster export than the
        # dynamic-quant-first two-partitioner setup, at the same speed.
        return {name: [XnnpackPartitioner()] for name in METHODS}
    if backend == "coreml":
        import coremltools as ct

        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.compiler.coreml_preprocess import MULTIMETHOD_WEIGHT_SHARING_STRATEGY
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
            compute_unit=ct.ComputeUnit.ALL)
        specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # The vision tower goes to Core ML (GPU/ANE, fp16); Core ML takes no uint8 inputs, so the image's
        # uint8 -> float cast stays on the CPU kernels. The decoder (CoreMLRunnerDecoder: no custom ops, the
        # start position a tensor, since Core ML partitions cannot take a SymInt) goes to Core ML whole, its
        # KV-cache buffers taken over as Core ML states. The token embedding (a 4-bit lookup) stays on the CPU.
        return {"vision_encoder": [CoreMLPartitioner(
                    compile_specs=specs, skip_ops_for_coreml_delegation=[
                        "aten._to_copy.default", "dim_order_ops._to_dim_order_copy.default"])],
                "token_embedding": [XnnpackPartitioner()],
                "text_decoder": [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)]}
    if backend == "qnn":  # QnnPartitioner for vision and decoder, XNNPACK for the token embedding
        from mobilemllm.export.qnn import qnn_partitioners

        return qnn_partitioners(recipe)
    raise ConfigError(f"unknown backend {backend!r}")


def lower(programs: dict[str, Any], constants: dict[str, Any], backend: str, recipe: dict[str, Any]):
    """Edge dialect + delegate + ExecuTorch program (an ExecutorchProgramManager)."""
    if backend == "qnn":  # QNN's own passes and a live QnnManager (needs the SDK): mobilemllm.export.qnn
        from mobilemllm.export.qnn import lower_qnn

        return lower_qnn(programs, constants, recipe)
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(programs, partitioner=_partitioners(backend, recipe),
                                       constant_methods=constants,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass

    # Linears left outside a delegate run as the optimized linear kernel, not transpose + mm.
    edge = edge.transform([ConvertToLinearPass()])
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # fuses torchao dequantize + embedding into quantized_decomposed.embedding_{2,4}bit/byte kernels
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in METHODS},
    ))


def delegation_summary(et_program) -> dict[str, dict[str, int]]:
    """Per method: how many delegate calls and how many non-delegated operator calls the program has."""
    out = {}
    for plan in et_program._emitter_output.program.execution_plan:
        if plan.name not in METHODS:
            continue
        delegates = len(plan.delegates)
        ops = sum(1 for c in plan.chains for i in c.instructions
                  if type(i.instr_args).__name__ == "KernelCall")
        out[plan.name] = {"delegate_calls": delegates, "kernel_calls": ops,
                          "backends": sorted({d.id for d in plan.delegates}),
                          "operators": sorted({op.name for op in plan.operators})}
    return out


# ---- parity ---------------------------------------------------------------------------------------
def load_program(path: str | Path):
    """An ExecuTorch Program (Python bindings), with the llm custom ops registered."""
    from executorch.runtime import Runtime

    from mobilemllm.runtime.executorch_runner import load_kernels

    load_kernels()

    return Runtime.get().load_program(str(path))


def _parity_image(cfg):
    """A fixed image for parity checks: coloured shapes on a grey background."""
    from PIL import Image, ImageDraw

    s = max(cfg.vision.image_size, 32)
    img = Image.new("RGB", (s, s), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle([s // 8, s // 8, s // 2, s // 2], fill=(220, 40, 40))
    d.ellipse([s // 2, s // 2, 7 * s // 8, 7 * s // 8], fill=(40, 40, 220))
    return img


def check_parity(model, tokenizer, pte: Path, staging: Path, manifest: dict[str, Any], recipe: dict[str, Any],
                 fp32: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the .pte (ExecuTorch runtime, then MultimodalRunner) against the eager float model."""
    from mobilemllm.data.images import normalize, to_uint8_views
    from mobilemllm.inference import prompt_ids
    from mobilemllm.bundle.layout import IMAGE_TOKEN_ID

    cfg = model.config
    par = recipe.get("parity") or {}
    img = _parity_image(cfg)
    views = torch.from_numpy(to_uint8_views(img, cfg.vision))
    pix = normalize(views, cfg.vision)
    ids = prompt_ids(cfg, tokenizer, PARITY_PROMPT)
    # as many greedy steps as asked for, within the exported context
    n_greedy = max(1, min(int(par.get("greedy_tokens", 32)), manifest["context"]["max_context_len"] - len(ids)))
    program = load_program(pte)
    m_vis, m_tok, m_dec = (program.load_method(n) for n in METHODS)

    with torch.inference_mode():
        # eager reference: the float model, full-sequence forward (no cache)
        ids_t = torch.tensor([ids])
        emb_ref = model.embed(ids_t, pix.unsqueeze(0))
        img_ref = model.encode_images(pix.unsqueeze(0))
        # the program, piece by piece as the runner calls it
        img_pte = m_vis.execute([views.reshape(1, 3, -1, cfg.vision.image_size).contiguous()])[0]
        first = ids.index(IMAGE_TOKEN_ID)
        last = len(ids) - ids[::-1].index(IMAGE_TOKEN_ID)
        pre = m_tok.execute([torch.tensor([ids[:first]])])[0]
        post = m_tok.execute([torch.tensor([ids[last:]])])[0]
        emb_pte = torch.cat([pre, img_pte, post], dim=1)
        # greedy decoding, EOS ignored, so every run compares n_greedy tokens
        ref_logits, ref_tokens = [], []
        seq = emb_ref
        for _ in range(n_greedy):
            logits = model.llm(inputs_embeds=seq).logits[:, -1].float()
            ref_logits.append(logits)
            ref_tokens.append(int(logits.argmax()))
            seq = torch.cat([seq, model.llm.get_input_embeddings()(torch.tensor([[ref_tokens[-1]]]))], 1)
        pte_logits, pte_tokens = [], []
        pos = 0
        chunk = emb_pte
        for _ in range(n_greedy):
            logits = m_dec.execute([chunk.contiguous(), torch.tensor([pos], dtype=torch.long)])[0].float()
            pos += chunk.shape[1]
            pte_logits.append(logits)
            pte_tokens.append(int(logits.argmax()))
            chunk = m_tok.execute([torch.tensor([[pte_tokens[-1]]])])[0]
        # teacher-forced logits on the reference tokens: a fair logit comparison even after divergence
        tf_logits = [pte_logits[0]]
        m_dec2 = program.load_method("text_decoder")  # a fresh cache
        m_dec2.execute([emb_pte.contiguous(), torch.tensor([0], dtype=torch.long)])
        pos = emb_pte.shape[1]
        for t in ref_tokens[:-1]:
            e = m_tok.execute([torch.tensor([[t]])])[0]
            tf_logits.append(m_dec2.execute([e.contiguous(), torch.tensor([pos], dtype=torch.long)])[0].float())
            pos += 1

    ref_l, tf_l = torch.cat(ref_logits), torch.cat(tf_logits)
    rel = P.max_rel_diff(tf_l, ref_l)
    cos = P.logit_cosine(tf_l, ref_l)
    agree = P.greedy_agreement(pte_tokens, ref_tokens)
    tol = float(par.get("max_rel_diff", 1e-4))
    min_cos = float(par.get("min_logit_cosine", 0.9))
    checks = [
        P.check("image_embedding_max_rel_diff", P.max_rel_diff(img_pte, img_ref), tol if fp32 else None,
                (P.max_rel_diff(img_pte, img_ref) <= tol) if fp32 else None),
        P.check("prompt_embedding_max_rel_diff", P.max_rel_diff(emb_pte, emb_ref), tol if fp32 else None,
                (P.max_rel_diff(emb_pte, emb_ref) <= tol) if fp32 else None),
        P.check("logits_max_rel_diff", rel, tol if fp32 else None, (rel <= tol) if fp32 else None),
        P.check("logit_cosine", cos, None if fp32 else min_cos, None if fp32 else cos >= min_cos),
        P.check(f"greedy_agreement_{n_greedy}", agree, 1.0 if fp32 else None, (agree == 1.0) if fp32 else None),
    ]
    # the C++ MultimodalRunner (what the apps drive): same prompt, same image, greedy, vs eager generate
    from mobilemllm.runtime.executorch_runner import run_program

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eager = model.generate(torch.tensor([ids]), pix.unsqueeze(0), max_new_tokens=n_greedy, eos_ids=eos)
    eager_text = tokenizer.decode(eager, skip_special_tokens=True)
    res = run_program(pte, staging / B.TOKENIZER_DIR, manifest, views, PARITY_PROMPT,
                      max_new_tokens=n_greedy, temperature=0.0)
    same = res.text == eager_text
    checks.append(P.check("runner_text_matches_eager", same, True if fp32 else None, same if fp32 else None))
    checks.append(P.check("runner_prompt_tokens", res.prompt_tokens, len(ids), res.prompt_tokens == len(ids)))
    same_ids = cpp_tokenizer_matches(staging / B.TOKENIZER_DIR, tokenizer, manifest["prompt"])
    checks.append(P.check("cpp_tokenizer_matches", same_ids, True, same_ids))
    log(f"parity: logits max rel diff {rel:.2e}, cosine {cos:.6f}, greedy agreement {agree:.3f} "
        f"({n_greedy} tokens), runner text {'==' if same else '!='} eager")
    return {"checks": checks, "runner_tokens_per_s": res.decode_tokens_per_s}


def cpp_tokenizer_matches(tokenizer_dir: Path, tokenizer, prompt: dict[str, Any]) -> bool:
    """ExecuTorch's C++ tokenizer (what the apps' runner encodes text with) gives our ids for every segment."""
    from pytorch_tokenizers import CppHFTokenizer

    cpp = CppHFTokenizer()
    cpp.load(str(tokenizer_dir / "tokenizer.json"))
    for seg in B.fill_prompt(prompt, PARITY_PROMPT):
        if seg["type"] == "text" and list(cpp.encode(seg["text"], 0, 0)) != tokenizer.encode(
                seg["text"], add_special_tokens=False):
            return False
    return True


# ---- the whole export ----------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1e6


def export_executorch(model, tokenizer, recipe: dict[str, Any], out_dir: str | Path, *, source: str | None = None,
                      force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Quantize + export + lower ``model`` by ``recipe``, check parity, and write the bundle at ``out_dir``."""
    from mobilemllm.export.quantize import quantize_embeddings, quantize_linears

    t0 = time.perf_counter()
    preflight(recipe)
    if tokenizer is None:
        raise UserError("the model has no tokenizer; export a checkpoint folder that contains tokenizer.json")
    backend = recipe.get("backend", "xnnpack")
    quant = recipe.get("quantization") or {}
    B.check_out_dir(out_dir)
    ctx, seq = context_lengths(model, recipe)
    model = model.float().eval()

    kv_cache = recipe.get("kv_cache") or "fp32"
    log(f"building {', '.join(METHODS)} ({backend}, context {ctx}, prefill up to {seq} tokens, "
        f"{kv_cache} KV cache)")
    modules = build_modules(model, ctx, kv_cache, backend, seq)
    vision, embed, decoder = modules
    if backend == "qnn":  # PT2E with QnnQuantizer, calibrated (mobilemllm.export.qnn)
        from mobilemllm.export.qnn import quantize_modules

        modules, qinfo = quantize_modules(model, tokenizer, modules, recipe, seq, log)
    else:
        qinfo = {
            "vision_encoder": quantize_linears(vision, **_qargs(quant.get("vision_encoder"))),
            "token_embedding": quantize_embeddings(embed, **_qargs(quant.get("token_embedding"))),
            "text_decoder": quantize_linears(decoder, **_qargs(quant.get("text_decoder"))),
        }
        for part, info in qinfo.items():
            info["backend"] = backend
    # an int8 KV cache rounds keys, values and queries: checked like a quantized bundle, not to 1e-4
    fp32 = all(q["scheme"] == "fp32" for q in qinfo.values()) and kv_cache == "fp32"
    log("quantization: " + ", ".join(f"{k} {v['scheme']}" + (f"/g{v['group_size']}" if v.get("group_size") else "")
                                     for k, v in qinfo.items()))
    t_exp = time.perf_counter()
    programs = export_programs(model, modules, seq)
    log(f"torch.export done in {time.perf_counter() - t_exp:.1f} s; lowering to {backend}")
    constants = constant_methods(model, tokenizer, ctx, seq)
    t_low = time.perf_counter()
    et_program = lower(programs, constants, backend, recipe)
    del programs
    summary = delegation_summary(et_program)
    log(f"lowered in {time.perf_counter() - t_low:.1f} s: " + ", ".join(
        f"{k} {v['delegate_calls']} delegate call(s) + {v['kernel_calls']} kernel call(s)" for k, v in summary.items()))

    staging = B.new_bundle_dir(out_dir)
    try:
        pte = staging / PROGRAM_NAME
        with open(pte, "wb") as f:
            et_program.write_to_file(f)
        del et_program
        tokenizer.save_pretrained(staging / B.TOKENIZER_DIR)
        manifest = _manifest(model, tokenizer, recipe, qinfo, summary, constants, source)
        can_run = backend in ("xnnpack", "portable")
        if can_run:
            res = check_parity(model, tokenizer, pte, staging, manifest, recipe, fp32, log)
            parity = P.summarize(res["checks"], forced=force)
        else:
            why = ("Core ML programs run only on Apple hardware (macOS/iOS): numerical parity checks need macOS"
                   if backend == "coreml" else f"the {backend} backend cannot run on this machine")
            log(f"note: {why}; the program's structure was checked, its numbers were not")
            parity = P.summarize([], skipped_reason=why)
        manifest["parity"] = parity
        if not parity["passed"]:
            msg = "parity failed: " + "; ".join(P.failures(parity))
            if not force:
                raise UserError(msg + ". Nothing was written; re-run with --force to write the bundle anyway "
                                "(it is marked as failing parity in its manifest)")
            log("warning: " + msg + " (written anyway because of --force)")
        manifest["export"]["seconds"] = round(time.perf_counter() - t0, 2)
        manifest["export"]["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        out = B.finish_bundle(staging, out_dir, manifest, roles={PROGRAM_NAME: "program"})
    except BaseException:
        B.discard(staging)
        raise
    size = (out / PROGRAM_NAME).stat().st_size
    log(f"wrote {out} ({PROGRAM_NAME} {size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s, "
        f"peak RSS {_peak_rss_mb() / 1024:.2f} GB")
    return out


def _qargs(spec: dict[str, Any] | None) -> dict[str, Any]:
    spec = dict(spec or {})
    return {"scheme": spec.get("scheme", "fp32"), "group_size": spec.get("group_size", 32)}


def _manifest(model, tokenizer, recipe, qinfo, summary, constants, source) -> dict[str, Any]:
    cfg = model.config
    hidden, vocab = cfg.llm.hidden_size, cfg.llm.vocab_size
    s, views = cfg.vision.image_size, cfg.vision.num_views
    nvt = cfg.num_visual_tokens
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
    for name, value in constants.items():
        methods[name] = {"value": value}
    return {
        "schema_version": B.SCHEMA_VERSION,
        "format": "executorch",
        "target": recipe.get("name", "custom"),
        "model": S.model_section(model, source),
        "files": {PROGRAM_NAME: {"size": 0, "sha256": "0" * 64}},  # filled in by finish_bundle
        "methods": methods,
        "tokenizer": S.tokenizer_section(tokenizer, vocab),
        "prompt": S.prompt_section(cfg, tokenizer),
        "preprocessing": {**S.preprocessing_section(cfg.vision, "uint8", True),
                          # the runner passes one image: views (tiles, then the global view) stacked top to bottom
                          "input_shape": [1, 3, views * s, s], "views_stacked": "vertical"},
        "context": {"max_seq_len": constants["get_max_seq_len"], "max_context_len": constants["get_max_context_len"],
                    "kv_cache": recipe.get("kv_cache") or "fp32"},
        "quantization": qinfo,
        "parity": P.summarize([]),
        "export": {"recipe": dict(recipe), "backend": recipe.get("backend", "xnnpack"), "versions": S.versions(),
                   "required_kernels": REQUIRED_KERNELS},
    }
