"""ExecuTorch's backends as plug-ins of the ExecuTorch format: what differs between ``xnnpack`` (android,
ios), ``portable`` (no delegate), ``coreml`` (ios-coreml) and ``qnn`` (android-qnn).

Each backend says what it needs installed, its prefill length, its ``text_decoder`` module, how it
quantizes the three methods, its partitioners and lowering, and whether its programs run here (parity).
Everything else -- the methods, ``torch.export``, the constant methods, the manifest, parity -- is the
format's (:mod:`mobilemllm.export.executorch`), the same for every backend.
"""

from __future__ import annotations

import os
from typing import Any

from mobilemllm.errors import BackendUnavailable
from mobilemllm.export.coreml_decoder import CoreMLRunnerDecoder
from mobilemllm.export.export_llama import ExportLlama
from mobilemllm.export.qnn import (build_decoder, check_backend, default_prefill_len, lower_qnn, qnn_partitioners,
                                   quantize_modules, sdk_problem)
from mobilemllm.export.quantize import quantize_embeddings, quantize_linears

METHODS = ("vision_encoder", "token_embedding", "text_decoder")


class Backend:
    """XNNPACK's behaviour is the default; the others override what differs."""

    name = ""
    skip_reason: str | None = None  # why its programs cannot run here (parity is then recorded as skipped)

    def check(self, recipe: dict[str, Any]) -> list[str]:
        """Problems with the backend's own recipe keys (the quantization is the registry's)."""
        return []

    def require(self, recipe: dict[str, Any]) -> None:
        """BackendUnavailable when lowering for this backend cannot work here."""

    def prefill_len(self, num_visual_tokens: int, ctx: int, seq: int, explicit: bool) -> int:
        """The most tokens one ``text_decoder`` call takes (``explicit``: the recipe set it)."""
        return seq

    def decoder(self, model, ctx: int, seq: int, kv_cache: str):
        return ExportLlama(model.llm, model.config.llm, ctx, kv_cache=kv_cache)

    def quantize(self, job, modules: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """torchao quantization of every method, as the recipe's plan says; (modules, manifest info)."""
        plan = job.plan
        qinfo = {part: (quantize_embeddings if part == "token_embedding" else quantize_linears)(
            modules[part], plan.scheme(part), plan.group_size(part)) for part in METHODS}
        for info in qinfo.values():
            info["backend"] = self.name
        return modules, qinfo

    def partitioners(self, recipe: dict[str, Any]) -> dict[str, list] | None:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # One partitioner per method: fewer, larger partitions and a faster export than the
        # dynamic-quant-first two-partitioner setup, at the same speed.
        return {name: [XnnpackPartitioner()] for name in METHODS}

    def lower(self, programs: dict[str, Any], constants: dict[str, Any], recipe: dict[str, Any]):
        return lower_program(programs, constants, self.partitioners(recipe))


class Xnnpack(Backend):
    name = "xnnpack"


class Portable(Backend):
    name = "portable"

    def partitioners(self, recipe: dict[str, Any]) -> None:
        return None  # no delegate: portable kernels + the llm custom ops


class CoreMLDelegate(Backend):
    """The vision tower and the whole decoder in Core ML (fp16, iOS 18), the token embedding on the CPU."""

    name = "coreml"
    skip_reason = "Core ML programs run only on Apple hardware (macOS/iOS): numerical parity checks need macOS"

    def require(self, recipe: dict[str, Any]) -> None:
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the ios-coreml target needs coremltools: pip install coremltools==9.0") from None

    def prefill_len(self, num_visual_tokens: int, ctx: int, seq: int, explicit: bool) -> int:
        return min(seq, ctx - 1)  # coremltools needs the prefill length's upper bound below the cache size

    def decoder(self, model, ctx: int, seq: int, kv_cache: str):
        """No custom ops, the start position kept a tensor, fp16 cache buffers that become Core ML states."""
        return CoreMLRunnerDecoder(model.llm, model.config.llm, ctx)

    def partitioners(self, recipe: dict[str, Any]) -> dict[str, list]:
        import coremltools as ct

        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.compiler.coreml_preprocess import MULTIMETHOD_WEIGHT_SHARING_STRATEGY
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
            compute_unit=ct.ComputeUnit.ALL)
        specs.append(CoreMLBackend.generate_multimethod_weight_sharing_strategy_compile_spec(
            MULTIMETHOD_WEIGHT_SHARING_STRATEGY.DISABLED))
        # The vision tower goes to Core ML (GPU/ANE, fp16); Core ML takes no uint8 inputs, so the image's
        # uint8 -> float cast stays on the CPU kernels. The decoder (CoreMLRunnerDecoder: no custom ops, the
        # start position a tensor, since Core ML partitions cannot take a SymInt) goes to Core ML whole, its
        # KV-cache buffers taken over as Core ML states. The token embedding (a 4-bit lookup) stays on the CPU.
        return {"vision_encoder": [CoreMLPartitioner(
                    compile_specs=specs, skip_ops_for_coreml_delegation=[
                        "aten._to_copy.default", "dim_order_ops._to_dim_order_copy.default"])],
                "token_embedding": [XnnpackPartitioner()],
                "text_decoder": [CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=True)]}


class Qnn(Backend):
    """Qualcomm's HTP: PT2E-quantized static-shape graphs (:mod:`mobilemllm.export.qnn`); lowering needs the
    QNN SDK, running a Snapdragon phone."""

    name = "qnn"
    skip_reason = "the qnn backend cannot run on this machine"

    def check(self, recipe: dict[str, Any]) -> list[str]:
        return check_backend(recipe)

    def require(self, recipe: dict[str, Any]) -> None:
        root = os.environ.get("QNN_SDK_ROOT")
        problem = sdk_problem(root)
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

    def prefill_len(self, num_visual_tokens: int, ctx: int, seq: int, explicit: bool) -> int:
        # every QNN call computes seq rows: a small default
        return seq if explicit else default_prefill_len(num_visual_tokens, ctx)

    def decoder(self, model, ctx: int, seq: int, kv_cache: str):
        return build_decoder(model, ctx, seq)

    def quantize(self, job, modules: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """PT2E with QnnQuantizer, calibrated, for vision and decoder; torchao for the CPU token embedding."""
        return quantize_modules(job.model, job.tokenizer, modules, job.recipe, job.plan, job.state["seq"], job.log)

    def partitioners(self, recipe: dict[str, Any]) -> dict[str, list]:
        return qnn_partitioners(recipe)

    def lower(self, programs: dict[str, Any], constants: dict[str, Any], recipe: dict[str, Any]):
        """QNN's own passes and a live QnnManager (needs the SDK)."""
        return lower_qnn(programs, constants, recipe)


BACKENDS: dict[str, Backend] = {b.name: b for b in (Xnnpack(), CoreMLDelegate(), Qnn(), Portable())}


def lower_program(programs: dict[str, Any], constants: dict[str, Any], partitioners: dict[str, list] | None):
    """Edge dialect + delegates + ExecuTorch program (an ExecutorchProgramManager)."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    edge = to_edge_transform_and_lower(programs, partitioner=partitioners, constant_methods=constants,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    if partitioners:
        # Linears left outside a delegate run as the optimized linear kernel, not transpose + mm. Not on a
        # graph without delegates (the portable target): there XNNPACK's pass rewrote a SigLIP tower's
        # linears wrongly (15 % off eager with mlp2x_gelu), and portable is the reference target.
        edge = edge.transform([ConvertToLinearPass()])
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # fuses torchao dequantize + embedding into quantized_decomposed.embedding_{2,4}bit/byte kernels
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in METHODS},
    ))
