"""The Core ML format: ``vision.mlpackage``, ``embed.mlpackage`` and a stateful ``decoder.mlpackage``.

- ``vision.mlpackage``: pixels (V, 3, S, S) float32 in 0..255 (the app's RGB bytes, unnormalised) ->
  image embeddings (1, V*T, D); scaling and mean/std happen inside.
- ``embed.mlpackage``: token ids (1, n) int32 -> embeddings (1, n, D).
- ``decoder.mlpackage``: ``mobilemllm.export.coreml_decoder.CoreMLDecoder`` through ``torch.export``;
  its key/value buffers become Core ML states (``ct.StateType``), so the cache stays on the device.
  Inputs ``inputs_embeds`` (1, n, D) and ``causal_mask`` (1, 1, n, end); output ``logits`` (1, 1, V).

All three target iOS 18 / macOS 15 in fp16. Compression (``coremltools.optimize.coreml``): ``int8``
(linear, symmetric, per output channel), ``int4`` (linear, symmetric, per block of 32 input channels)
and ``palettize4`` (4-bit k-means look-up tables, per grouped channel).

**Core ML cannot run a prediction on Linux** (coremltools ships no runtime there). On Linux the export
converts, compresses and checks each package's spec, and the manifest records the numerical parity as
skipped with that reason; on macOS the same export also predicts and compares logits with eager.

:class:`CoreMLFormat` is the plug-in the export pipeline runs: convert each package, then compress it.
"""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import Dim, export

from mobilemllm import quantization as Q
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.data.images import to_uint8_views
from mobilemllm.errors import BackendUnavailable, ConfigError, UserError
from mobilemllm.export import parity
from mobilemllm.export.coreml_decoder import CoreMLDecoder, causal_mask
from mobilemllm.export.modules import TokenEmbedding, VisionEncoder
from mobilemllm.export.onnx_parity import PARITY_QUESTION
from mobilemllm.export.plugin import ExportFormat, Job
from mobilemllm.inference import prompt_ids

PACKAGE_FILES = {"vision_encoder": "vision.mlpackage", "token_embedding": "embed.mlpackage",
                 "text_decoder": "decoder.mlpackage"}
# The compressions (fp16 | int8 | int4 | palettize4), their block sizes, the MIL ops that hold compressed
# weights (what the spec checks look for) and the logit-cosine gates vs eager (macOS) are the registry's
# ``coremltools`` quantizer (mobilemllm.quantization).
IOS18_SPEC_VERSION = 9
PREDICTION_NEEDS_MACOS = "Core ML prediction needs macOS"


def can_predict() -> bool:
    return platform.system() == "Darwin"


def _ct():
    try:
        import coremltools as ct
    except ImportError:
        raise BackendUnavailable("coremltools is not installed; `pip install coremltools==9.0` (Linux x86_64 "
                                 "or macOS)") from None
    return ct


def check_compression(scheme: Any, block_size: Any = 32) -> None:
    """A Core ML compression and block size, checked by the registry; ConfigError listing every problem."""
    errors = Q.check({"format": "coreml", "compression": scheme, "block_size": block_size})
    if errors:
        raise ConfigError("invalid Core ML recipe: " + "; ".join(errors))


# ---- conversion ---------------------------------------------------------------------------------
def _convert(module: torch.nn.Module, args: tuple, dynamic_shapes: Any, input_names: list[str],
             output_name: str, int_inputs: tuple[str, ...] = (), fp32_inputs: tuple[str, ...] = ()):
    ct = _ct()

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False).run_decompositions({})
        inputs = None
        if input_names:
            # Token ids must stay int32: fp16 holds integers exactly only up to 2048.
            inputs = [ct.TensorType(name=name, dtype=np.int32 if name in int_inputs else
                                    np.float32 if name in fp32_inputs else np.float16) for name in input_names]
        ml = ct.convert(ep, inputs=inputs, outputs=[ct.TensorType(name=output_name)],
                        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                        skip_model_load=not can_predict())
    return ml


