"""The quantization registry: every scheme a recipe can name, who applies it, to which program parts,
with how many bits and which group sizes -- and the one check of a recipe's quantization.

A **quantizer** is the tool that applies a scheme; each format (and ExecuTorch backend) hands each
program part to one quantizer (:data:`SUPPORT`):

- ``torchao``: ExecuTorch programs (XNNPACK, portable) and every backend's CPU token embedding.
- ``qnn``: ExecuTorch's ``QnnQuantizer`` (PT2E, calibrated) for the android-qnn vision encoder and decoder.
- ``fp16_compute``: ExecuTorch parts delegated to Core ML (ios-coreml): fp32 weights, Core ML computes in fp16.
- ``onnxruntime``: ONNX graphs (``quantize_dynamic``, ``MatMulNBits``).
- ``coremltools``: Core ML packages (one compression for all three).
- ``llamacpp``: GGUF bundles: llama.cpp's own quantizer (``llama_model_quantize``) on the text model; the
  mmproj (vision tower + connector) stays f16.

Recipes write quantization in their format's shape (ExecuTorch: ``quantization: {part: {scheme,
group_size}}``; ONNX: a scheme name or a mapping by part with ``block_size``; Core ML: ``compression``
and ``block_size``). :func:`resolve` reads any of them into one :class:`Plan`, and :func:`check` lists
every problem, each one line that names the valid choices. ``mobilemllm export --help``, the export
pipeline's preflight (before any weights load) and the benchmark's roofline (bytes per weight of the
scheme a manifest names) all read this table. It sits low, beside ``config``, because both export and
the programs that read bundles (which must not import export) need it; it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobilemllm.errors import ConfigError

PARTS = ("vision_encoder", "token_embedding", "text_decoder")
LINEARS = ("vision_encoder", "text_decoder")
EVEN = "0 (per channel) or a positive even integer"  # group sizes torchao takes


@dataclass(frozen=True)
class Quantizer:
    """A tool that applies schemes, with its group sizes and how it words a bad choice."""

    name: str
    label: str  # the tool as users know it, in messages
    tool: str  # what applies it (recorded in manifests)
    group_sizes: tuple[int, ...] | str = ()  # valid group/block sizes; EVEN: any even size or 0
    default_group_size: int = 32
    defaults: dict[str, str] = field(default_factory=dict)  # part -> scheme when the recipe names none
    unknown: str = "quantization scheme {scheme!r} is not valid for {part}; choose one of {valid}"


@dataclass(frozen=True)
class Scheme:
    """One named scheme of one quantizer."""

    name: str
    quantizer: str
    parts: tuple[str, ...]
    weight_bits: int
    description: str
    activation_bits: int | None = None  # None: activations stay float
    grouped: bool = False  # weights scaled per group of input channels (group_size / block_size)
    alias_of: str | None = None
    impl: str | None = None  # the quantizer's own name for it (QnnQuantizer's QuantDtype attribute)
    tool: str | None = None  # the function that applies it, where the quantizer has several
    manifest_name: str | None = None  # how manifest.json records it (default: the name)
    parity_cosine: float | None = None  # the logit-cosine gate vs eager at export (formats that gate by scheme)
    graph_op: str | None = None  # the op that holds its weights in the converted graph (spec checks)
    part_note: str | None = None  # why it is limited to ``parts``


QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (
    Quantizer("torchao", "torchao", "torchao.quantization.quantize_", EVEN, 32,
              {p: "fp32" for p in PARTS}),
    Quantizer("qnn", "QNN", "QnnQuantizer (PT2E)", (), 32, {"text_decoder": "16a4w", "vision_encoder": "8a8w"},
              unknown="quantization scheme {scheme!r} is not a QNN scheme for {part}; choose one of {valid} "
                      "(QNN's HTP takes PT2E-quantized graphs, not torchao 8da4w)"),
    Quantizer("fp16_compute", "Core ML delegate", "none (Core ML computes in fp16)", (), 32,
              {p: "fp32" for p in LINEARS},
              unknown="ios-coreml runs the {part} in Core ML (fp16 compute), so its scheme must be fp32, not "
                      "{scheme!r}; for compressed Core ML weights use --target coreml (int8 / int4 / palettize4 "
                      ".mlpackages), for 8da4w --target ios (XNNPACK)"),
    Quantizer("onnxruntime", "ONNX", "onnxruntime.quantization", (32, 64, 128), 32, {p: "fp32" for p in PARTS},
              unknown="unknown ONNX quantization {scheme!r} for {part}; valid: {valid}"),
    Quantizer("coremltools", "Core ML", "coremltools.optimize.coreml", (16, 32, 64, 128), 32,
              {p: "fp16" for p in PARTS}, unknown="unknown Core ML compression {scheme!r}; valid: {valid}"),
    Quantizer("llamacpp", "llama.cpp", "llama_cpp.llama_model_quantize", (), 32, {p: "f16" for p in PARTS},
              unknown="unknown GGUF quantization {scheme!r}; valid: {valid}"),
)}

_SCHEMES = (
    # torchao (ExecuTorch)
    Scheme("fp32", "torchao", PARTS, 32, "no quantization"),
    Scheme("8da4w", "torchao", LINEARS, 4, "int8 dynamic activations, int4 weights per group (0: per channel)",
           activation_bits=8, grouped=True),
    Scheme("8da8w", "torchao", LINEARS, 8, "int8 dynamic activations, int8 per-channel weights", activation_bits=8),
    Scheme("int8", "torchao", LINEARS, 8, "= 8da8w", activation_bits=8, alias_of="8da8w"),
    Scheme("int8_weight", "torchao", LINEARS, 8, "int8 per-channel weights only"),
    Scheme("embedding4", "torchao", ("token_embedding",), 4, "4-bit embedding table, per group", grouped=True),
    Scheme("embedding8", "torchao", ("token_embedding",), 8, "8-bit embedding table, per group", grouped=True),
    # QnnQuantizer (android-qnn): activation bits a, weight bits w; per-channel weights
    *(Scheme(f"{a}a{w}w", "qnn", LINEARS, w, f"{a}-bit activations, {w}-bit per-channel weights (PT2E)",
             activation_bits=a, impl=f"use_{a}a{w}w")
      for a, w in ((16, 4), (16, 8), (16, 16), (8, 8), (8, 4))),
    Scheme("fp16", "qnn", LINEARS, 16, "no quantization; the HTP computes in fp16"),
    # parts ExecuTorch delegates to Core ML
    Scheme("fp32", "fp16_compute", LINEARS, 32, "fp32 weights; Core ML computes in fp16"),
    # ONNX Runtime
    Scheme("fp32", "onnxruntime", PARTS, 32, "no quantization", parity_cosine=0.9999),
    Scheme("int8", "onnxruntime", PARTS, 8, "int8 dynamic quantization of MatMul/Gather weights",
           activation_bits=8, tool="onnxruntime.quantization.quantize_dynamic", parity_cosine=0.99,
           graph_op="MatMulInteger"),
    Scheme("int4", "onnxruntime", LINEARS, 4, "4-bit weight-only MatMulNBits, symmetric, per block",
           grouped=True, tool="onnxruntime.quantization.matmul_nbits_quantizer", manifest_name="int4_weight",
           parity_cosine=0.90, graph_op="MatMulNBits", part_note="MatMulNBits quantizes MatMul only"),
    # coremltools (Core ML packages)
    Scheme("fp16", "coremltools", PARTS, 16, "no weight compression (fp16 weights)", parity_cosine=0.999),
    Scheme("int8", "coremltools", PARTS, 8, "int8 linear quantization, symmetric, per output channel",
           parity_cosine=0.99, graph_op="constexpr_blockwise_shift_scale"),
    Scheme("int4", "coremltools", PARTS, 4, "int4 linear quantization, symmetric, per block of input channels",
           grouped=True, parity_cosine=0.9, graph_op="constexpr_blockwise_shift_scale"),
    Scheme("palettize4", "coremltools", PARTS, 4, "4-bit palettization (k-means look-up table), per grouped "
           "channel", parity_cosine=0.9, graph_op="constexpr_lut_to_dense"),
    # llama.cpp (GGUF): one file type for the text model (token embedding included); the mmproj stays f16
    Scheme("f16", "llamacpp", PARTS, 16, "fp16 matrices, fp32 norms and biases", parity_cosine=0.9999),
    *(Scheme(name, "llamacpp", ("token_embedding", "text_decoder"), bits, text, tool="llama_cpp.llama_model_quantize",
             parity_cosine=cosine, part_note="llama.cpp quantizes the text model; the mmproj stays f16")
      for name, bits, cosine, text in (
          ("q8_0", 8, 0.999, "llama.cpp Q8_0: int8 weights in blocks of 32, one fp16 scale each"),
          ("q4_0", 4, 0.95, "llama.cpp Q4_0: 4-bit weights in blocks of 32, one fp16 scale each"),
          ("q4_k_m", 4, 0.95, "llama.cpp Q4_K_M: 4-bit K-quants in super-blocks of 256 (some tensors 6-bit; "
                              "rows narrower than 256 fall back to 32-blocks)"))),
)
SCHEMES: dict[tuple[str, str], Scheme] = {(s.quantizer, s.name): s for s in _SCHEMES}

# Which quantizer applies to each part, per format ("executorch/<backend>" for ExecuTorch).
SUPPORT: dict[str, dict[str, str]] = {
    "executorch/xnnpack": {p: "torchao" for p in PARTS},
    "executorch/portable": {p: "torchao" for p in PARTS},
    "executorch/coreml": {"vision_encoder": "fp16_compute", "token_embedding": "torchao",
                          "text_decoder": "fp16_compute"},
    "executorch/qnn": {"vision_encoder": "qnn", "token_embedding": "torchao", "text_decoder": "qnn"},
    "onnx": {p: "onnxruntime" for p in PARTS},
    "coreml": {p: "coremltools" for p in PARTS},
    "gguf": {p: "llamacpp" for p in PARTS},
}
# The ExecuTorch decoder's KV cache: fp32, or int8 per token (XNNPACK and portable only).
KV_CACHE_DTYPES = ("fp32", "int8")
KV_CACHE_BITS = {"fp32": 32, "int8": 8}
KV_CACHE_FP32_ONLY = {
    "executorch/coreml": "ios-coreml keeps its KV cache as fp16 Core ML state; --kv-cache int8 is for XNNPACK",
    "executorch/qnn": "android-qnn keeps its KV cache as mutable buffers in the QNN graph; --kv-cache int8 is "
                      "for XNNPACK",
}
ONNX_ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits compute: 4 = int8 activations, 0 = fp32
FLOAT_BITS = {"fp32": 32, "float32": 32, "fp16": 16, "float16": 16, "bf16": 16}


# ---- look-ups -------------------------------------------------------------------------------------------
def support_key(recipe: dict[str, Any]) -> str:
    """The :data:`SUPPORT` key of a recipe: its format, with the ExecuTorch backend."""
    fmt = recipe.get("format", "executorch")
    return f"executorch/{recipe.get('backend') or 'xnnpack'}" if fmt == "executorch" else str(fmt)


def names(quantizer: str, part: str | None = None) -> list[str]:
    """The scheme names ``quantizer`` offers (for ``part``), in table order."""
    return [s.name for s in _SCHEMES if s.quantizer == quantizer and (part is None or part in s.parts)]


def scheme(quantizer: str, name: str) -> Scheme:
    return SCHEMES[(quantizer, name)]


def canonical(quantizer: str, name: str) -> str:
    """The name an alias stands for (torchao ``int8`` -> ``8da8w``)."""
    return SCHEMES[(quantizer, name)].alias_of or name


def weight_bits(name: str) -> int | None:
    """Bits per weight of a scheme named in a recipe or a manifest (any quantizer), or None if unknown."""
    name = name.lower()
    if name in FLOAT_BITS:
        return FLOAT_BITS[name]
    for s in _SCHEMES:
        if name in (s.name, s.manifest_name):
            return s.weight_bits
    return None


def help_text(part: str) -> str:
    """``mobilemllm export --help``: the schemes of ``part`` per target kind."""
    rows = [("executorch", "torchao"), ("ios-coreml", "fp16_compute"), ("android-qnn", "qnn"),
            ("onnx", "onnxruntime"), ("coreml: the compression of every package", "coremltools"),
            ("gguf: the text model's llama.cpp type", "llamacpp")]
    out = []
    for label, q in rows:
        valid = names(q, part)
        if valid and (q not in ("coremltools", "llamacpp") or part == "text_decoder"):
            out.append(f"{label}: {' | '.join(valid)}")
    return "; ".join(out)


def group_help() -> str:
    sizes = {q: " | ".join(map(str, QUANTIZERS[q].group_sizes)) for q in ("onnxruntime", "coremltools")}
    return f"executorch: {EVEN}; onnx: block size {sizes['onnxruntime']}; coreml: {sizes['coremltools']}"


# ---- reading a recipe --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartPlan:
    scheme: str
    quantizer: str
    group_size: int  # the recipe's (or the quantizer's default); used where ``info.grouped``

    @property
    def info(self) -> Scheme:
        return SCHEMES[(self.quantizer, self.scheme)]


@dataclass(frozen=True)
class Plan:
    """A recipe's quantization, checked: a scheme per part and the quantizer options."""

    parts: dict[str, PartPlan]
    accuracy_level: int = 4  # ONNX MatMulNBits only

    def scheme(self, part: str) -> str:
        return self.parts[part].scheme

    def group_size(self, part: str) -> int | None:
        return self.parts[part].group_size

    def summary(self) -> str:
        """``vision/embedding/decoder`` scheme names, e.g. ``int8/int8/int4``."""
        return "/".join(self.parts[p].scheme for p in PARTS)


