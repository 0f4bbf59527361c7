"""The ``android-qnn`` target: ExecuTorch's Qualcomm QNN delegate (Hexagon HTP NPU), following the
Qualcomm flow of executorch 1.5.1 (``backends/qualcomm``): PT2E quantization with ``QnnQuantizer``,
calibrated on real inputs, ``convert_pt2e``; then per-method HTP compile specs for a SoC and
``QnnPartitioner`` inside a ``QnnManagerContext``.

**What runs without the QNN SDK, and what does not.** Quantization (``quantize_for_qnn``), the SoC /
compile-spec building (``compile_specs``, ``qnn_partitioners``) and the static-shape decoder run on any
machine, and are tested here. Lowering does not: ``QnnPartitioner`` asks a ``QnnManager`` whether each
node is supported, and the manager ``dlopen``s ``$QNN_SDK_ROOT/lib/x86_64-linux-clang/libQnnHtp.so`` when
it starts (measured with executorch 1.5.1 and no SDK: ``QnnManagerContext`` raises "Failed to initialize
QNN backend"; ``lower_qnn`` turns that into ``BackendUnavailable``). Running the program needs a Snapdragon
phone. So: lowering and running need the QNN SDK; tested here: quantization, specs, preflight.

**SDK environment.** ExecuTorch's ``setup_qnn_sdk()`` downloads the SDK when ``QNN_SDK_ROOT`` is unset,
and with ``QNN_SDK_ROOT`` pointing at a folder without the libraries one of the quantizer's passes
(``RecomposeHadamard`` asks the SDK for its version) aborts the whole process (SIGABRT, measured). An
empty ``QNN_SDK_ROOT`` means "the caller takes care of the SDK" to both, so quantization runs under
:func:`sdk_env_for_quantization`, which sets it empty for the call unless a real SDK is there.

**The decoder.** HTP graphs have static shapes and no ``llama::`` custom ops. ``QnnStaticDecoder`` is the
static core: ``P`` rows (the prefill length, ``max_seq_len``) every call, the start position a tensor, the
KV cache written through a one-hot matmul and read whole under a mask (the layers of
:class:`mobilemllm.export.coreml_decoder.CoreMLRunnerDecoder`, sharing the model's weights), and the
last *valid* row's logits picked by a one-hot product. ExecuTorch 1.5.1's ``MultimodalRunner`` ignores
``enable_dynamic_shape`` for multimodal prefill: ``MultimodalPrefiller`` sends each prompt segment (text
before the image, the image's visual tokens, the text after it) to ``text_decoder`` in one call of that
segment's length, and decoding sends one token. A decoder of one fixed length would break that contract,
so ``QnnRunnerDecoder`` (the ``text_decoder`` method) takes ``(1, T, D)`` with ``1 <= T <= P``, pads to
``P`` rows in the graph and hands a ``valid`` row mask to the static core: only the pad and the mask see
``T`` (they stay on the CPU), everything QNN takes is static. The program's ``enable_dynamic_shape`` is
therefore true (the method does accept any ``T <= max_seq_len``; a text-only ``TextLLMRunner`` would
prefill in chunks of ``max_seq_len``). The price of static shapes: every call, decode included,
computes ``P`` rows and attends over the whole cache, so the default ``P`` is small (the visual tokens
rounded up to 32, at least 64; recipe key ``max_seq_len``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from mobilemllm import quantization as Q
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.images import normalize, to_uint8_views
from mobilemllm.errors import BackendUnavailable, ConfigError
from mobilemllm.export.coreml_decoder import CoreMLDecoder
from mobilemllm.export.quantize import quantize_embeddings
from mobilemllm.inference import prompt_ids

HTP_LIBRARY = "lib/x86_64-linux-clang/libQnnHtp.so"
DEFAULT_SOC = "SM8650"  # Snapdragon 8 Gen 3 (HTP v75)
# The schemes (16a4w, 8a8w, ..., fp16: no quantization, the HTP's fp16 precision) are the registry's
# ``qnn`` quantizer (mobilemllm.quantization); ``impl`` names QnnQuantizer's QuantDtype.
QNN_PARTS = ("text_decoder", "vision_encoder")  # the token embedding stays on the CPU (dynamic length)


def _quant_dtype(scheme: str) -> str | None:
    """QnnQuantizer's QuantDtype attribute for a QNN scheme (None: fp16, no quantization)."""
    return Q.scheme("qnn", scheme).impl