def package_modules(model) -> dict[str, torch.nn.Module]:
    """The export-ready module of each package, sharing ``model``'s (float) weights. The decoder's cache holds
    max_position_embeddings + 1 tokens (the flexible dimensions stay below its size)."""
    model = model.float()
    ctx = model.config.llm.max_position_embeddings
    return {"vision_encoder": VisionEncoder(model, stacked=False),
            "token_embedding": TokenEmbedding(model.llm.get_input_embeddings(), clamp_negative=True),
            "text_decoder": CoreMLDecoder(model.llm, model.config.llm, max_context=ctx + 1)}


def convert_part(part: str, module: torch.nn.Module, config):
    """One package's module -> a Core ML model (fp16, iOS 18), with its example inputs and flexible shapes."""
    ctx = config.llm.max_position_embeddings
    if part == "vision_encoder":
        v = config.vision
        pixels = torch.rand(v.num_views, 3, v.image_size, v.image_size) * 255.0
        return _convert(module, (pixels,), None, ["pixel_values"], "image_embeds", fp32_inputs=("pixel_values",))
    n = Dim("sequence_length", min=1, max=ctx)
    if part == "token_embedding":
        ids = torch.tensor([[1, 5, 7, 2, 3]], dtype=torch.int32)
        return _convert(module, (ids,), {"input_ids": {1: n}}, ["input_ids"], "inputs_embeds",
                        int_inputs=("input_ids",))
    end = Dim("total_sequence_length", min=1, max=ctx)
    args = (torch.randn(1, 5, config.llm.hidden_size), causal_mask(3, 5))
    return _convert(module, args, {"inputs_embeds": {1: n}, "causal_mask": {2: n, 3: end}},
                    ["inputs_embeds", "causal_mask"], "logits")


def convert_vision(model):
    return convert_part("vision_encoder", package_modules(model)["vision_encoder"], model.config)


def convert_decoder(model):
    """The stateful decoder package of ``model`` (uncompressed)."""
    return convert_part("text_decoder", package_modules(model)["text_decoder"], model.config)


def compress(ml, scheme: str, block_size: int = 32):
    """Apply a compression recipe to a converted model (returns the new model)."""
    check_compression(scheme, block_size)
    if scheme == "fp16":
        return ml
    import coremltools.optimize.coreml as cto

    if scheme == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=512)
        return cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=op))
    if scheme == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=block_size, weight_threshold=512)
        return cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=op))
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16,
                                weight_threshold=512)
    return cto.palettize_weights(ml, cto.OptimizationConfig(global_config=op))


# ---- spec checks (run on every platform) -------------------------------------------------------
def _shape(array_type) -> list[Any]:
    """A feature's shape with flexible dims as 'lo..hi'."""
    dims = list(array_type.shape)
    which = array_type.WhichOneof("ShapeFlexibility")
    if which == "shapeRange":
        out = []
        for d, r in zip(dims, array_type.shapeRange.sizeRanges):
            out.append(int(r.lowerBound) if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}")
        return out
    return [int(d) for d in dims]


def _dtype(array_type) -> str:
    from coremltools.proto import FeatureTypes_pb2 as ft

    return ft.ArrayFeatureType.ArrayDataType.Name(array_type.dataType).lower()


def mil_op_types(spec) -> dict[str, int]:
    """Histogram of the MIL ops in an ML program spec (every function and block)."""
    counts: dict[str, int] = {}

    def walk(block):
        for op in block.operations:
            counts[op.type] = counts.get(op.type, 0) + 1
            for b in op.blocks:
                walk(b)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return counts


def package_spec(path_or_model) -> dict[str, Any]:
    """What a package declares: inputs, outputs, states (name, dtype, shape), spec version, MIL ops."""
    ct = _ct()
    if isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if not path.exists():
            raise UserError(f"Core ML package {path} does not exist")
        spec = ct.utils.load_spec(str(path))
    else:
        spec = path_or_model.get_spec()
    desc = spec.description

    def feats(items, kind):
        out = []
        for f in items:
            arr = f.type.stateType.arrayType if kind == "state" else f.type.multiArrayType
            out.append({"name": f.name, "dtype": _dtype(arr), "shape": _shape(arr)})
        return out

    return {"spec_version": int(spec.specificationVersion),
            "inputs": feats(desc.input, "input"), "outputs": feats(desc.output, "output"),
            "states": feats(desc.state, "state"), "ops": mil_op_types(spec)}