def _raw_parts(recipe: dict[str, Any], errors: list[str]) -> tuple[dict[str, dict], dict[str, Any]]:
    """{part: {scheme?, group_size?}} and recipe-wide options, from any format's recipe shape."""
    fmt = recipe.get("format", "executorch")
    if fmt == "coreml":
        scheme_name = recipe.get("compression", "fp16")
        return {p: {"scheme": scheme_name, "group_size": recipe.get("block_size", 32)} for p in PARTS}, {}
    spec = recipe.get("quantization")
    if fmt == "onnx":
        return _onnx_parts(spec, errors)
    if fmt == "gguf" and (spec is None or isinstance(spec, str)):  # one llama.cpp type for the text model
        return {p: {"scheme": spec or "f16"} for p in ("token_embedding", "text_decoder")}, {}
    if spec is None:
        return {}, {}
    if not isinstance(spec, dict):
        errors.append("quantization must map parts (" + ", ".join(PARTS) + ") to {scheme: ...}")
        return {}, {}
    out = {}
    for part, value in spec.items():
        if part not in PARTS:
            errors.append(f"unknown program part {part!r} in quantization; valid parts: {', '.join(PARTS)}")
        elif isinstance(value, dict):
            out[part] = dict(value)
        else:
            out[part] = {"scheme": value}
    return out, {}