MASK_MIN = -255.0  # additive mask: exp(-255) is 0 in fp32, and a 16-bit activation range stays fine-grained


# ---- recipe, SoC, compile specs -------------------------------------------------------------------
def htp_socs() -> list[str]:
    """SoC names ExecuTorch 1.5.1 knows and that have an HTP (Hexagon NPU)."""
    from executorch.backends.qualcomm.utils.utils import get_soc_to_chipset_map, get_soc_to_htp_arch_map

    return sorted(set(get_soc_to_chipset_map()) & set(get_soc_to_htp_arch_map()))


def soc_chipset(name: str | None):
    """The ``QcomChipset`` for a recipe's ``soc_model`` (default ``SM8650``); unknown -> one-line ConfigError."""
    from executorch.backends.qualcomm.utils.utils import get_soc_to_chipset_map

    name = str(name or DEFAULT_SOC).upper()
    valid = htp_socs()
    if name not in valid:
        raise ConfigError(f"unknown QNN soc_model {name!r}; valid: {', '.join(valid)}")
    return get_soc_to_chipset_map()[name]


def part_schemes(recipe: dict[str, Any]) -> dict[str, str]:
    """{text_decoder, vision_encoder: QNN scheme} from the recipe (defaults 16a4w / 8a8w); bad -> ConfigError."""
    plan = Q.resolve({**recipe, "format": "executorch", "backend": "qnn"})
    return {part: plan.scheme(part) for part in QNN_PARTS}


def check_backend(recipe: dict[str, Any]) -> list[str]:
    """Problems with a ``backend: qnn`` recipe's own keys (empty list: fine): its SoC and calibration."""
    errors = []
    try:
        soc_chipset(recipe.get("soc_model"))
    except ConfigError as e:
        errors.append(str(e))
    calib = recipe.get("calibration_steps")
    if calib is not None and (not isinstance(calib, int) or calib < 0):
        errors.append(f"calibration_steps must be a non-negative integer, got {calib!r}")
    return errors


def compile_specs(recipe: dict[str, Any], fp16: bool = False) -> list:
    """HTP compile specs (ExecuTorch ``CompileSpec`` list) for the recipe's ``soc_model``: quantized precision,
    or fp16 for an unquantized method. Pure Python: needs no SDK."""
    from executorch.backends.qualcomm.utils.utils import (generate_htp_compiler_spec,
                                                          generate_qnn_executorch_compiler_spec)

    return generate_qnn_executorch_compiler_spec(soc_model=soc_chipset(recipe.get("soc_model")),
                                                 backend_options=generate_htp_compiler_spec(use_fp16=fp16))


def method_compile_specs(recipe: dict[str, Any]) -> dict[str, list]:
    """{vision_encoder, text_decoder: compile specs}, fp16 precision where the part's scheme is fp16."""
    schemes = part_schemes(recipe)
    return {"vision_encoder": compile_specs(recipe, schemes["vision_encoder"] == "fp16"),
            "text_decoder": compile_specs(recipe, schemes["text_decoder"] == "fp16")}


def qnn_partitioners(recipe: dict[str, Any]) -> dict[str, list]:
    """One ``QnnPartitioner`` for the vision encoder and one for the decoder; the token embedding (a
    dynamic-length 4-bit lookup) goes to XNNPACK on the CPU. Building them needs no SDK; partitioning does."""
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    specs = method_compile_specs(recipe)
    return {"vision_encoder": [QnnPartitioner(specs["vision_encoder"])],
            "token_embedding": [XnnpackPartitioner()],
            "text_decoder": [QnnPartitioner(specs["text_decoder"])]}


def sdk_problem(root: str | None) -> str | None:
    """Why ``root`` (a QNN_SDK_ROOT value) is not a usable SDK for lowering, or None."""
    if not root:
        return "QNN_SDK_ROOT is not set"
    if not Path(root).is_dir():
        return f"QNN_SDK_ROOT is {root!r}, which does not exist"
    if not (Path(root) / HTP_LIBRARY).is_file():
        return f"QNN_SDK_ROOT {root!r} has no {HTP_LIBRARY} (the HTP backend library that lowering loads)"
    return None