# ---- prediction (macOS only) --------------------------------------------------------------------
def coreml_teacher_forced(packages: dict[str, Any], config, ids: list[int], image, tokens: list[int]):
    """Logits (len(tokens), V) from the Core ML packages fed the reference tokens one by one (macOS only)."""
    if not can_predict():
        raise BackendUnavailable(PREDICTION_NEEDS_MACOS)
    vision, embed, decoder = (packages[p] for p in PACKAGE_FILES)
    pixels = to_uint8_views(image, config.vision).astype(np.float32)
    image_embeds = vision.predict({"pixel_values": pixels})["image_embeds"]
    ids_arr = np.asarray([ids], dtype=np.int64)
    emb = embed.predict({"input_ids": ids_arr.clip(min=0).astype(np.int32)})["inputs_embeds"].astype(np.float32)
    emb[0, ids_arr[0] == IMAGE_TOKEN_ID] = image_embeds[0]
    state = decoder.make_state()
    past, rows = 0, []
    for tok in tokens:
        n = emb.shape[1]
        out = decoder.predict({"inputs_embeds": emb, "causal_mask": causal_mask(past, n).numpy()}, state=state)
        rows.append(np.asarray(out["logits"], dtype=np.float32)[0, -1])
        past += n
        emb = embed.predict({"input_ids": np.asarray([[tok]], dtype=np.int32)})["inputs_embeds"].astype(np.float32)
    return np.stack(rows)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---- checks ------------------------------------------------------------------------------------------
def spec_checks(specs: dict[str, dict[str, Any]], scheme: str, num_layers: int) -> list[dict[str, Any]]:
    """What can be checked without a Core ML runtime: deployment target, states, compression ops."""
    checks = []
    for part, spec in specs.items():
        checks.append(parity.check(f"{part}_spec_version", spec["spec_version"], f">= {IOS18_SPEC_VERSION} (iOS 18)",
                                   spec["spec_version"] >= IOS18_SPEC_VERSION))
    states = len(specs["text_decoder"]["states"])
    checks.append(parity.check("text_decoder_states", states, 2 * num_layers, states == 2 * num_layers))
    if scheme != "fp16":
        op = Q.scheme("coremltools", scheme).graph_op
        n = specs["text_decoder"]["ops"].get(op, 0)
        checks.append(parity.check(f"text_decoder_{op}_ops", n, "> 0", n > 0))
    return checks


def _prediction_checks(model, tokenizer, staging: Path, scheme: str, recipe: dict[str, Any]) -> list[dict]:
    """macOS only: teacher-forced logits of the packages vs eager, cosine gated per scheme."""
    ct = _ct()
    cfg = model.config
    n = int((recipe.get("parity") or {}).get("greedy_tokens", 8))
    image = parity.parity_image(cfg.vision)
    ids = prompt_ids(cfg, tokenizer, PARITY_QUESTION)
    ref_logits, ref_tokens = parity.eager_reference(model, ids, image, n)
    loaded = {part: ct.models.MLModel(str(staging / name)) for part, name in PACKAGE_FILES.items()}
    got = torch.from_numpy(coreml_teacher_forced(loaded, cfg, ids, image, ref_tokens))
    cos = parity.logit_cosine(got, ref_logits)
    greedy = [int(t) for t in got.argmax(-1)]

    gate = float((recipe.get("parity") or {}).get("min_logit_cosine",
                                                   Q.scheme("coremltools", scheme).parity_cosine))
    return [parity.check("logit_cosine", cos, gate, cos >= gate),
            parity.check("logits_max_rel_diff", parity.max_rel_diff(got, ref_logits)),
            parity.check(f"teacher_forced_greedy_agreement_{n}_tokens", parity.greedy_agreement(greedy, ref_tokens))]