def _onnx_parts(spec: Any, errors: list[str]) -> tuple[dict[str, dict], dict[str, Any]]:
    """ONNX's shapes: one name (``int8``: every graph; otherwise the decoder only), or a mapping by part
    whose entries are names or {scheme, block_size/group_size, accuracy_level}; block size and accuracy
    level are recipe-wide (one for every graph), wherever they are written."""
    parts: dict[str, dict] = {}
    opts: dict[str, Any] = {}
    if spec is None or isinstance(spec, str):
        name = spec or "fp32"
        parts["text_decoder"] = {"scheme": name}
        if name == "int8":  # int8 dynamic is cheap for every graph; int4 keeps the small ones in fp32
            parts["vision_encoder"] = parts["token_embedding"] = {"scheme": "int8"}
        return parts, opts
    if not isinstance(spec, dict):
        errors.append(f"quantization must be a scheme name or a mapping, got {spec!r}")
        return parts, opts
    for key, value in spec.items():
        if key in ("block_size", "group_size", "accuracy_level"):
            opts["block_size" if key == "group_size" else key] = value
        elif key not in PARTS:
            errors.append(f"unknown quantization part {key!r} (valid: {', '.join(PARTS)})")
        elif isinstance(value, str) or value is None:
            parts[key] = {"scheme": value or "fp32"}
        elif isinstance(value, dict):
            parts[key] = {"scheme": value.get("scheme", "fp32")}
            for extra in ("block_size", "group_size"):
                if value.get(extra) is not None:
                    opts["block_size"] = value[extra]
            if value.get("accuracy_level") is not None:
                opts["accuracy_level"] = value["accuracy_level"]
            unknown = sorted(set(value) - {"scheme", "block_size", "group_size", "accuracy_level"})
            if unknown:
                errors.append(f"unknown key(s) {', '.join(unknown)} in quantization.{key}")
        else:
            errors.append(f"quantization.{key} must be a scheme name or a mapping, got {value!r}")
    return parts, opts