@contextlib.contextmanager
def sdk_env_for_quantization():
    """Keep ExecuTorch's QNN code from downloading an SDK or aborting on a folder without one.

    Unless QNN_SDK_ROOT holds the HTP library, it is set to "" for the duration (restored after):
    ``setup_qnn_sdk`` then leaves the SDK to the caller and the SDK-version lookups are skipped."""
    before = os.environ.get("QNN_SDK_ROOT")
    usable = before is not None and sdk_problem(before) is None
    if not usable:
        os.environ["QNN_SDK_ROOT"] = ""
    try:
        yield
    finally:
        if not usable:
            if before is None:
                os.environ.pop("QNN_SDK_ROOT", None)
            else:
                os.environ["QNN_SDK_ROOT"] = before


# ---- PT2E quantization ----------------------------------------------------------------------------
def make_quantizer(dtype: str, soc_model: str | None = None):
    """A ``QnnQuantizer`` for the HTP backend with per-channel linear/conv weights and min/max activation
    observers over all calibration inputs (QNN's default moving average keeps mostly the first input's
    range: the decoder's first call is a short text segment, and its logit cosine dropped to ~0.75)."""
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
    from torchao.quantization.pt2e import MinMaxObserver

    impl = Q.SCHEMES.get(("qnn", dtype))
    if impl is None or impl.impl is None:
        raise ConfigError(f"{dtype!r} is not a QNN quantization scheme; valid: "
                          f"{', '.join(n for n in Q.names('qnn') if _quant_dtype(n))}")
    with sdk_env_for_quantization():
        quantizer = QnnQuantizer(soc_model=soc_chipset(soc_model))
    quantizer.set_default_quant_config(getattr(QuantDtype, impl.impl), is_qat=False,
                                       is_conv_per_channel=True, is_linear_per_channel=True,
                                       act_observer=MinMaxObserver)
    return quantizer