# ---- the format plug-in -----------------------------------------------------------------------------------
RECIPE_KEYS = ("name", "format", "description", "compression", "block_size", "parity")


class CoreMLFormat(ExportFormat):
    """Three .mlpackage folders: converted from torch.export, then compressed with one scheme."""

    name = "coreml"
    label = "Core ML"
    recipe_keys = RECIPE_KEYS
    parity_keys = ("greedy_tokens", "min_logit_cosine")
    image_dtype = "float32"
    default_target = "coreml"

    def require(self, recipe: dict[str, Any]) -> None:
        _ct()

    def prepare(self, job: Job) -> None:
        if not can_predict():
            job.log(f"note: {PREDICTION_NEEDS_MACOS}; on {platform.system()} the export converts, compresses and "
                    "checks each package's spec, but cannot compare its numbers with eager (run the export on a "
                    "Mac for that)")

    def modules(self, job: Job) -> dict[str, Any]:
        return package_modules(job.model)

    def convert(self, job: Job, modules: dict[str, Any]) -> None:
        job.state["ml"] = {}
        for part, module in modules.items():
            t0 = time.perf_counter()
            job.state["ml"][part] = convert_part(part, module, job.model.config)
            job.log(f"{PACKAGE_FILES[part]} converted ({time.perf_counter() - t0:.1f} s)")

    def quantize_files(self, job: Job) -> None:
        """Compress each converted package with the recipe's scheme and save it into the bundle."""
        scheme, block = job.plan.scheme("text_decoder"), job.plan.group_size("text_decoder")
        for part in PACKAGE_FILES:
            t0 = time.perf_counter()
            compress(job.state["ml"].pop(part), scheme, block).save(str(job.staging / PACKAGE_FILES[part]))
            job.log(f"{PACKAGE_FILES[part]} written ({scheme}, {time.perf_counter() - t0:.1f} s)")
        job.qinfo = {part: {"scheme": scheme, "group_size": block if job.plan.parts[part].info.grouped else None,
                            "backend": "coremltools.optimize.coreml"} for part in PACKAGE_FILES}

    def manifest(self, job: Job) -> dict[str, Any]:
        job.state["specs"] = specs = {part: package_spec(job.staging / name) for part, name in PACKAGE_FILES.items()}
        graphs = {}
        for part, spec in specs.items():
            graphs[part] = {"file": PACKAGE_FILES[part], "inputs": spec["inputs"], "outputs": spec["outputs"]}
            if spec["states"]:
                graphs[part]["states"] = spec["states"]
        return {"graphs": graphs,
                "export": {"backend": "coreml", "deployment_target": "iOS18/macOS15", "compute_precision": "float16",
                           "decoder_call": "inputs_embeds (1, n, D) fp16 + additive causal_mask (1, 1, n, past+n) "
                                           "fp16 (0 = attend, -1e4 = masked) -> logits of the last position; the "
                                           "KV cache is the model's state (MLState)"}}

    def parity(self, job: Job, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        """The packages' specs everywhere; their logits against eager only on macOS."""
        scheme = job.plan.scheme("text_decoder")
        checks = spec_checks(job.state["specs"], scheme, job.model.config.llm.num_layers)
        if not can_predict():
            return checks, (f"{PREDICTION_NEEDS_MACOS}: numerical parity was not measured (exported on "
                            f"{platform.system()})")
        return checks + _prediction_checks(job.model, job.tokenizer, job.staging, scheme, job.recipe), None

    def roles(self, job: Job) -> dict[str, str]:
        return {name: "program" for name in PACKAGE_FILES.values()}

    def files_summary(self, job: Job, out: Path) -> str:
        return ", ".join(f"{name} {_dir_size(out / name) / 1e6:.1f} MB" for name in PACKAGE_FILES.values())

    def quant_summary(self, job: Job) -> str:
        return job.plan.scheme("text_decoder")