def onnx_mapping(spec: Any) -> dict[str, Any]:
    """An ONNX recipe's ``quantization`` in its mapping form (decoder entry with the block size)."""
    raw, opts = _onnx_parts(spec, [])
    out: dict[str, Any] = {p: raw.get(p, {}).get("scheme", "fp32") for p in PARTS}
    out["text_decoder"] = {"scheme": out["text_decoder"], "block_size": opts.get("block_size", 32)}
    out["accuracy_level"] = opts.get("accuracy_level", 4)
    return out


def _group_error(q: Quantizer, part: str, gs: Any) -> str | None:
    if q.group_sizes == EVEN:
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 0 or (gs and gs % 2):
            return f"{part} group_size must be {EVEN}, got {gs!r}"
    elif q.group_sizes and (not isinstance(gs, int) or gs not in q.group_sizes):
        return f"block_size must be one of {', '.join(map(str, q.group_sizes))}, got {gs!r}"
    return None


def _part_plan(part: str, quantizer: str, raw: dict, block: Any, errors: list[str]) -> PartPlan | None:
    q = QUANTIZERS[quantizer]
    name = str(raw.get("scheme") or q.defaults.get(part, "fp32"))
    gs = raw.get("group_size", block if block is not None else q.default_group_size)
    if gs is None and q.group_sizes == EVEN:  # group_size: null -> per channel, as 0
        gs = 0
    problem = _group_error(q, part, gs) if q.group_sizes else None
    if problem:
        errors.append(problem)
    if (quantizer, name) not in SCHEMES:
        errors.append(q.unknown.format(scheme=name, part=part, valid=", ".join(names(quantizer, part))))
        return None
    s = SCHEMES[(quantizer, name)]
    if part not in s.parts:
        valid = names(quantizer, part)
        errors.append(f"{part} cannot be {name} ({s.part_note}); use {' or '.join(valid)}" if s.part_note
                      else q.unknown.format(scheme=name, part=part, valid=", ".join(valid)))
        return None
    return PartPlan(name, quantizer, gs)