def quantize_for_qnn(exported_or_module, example_inputs: tuple, calibration_inputs: Iterable[tuple],
                     dtype: str, soc_model: str | None = None) -> torch.fx.GraphModule:
    """PT2E quantization the way QNN takes it: export (if given a module), ``prepare_pt2e`` with a
    ``QnnQuantizer`` of ``dtype`` (``16a4w``, ``8a8w``, ...), one run per calibration input, in order,
    ``convert_pt2e``. Returns the converted GraphModule (quantize/dequantize pairs around every op).

    Buffers the graph mutates (a KV cache) are restored to their values from before calibration."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if isinstance(exported_or_module, torch.export.ExportedProgram):
        ep = exported_or_module
    else:
        with torch.no_grad():
            ep = torch.export.export(exported_or_module, tuple(example_inputs), strict=False)
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    initial = {name: ep.state_dict[name].clone() for name in mutated}
    quantizer = make_quantizer(dtype, soc_model)
    with sdk_env_for_quantization(), torch.no_grad():
        prepared = prepare_pt2e(ep.module(), quantizer)
        n = 0
        for inputs in calibration_inputs:
            prepared(*inputs)
            n += 1
        if n == 0:
            raise ConfigError("QNN quantization needs at least one calibration input")
        converted = convert_pt2e(prepared)
    if mutated:
        named = dict(converted.named_buffers())
        with torch.no_grad():
            for name, value in initial.items():
                key = name.replace(".", "_") if name not in named else name
                buf = named.get(key)
                if buf is None:
                    raise RuntimeError(f"mutated buffer {name} not found after convert_pt2e")
                buf.copy_(value)
    return converted


# ---- the static-shape decoder ---------------------------------------------------------------------
def default_prefill_len(num_visual_tokens: int, max_context_len: int) -> int:
    """P: the visual tokens rounded up to a multiple of 32, at least 64, at most the context."""
    return min(max_context_len, max(64, -(-num_visual_tokens // 32) * 32))


class QnnStaticDecoder(nn.Module):
    """The static core of the QNN ``text_decoder``: ``forward(x (1, P, D), start_pos (1,) int64, valid (P,))
    -> logits (1, V)`` where ``valid`` is 1 for the real rows (a prefix) and 0 for padding. Only valid rows
    are written to the fp32 KV cache (one-hot write over all ``max_context`` slots); attention reads the
    whole cache under a mask; the logits are those of the last valid row. Same weights as ``llm``."""

    def __init__(self, llm, llm_cfg, max_context: int, prefill_len: int):
        super().__init__()

        self.inner = CoreMLDecoder(llm, llm_cfg, max_context, cache_dtype=torch.float32)
        self.max_context, self.prefill_len = self.inner.max_context, int(prefill_len)
        if not 1 <= self.prefill_len <= self.max_context:
            raise ConfigError(f"QNN prefill length {prefill_len} must be between 1 and the context {max_context}")
        self.register_buffer("slots", torch.arange(self.max_context, dtype=torch.int64), persistent=False)
        self.register_buffer("rows", torch.arange(self.prefill_len, dtype=torch.int64), persistent=False)

    def reset_cache(self) -> None:
        self.inner.reset_cache()

    def forward(self, x: torch.Tensor, start_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        pos = start_pos.reshape(1) + self.rows  # (P,)
        freqs = pos.to(torch.float32).unsqueeze(1) * self.inner.inv_freq.unsqueeze(0)
        angles = torch.cat([freqs, freqs], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        future = (self.slots.unsqueeze(0) > pos.unsqueeze(1)).to(x.dtype)  # (P, C): 1 = not visible
        mask = (future * MASK_MIN).unsqueeze(0).unsqueeze(0)
        write = ((self.slots.unsqueeze(1) == pos.unsqueeze(0)).to(x.dtype) * valid.unsqueeze(0))
        write = write.unsqueeze(0).unsqueeze(0)  # (1, 1, C, P): row i of the input goes to slot pos_i if valid
        keep = 1.0 - write.sum(dim=-1, keepdim=True)
        for layer in self.inner.layers:
            x = layer.forward_at(x, cos, sin, mask, write, keep)
        # the last valid row, as a one-hot product (static shapes): valid[i] - valid[i + 1]
        nxt = torch.cat([valid[1:], torch.zeros_like(valid[:1])])
        last = (valid - nxt).unsqueeze(0)  # (1, P)
        h = torch.matmul(last, x[0])  # (1, D)
        return self.inner.lm_head(self.inner.norm(h))


class QnnRunnerDecoder(nn.Module):
    """The ``text_decoder`` method for ``android-qnn``: ``forward(embeds (1, T, D), start_pos (1,) int64) ->
    logits (1, V)``, ``1 <= T <= P``, the signature ExecuTorch's ``MultimodalRunner`` calls. Pads to ``P``
    rows and builds the valid-row mask (the only ops that see ``T``), then runs ``core`` (a
    :class:`QnnStaticDecoder` or its quantized GraphModule)."""

    def __init__(self, core: nn.Module, prefill_len: int):
        super().__init__()
        self.core, self.prefill_len = core, int(prefill_len)

    def forward(self, embeds: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        pad = self.prefill_len - n
        x = nn.functional.pad(embeds, (0, 0, 0, pad))
        valid = nn.functional.pad(torch.ones(n, dtype=embeds.dtype), (0, pad))
        return self.core(x, start_pos, valid)


def build_decoder(model, max_context_len: int, prefill_len: int) -> QnnRunnerDecoder:
    return QnnRunnerDecoder(QnnStaticDecoder(model.llm, model.config.llm, max_context_len, prefill_len).eval(),
                            prefill_len).eval()


def padded(emb: torch.Tensor, prefill_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (1, P, D), valid (P,)) for ``emb`` (1, T, D): the static core's inputs."""
    n = emb.shape[1]
    if n > prefill_len:
        raise ConfigError(f"{n} tokens in one call exceed the QNN prefill length {prefill_len}")
    x = nn.functional.pad(emb, (0, 0, 0, prefill_len - n))
    return x, (torch.arange(prefill_len) < n).to(emb.dtype)


