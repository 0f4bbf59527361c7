"""Core ML export: ``vision.mlpackage``, ``embed.mlpackage`` and a stateful ``decoder.mlpackage``.

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
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mobilemllm.errors import BackendUnavailable, ConfigError, UserError

PACKAGE_FILES = {"vision_encoder": "vision.mlpackage", "token_embedding": "embed.mlpackage",
                 "text_decoder": "decoder.mlpackage"}
COMPRESSIONS: dict[str, str] = {
    "fp16": "no weight compression (fp16 weights)",
    "int8": "int8 linear quantization, symmetric, per output channel",
    "int4": "int4 linear quantization, symmetric, per block of input channels",
    "palettize4": "4-bit palettization (k-means look-up table), per grouped channel",
}
# MIL ops that hold compressed weights (iOS 18 opset): what the spec checks look for.
COMPRESSION_OPS = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale",
                   "palettize4": "constexpr_lut_to_dense"}
IOS18_SPEC_VERSION = 9
PREDICTION_NEEDS_MACOS = "Core ML prediction needs macOS"
PARITY_GATES = {"fp16": 0.999, "int8": 0.99, "int4": 0.95, "palettize4": 0.95}  # min logit cosine vs eager


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
    errors = []
    if scheme not in COMPRESSIONS:
        errors.append(f"unknown Core ML compression {scheme!r}; valid: {', '.join(COMPRESSIONS)}")
    if not isinstance(block_size, int) or block_size not in (16, 32, 64, 128):
        errors.append(f"block_size must be one of 16, 32, 64, 128, got {block_size!r}")
    if errors:
        raise ConfigError("invalid Core ML recipe: " + "; ".join(errors))


# ---- export-ready wrappers ---------------------------------------------------------------------
class VisionPackage(torch.nn.Module):
    """Pixels (V, 3, S, S) in 0..255 -> image embeddings (1, V*T, D)."""

    def __init__(self, model):
        super().__init__()
        self.vision = model.vision
        self.connector = model.connector
        cfg = model.config.vision
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.connector(self.vision((pixel_values - self.mean) / self.std))
        return tokens.reshape(1, tokens.shape[0] * tokens.shape[1], tokens.shape[2])


class EmbedPackage(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.llm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.clamp(min=0))


# ---- conversion ---------------------------------------------------------------------------------
def _convert(module: torch.nn.Module, args: tuple, dynamic_shapes: Any, input_names: list[str],
             output_name: str, int_inputs: tuple[str, ...] = ()):
    import warnings

    ct = _ct()
    from torch.export import export

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ep = export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False).run_decompositions({})
        inputs = None
        if input_names:
            import numpy as np

            # Token ids must stay int32: fp16 holds integers exactly only up to 2048.
            inputs = [ct.TensorType(name=name, dtype=np.int32 if name in int_inputs else np.float16)
                      for name in input_names]
        ml = ct.convert(ep, inputs=inputs, outputs=[ct.TensorType(name=output_name)],
                        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                        skip_model_load=not can_predict())
    return ml


def convert_vision(model):
    cfg = model.config.vision
    pixels = torch.rand(cfg.num_views, 3, cfg.image_size, cfg.image_size) * 255.0
    return _convert(VisionPackage(model.float()), (pixels,), None, ["pixel_values"], "image_embeds")


def convert_embed(model):
    from torch.export import Dim

    n = Dim("sequence_length", min=1, max=model.config.llm.max_position_embeddings)
    ids = torch.tensor([[1, 5, 7, 2, 3]], dtype=torch.int32)
    return _convert(EmbedPackage(model.float()), (ids,), {"input_ids": {1: n}}, ["input_ids"], "inputs_embeds",
                    int_inputs=("input_ids",))


def convert_decoder(model):
    """The stateful decoder; the cache holds max_position_embeddings tokens (Dims stay below its size)."""
    from torch.export import Dim

    from mobilemllm.export.coreml_decoder import CoreMLDecoder, causal_mask

    ctx = model.config.llm.max_position_embeddings
    dec = CoreMLDecoder(model.float().llm, model.config.llm, max_context=ctx + 1)
    n = Dim("sequence_length", min=1, max=ctx)
    end = Dim("total_sequence_length", min=1, max=ctx)
    args = (torch.randn(1, 5, model.config.llm.hidden_size), causal_mask(3, 5))
    return _convert(dec, args, {"inputs_embeds": {1: n}, "causal_mask": {2: n, 3: end}},
                    ["inputs_embeds", "causal_mask"], "logits")


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
    import numpy as np

    from mobilemllm.data.images import to_uint8_views
    from mobilemllm.export.coreml_decoder import causal_mask
    from mobilemllm.models.vlm import IMAGE_TOKEN_ID

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