def _kv_cache_errors(recipe: dict[str, Any], key: str) -> list[str]:
    kv = recipe.get("kv_cache")
    if kv is None:
        return []
    if kv not in KV_CACHE_DTYPES:
        return [f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv!r}"]
    if kv != "fp32" and key in KV_CACHE_FP32_ONLY:
        return [KV_CACHE_FP32_ONLY[key]]
    return []


def _plan(recipe: dict[str, Any]) -> tuple[Plan | None, list[str]]:
    errors: list[str] = []
    key = support_key(recipe)
    if key not in SUPPORT and key.startswith("executorch/"):  # an unknown backend (the format check says so):
        key = "executorch/xnnpack"  # its schemes are still checked, against the default backend's table
    support = SUPPORT.get(key)
    if support is None:  # an unknown format or backend: the format check names the valid ones
        return None, errors
    raw, opts = _raw_parts(recipe, errors)
    block = opts.get("block_size")
    parts = {}
    for part in PARTS:
        plan = _part_plan(part, support[part], raw.get(part, {}), block, errors)
        if plan is not None:
            parts[part] = plan
    level = opts.get("accuracy_level", 4)
    if level not in ONNX_ACCURACY_LEVELS:
        errors.append(f"accuracy_level must be 0-4, got {level!r}")
    errors += _kv_cache_errors(recipe, key)
    if errors:  # a recipe-wide choice (Core ML's compression, a block size) is reported once
        return None, list(dict.fromkeys(errors))
    return Plan(parts, accuracy_level=level), []