# ---- calibration data -----------------------------------------------------------------------------
def calibration_images(model, count: int = 4) -> list[torch.Tensor]:
    """uint8 (1, 3, V*S, S) images: the parity scene, shifted/recoloured variants of it."""
    cfg = model.config
    s = max(cfg.vision.image_size, 32)
    out = []
    palette = [(220, 40, 40), (40, 40, 220), (40, 200, 60), (230, 200, 30)]
    for i in range(count):
        img = Image.new("RGB", (s, s), (128 - 20 * i, 128, 128 + 20 * i))
        d = ImageDraw.Draw(img)
        a = (i * s) // (4 * max(count, 1))
        d.rectangle([s // 8 + a, s // 8, s // 2 + a, s // 2], fill=palette[i % 4])
        d.ellipse([s // 2 - a, s // 2, 7 * s // 8 - a, 7 * s // 8], fill=palette[(i + 1) % 4])
        views = torch.from_numpy(np.ascontiguousarray(to_uint8_views(img, cfg.vision)))
        out.append(views.reshape(1, 3, -1, cfg.vision.image_size).contiguous())
    return out


def decoder_calibration_inputs(model, tokenizer, prefill_len: int, images: Sequence[torch.Tensor],
                               questions: Sequence[str], decode_steps: int = 8) -> list[tuple]:
    """Static-core inputs ``(x, start_pos, valid)`` the way the runner drives the decoder: per image and
    question, the prompt's segments (text, visual tokens, text) as separate calls from position 0, then
    ``decode_steps`` greedy one-token calls -- computed with the eager model (no cache needed: full
    sequence recomputation gives the next token)."""
    cfg = model.config
    out: list[tuple] = []
    with torch.no_grad():
        for img, q in zip(images, questions):
            views = img.reshape(3, cfg.vision.num_views, cfg.vision.image_size, cfg.vision.image_size)
            pix = normalize(views.transpose(0, 1).contiguous(), cfg.vision)
            ids = prompt_ids(cfg, tokenizer, q)
            emb = model.embed(torch.tensor([ids]), pix.unsqueeze(0)).float()
            first = ids.index(IMAGE_TOKEN_ID)
            last = len(ids) - ids[::-1].index(IMAGE_TOKEN_ID)
            pos = 0
            for a, b in ((0, first), (first, last), (last, len(ids))):
                if b > a:
                    x, valid = padded(emb[:, a:b], prefill_len)
                    out.append((x, torch.tensor([pos], dtype=torch.long), valid))
                    pos = b
            seq = emb
            for _ in range(decode_steps):
                if pos >= model.config.llm.max_position_embeddings - 1:
                    break
                tok = int(model.llm(inputs_embeds=seq).logits[0, -1].argmax())
                e = model.llm.get_input_embeddings()(torch.tensor([[tok]])).float()
                x, valid = padded(e, prefill_len)
                out.append((x, torch.tensor([pos], dtype=torch.long), valid))
                seq = torch.cat([seq, e], dim=1)
                pos += 1
    return out


def quantize_decoder(model, tokenizer, decoder: QnnRunnerDecoder, scheme: str, soc_model: str | None,
                     steps: int = 8) -> QnnRunnerDecoder:
    """The decoder with its static core PT2E-quantized (QNN ``scheme``) and calibrated on real prompts."""
    if _quant_dtype(scheme) is None:  # fp16: HTP runs the float graph in fp16
        return decoder
    p = decoder.prefill_len
    images = calibration_images(model, 2)
    questions = ["What shape is in the image?", "How many shapes are there?"]
    # one stream: positions restart at 0 per prompt, and stale cache slots are either masked (future) or
    # overwritten before they are read, so the cache needs no reset between prompts
    calib = decoder_calibration_inputs(model, tokenizer, p, images, questions, steps)
    core = decoder.core
    core.reset_cache()
    q = quantize_for_qnn(core, calib[0], calib, scheme, soc_model)
    core.reset_cache()
    return QnnRunnerDecoder(q, p)  # no .eval(): exported GraphModules refuse it (already inference graphs)


def quantize_vision(model, vision: nn.Module, scheme: str, soc_model: str | None) -> nn.Module:
    if _quant_dtype(scheme) is None:
        return vision
    images = calibration_images(model, 4)
    return quantize_for_qnn(vision, (images[0],), [(im,) for im in images], scheme, soc_model)


# ---- the export step and the lowering (lowering needs the SDK) -------------------------------------
def quantize_modules(model, tokenizer, modules: dict[str, nn.Module], recipe: dict[str, Any], plan: Q.Plan,
                     max_seq_len: int, log=print) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The methods' QNN-ready versions and the manifest's quantization info: vision and decoder PT2E-quantized
    with QnnQuantizer (the plan's schemes, calibrated on the parity-style scenes and prompts), the token
    embedding with torchao (CPU, ``embedding4`` in the shipped recipe)."""
    schemes = {part: plan.scheme(part) for part in QNN_PARTS}
    soc = recipe.get("soc_model")
    steps = int(recipe.get("calibration_steps", 8))
    log(f"QNN PT2E quantization: vision {schemes['vision_encoder']}, decoder {schemes['text_decoder']} "
        f"(SoC {str(soc or DEFAULT_SOC).upper()}, prefill length {max_seq_len})")
    out = {"vision_encoder": quantize_vision(model, modules["vision_encoder"], schemes["vision_encoder"], soc),
           "token_embedding": modules["token_embedding"],
           "text_decoder": quantize_decoder(model, tokenizer, modules["text_decoder"], schemes["text_decoder"], soc,
                                            steps)}
    qinfo = {
        "vision_encoder": {"scheme": schemes["vision_encoder"], "method": "qnn_pt2e", "calibration_images": 4},
        "token_embedding": quantize_embeddings(modules["token_embedding"], plan.scheme("token_embedding"),
                                               plan.group_size("token_embedding")),
        "text_decoder": {"scheme": schemes["text_decoder"], "method": "qnn_pt2e", "calibration_prompts": 2,
                         "calibration_decode_steps": steps, "prefill_len": max_seq_len},
    }
    qinfo["token_embedding"]["backend"] = "xnnpack"
    for part in QNN_PARTS:
        qinfo[part]["backend"] = "qnn"
    return out, qinfo


def lower_qnn(programs: dict[str, Any], constants: dict[str, Any], recipe: dict[str, Any]):
    """Edge dialect + QNN (vision, decoder) / XNNPACK (token embedding) + ExecuTorch program, the way
    executorch's ``to_edge_transform_and_lower_to_qnn`` does it, per method. Needs the SDK's HTP library:
    without it the ``QnnManager`` cannot start and this raises BackendUnavailable before any work."""
    from executorch.backends.qualcomm._passes.qnn_pass_manager import get_qnn_pass_manager_cls
    from executorch.backends.qualcomm.utils.qnn_manager_lifecycle import QnnManagerContext
    from executorch.backends.qualcomm.utils.utils import get_qnn_context_binary_alignment, qnn_edge_config
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    specs = method_compile_specs(recipe)
    partitioners = qnn_partitioners(recipe)
    problem = sdk_problem(os.environ.get("QNN_SDK_ROOT"))
    if problem:  # checked first: with no library the QnnManager fails, with a bare folder the process aborts
        raise BackendUnavailable(f"QNN lowering needs the QNN SDK: {problem}")
    try:
        ctx = QnnManagerContext(specs)
        ctx.__enter__()
    except RuntimeError as e:
        raise BackendUnavailable(f"QNN lowering needs the QNN SDK's HTP library, which could not be loaded ({e})") \
            from None
    try:
        aten, passes = {}, {}
        for name, ep in programs.items():
            if name in specs:
                pm = get_qnn_pass_manager_cls()()
                aten[name] = pm.transform_for_export_pipeline(ep)
                passes[name] = pm.get_to_edge_transform_passes(ep, compiler_specs=specs[name])
            else:
                aten[name], passes[name] = ep, []
        edge = to_edge_transform_and_lower(aten, transform_passes=passes, partitioner=partitioners,
                                           constant_methods=constants, compile_config=qnn_edge_config())
    finally:
        ctx.__exit__(None, None, None)
    return edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,  # the token embedding's 4-bit lookup kernel
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        segment_alignment=get_qnn_context_binary_alignment(),
        sym_shape_eval_pass={name: ConstraintBasedSymShapeEvalPass() for name in programs},
    ))