def check(recipe: dict[str, Any]) -> list[str]:
    """Every problem with the quantization a recipe asks for (its format's shape), one line each."""
    return _plan(recipe)[1]


def resolve(recipe: dict[str, Any]) -> Plan:
    """The recipe's checked quantization plan; ConfigError listing every problem otherwise."""
    plan, errors = _plan(recipe)
    if errors:
        raise ConfigError("invalid quantization: " + "; ".join(errors))
    if plan is None:
        raise ConfigError(f"no quantization table for {support_key(recipe)!r}; valid: {', '.join(SUPPORT)}")
    return plan


# ---- writing a recipe (the CLI's --decoder-quant / --group-size ...) ----------------------------------------
def override(recipe: dict[str, Any], schemes: dict[str, str | None], group_size: int | None = None) -> None:
    """Write per-part scheme names and a group size into ``recipe`` in its format's shape (unchecked:
    :func:`check` reads the result)."""
    fmt = recipe.get("format", "executorch")
    chosen = {p: s for p, s in schemes.items() if s is not None}
    if not chosen and group_size is None:
        return
    if fmt == "coreml":
        if set(chosen) - {"text_decoder"}:
            raise ConfigError("a Core ML recipe compresses every package with one scheme: use --decoder-quant "
                              f"({' | '.join(names('coremltools'))}), not --embedding-quant/--vision-quant")
        if "text_decoder" in chosen:
            recipe["compression"] = chosen["text_decoder"]
        if group_size is not None:
            recipe["block_size"] = group_size
        return
    if fmt == "gguf":
        if set(chosen) - {"text_decoder"} or group_size is not None:
            raise ConfigError("a GGUF recipe quantizes the text model with one llama.cpp type: use --decoder-quant "
                              f"({' | '.join(names('llamacpp', 'text_decoder'))}); the mmproj stays f16 and llama.cpp "
                              "fixes the block sizes")
        if "text_decoder" in chosen:
            recipe["quantization"] = chosen["text_decoder"]
        return
    if fmt == "onnx":
        spec = onnx_mapping(recipe.get("quantization"))
        for part, name in chosen.items():
            spec[part] = {**spec[part], "scheme": name} if isinstance(spec[part], dict) else name
        if group_size is not None:
            spec["text_decoder"]["block_size"] = group_size
        recipe["quantization"] = spec
        return
    quant = recipe.get("quantization")
    quant = {p: (dict(v) if isinstance(v, dict) else {"scheme": v}) for p, v in (quant or {}).items()} \
        if isinstance(quant, dict) or quant is None else quant
    recipe["quantization"] = quant
    if not isinstance(quant, dict):
        return
    for part, name in chosen.items():
        quant[part] = {**quant.get(part, {}), "scheme": name}
    if group_size is not None:
        for part in ("text_decoder", "token_embedding"):
            quant.setdefault(part, {})["group_size"] = group_size
