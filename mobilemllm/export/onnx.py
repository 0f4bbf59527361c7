"""ONNX export: three graphs (``vision.onnx``, ``embed.onnx``, ``decoder.onnx``) the way ONNX Runtime
GenAI ships vision-language models, plus int8 / 4-bit weight quantization and parity against eager.

- ``vision.onnx``: uint8 image views (V, 3, S, S) -> image embeddings (1, V*T, D). Scaling by 1/255
  and the tower's mean/std happen inside the graph, so an app only resizes/pads (see the manifest).
- ``embed.onnx``: token ids (1, n) -> embeddings (1, n, D). Image placeholder ids (-200) are clamped
  to 0 inside the graph; the runner overwrites those rows with the image embeddings.
- ``decoder.onnx``: inputs_embeds (1, n, D), attention_mask (1, past+n), position_ids (1, n) and
  ``past_key_values.{i}.key/value`` (1, H, past, hd) -> ``logits`` of the last position (1, 1, V)
  and ``present.{i}.key/value`` (1, H, past+n, hd). Dynamic n and past: one graph for prefill and
  decode. Only the last position's logits leave the graph: the runner never needs the others, and
  skipping the vocabulary projection for every prompt token shortens time to first token.

All three are ``torch.onnx.export(..., dynamo=True, opset 18)`` of thin wrappers around our
``MobileVLM`` parts, so they carry the same weights the eager model runs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mobilemllm.errors import ConfigError, UserError
from mobilemllm.export.modules import TokenEmbedding, VisionEncoder

OPSET = 18
from mobilemllm.bundle.layout import GRAPH_FILES  # noqa: E402,F401  (re-exported for export code)
# Graphs above this size are written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000

# Schemes (fp32 | int8 | int4), their block sizes and parity gates: the registry's ``onnxruntime``
# quantizer (mobilemllm.quantization). fp32 must match eager; quantized graphs are held to the scheme's
# logit-cosine gate. A recipe's ``parity: {max_rel_diff: ..., min_logit_cosine: ...}`` overrides these.
FP32_GATES = {"max_rel_diff": 1e-4, "min_greedy_agreement": 1.0}


def parity_gates(scheme: str) -> dict[str, Any]:
    """The parity gates of the most lossy scheme in a bundle."""
    from mobilemllm import quantization as Q

    gates = {"min_cosine": Q.scheme("onnxruntime", scheme).parity_cosine, "min_greedy_agreement": None}
    return {**gates, **FP32_GATES} if scheme == "fp32" else gates


PARITY_KEYS = ("greedy_tokens", "max_rel_diff", "min_logit_cosine")


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# ---- export-ready wrappers (vision and embedding: mobilemllm.export.modules) ---------------------------
class VisionGraph(VisionEncoder):
    """uint8 views (V, 3, S, S) -> image embeddings (1, V*T, D), normalisation inside."""

    def __init__(self, model):
        super().__init__(model, stacked=False)


class DecoderGraph(nn.Module):
    """One decoder step over flat past key/values, rebuilt into transformers' DynamicCache."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

        from mobilemllm.models.llm import cache_kwargs, output_cache

        cache = DynamicCache()
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids, **cache_kwargs(cache), use_cache=True)
        logits = self.llm.lm_head(out.last_hidden_state[:, -1:, :])
        present = []
        for layer in output_cache(out).layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


# ---- export -------------------------------------------------------------------------------------
def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: Any, large: bool) -> None:
    import logging
    import warnings

    onnx_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" per export: noise here
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = _export_program(module, args, input_names, output_names, dynamic_shapes, large)
        finally:
            onnx_log.setLevel(level)
        if prog is None:  # pragma: no cover - dynamo=True always returns a program
            raise RuntimeError("torch.onnx.export returned nothing")
        prog.save(str(path), external_data=large)


def _export_program(module, args, input_names, output_names, dynamic_shapes, large):
    return torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                             input_names=input_names, output_names=output_names, verbose=False,
                             external_data=large, optimize=True)


def _bytes_of(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graphs(model, out_dir: str | Path, log: Callable[[str], None] = lambda s: None,
                  parts: tuple[str, ...] = tuple(GRAPH_FILES)) -> dict[str, Path]:
    """Write the fp32 graphs (``parts``, default all three) of ``model`` into ``out_dir``; returns {part: path}."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model = model.float().eval()
    paths = {part: out_dir / name for part, name in GRAPH_FILES.items() if part in parts}
    ctx = cfg.llm.max_position_embeddings
    views, size = cfg.vision.num_views, cfg.vision.image_size

    if "vision_encoder" in parts:
        _export_vision(model, paths["vision_encoder"], views, size, log)
    if "token_embedding" in parts:
        _export_embed(model, paths["token_embedding"], ctx, log)
    if "text_decoder" in parts:
        _export_decoder(model, paths["text_decoder"], ctx, log)
    return paths


def _export_vision(model, path: Path, views: int, size: int, log) -> None:
    t0 = time.perf_counter()
    vision = VisionGraph(model).eval()
    pixels = torch.randint(0, 256, (views, 3, size, size), dtype=torch.uint8)
    _export(vision, (pixels,), path, ["pixel_values"], ["image_embeds"], None, _bytes_of(vision) > EXTERNAL_DATA_BYTES)
    log(f"vision.onnx written ({time.perf_counter() - t0:.1f} s)")


def _export_embed(model, path: Path, ctx: int, log) -> None:
    from torch.export import Dim

    t0 = time.perf_counter()
    n = Dim("sequence_length", min=1, max=ctx)
    embed = TokenEmbedding(model.llm.get_input_embeddings(), clamp_negative=True).eval()
    _export(embed, (torch.tensor([[1, 5, 7, 2, 3]]),), path, ["input_ids"], ["inputs_embeds"],
            {"input_ids": {1: n}}, _bytes_of(embed) > EXTERNAL_DATA_BYTES)
    log(f"embed.onnx written ({time.perf_counter() - t0:.1f} s)")


def _export_decoder(model, path: Path, ctx: int, log) -> None:
    from torch.export import Dim

    cfg = model.config
    t0 = time.perf_counter()
    layers, heads, hd = cfg.llm.num_layers, cfg.llm.kv_heads, cfg.llm.head_dim
    seq = Dim("sequence_length", min=1, max=ctx)
    past_len = Dim("past_sequence_length", min=0, max=ctx - 1)
    total = Dim("total_sequence_length", min=1, max=ctx)
    s, p = 5, 3  # example sizes other than 0/1 so the exporter keeps them symbolic
    past = [(torch.randn(1, heads, p, hd), torch.randn(1, heads, p, hd)) for _ in range(layers)]
    args = (torch.randn(1, s, cfg.llm.hidden_size), torch.ones(1, p + s, dtype=torch.int64),
            torch.arange(p, p + s).unsqueeze(0), past)
    dyn = {"inputs_embeds": {1: seq}, "attention_mask": {1: total}, "position_ids": {1: seq},
           "past": [({2: past_len}, {2: past_len}) for _ in range(layers)]}
    decoder = DecoderGraph(model.llm).eval()
    _export(decoder, args, path, ["inputs_embeds", "attention_mask", "position_ids"]
            + past_names(layers), ["logits"] + present_names(layers), dyn, _bytes_of(decoder) > EXTERNAL_DATA_BYTES)
    log(f"decoder.onnx written ({time.perf_counter() - t0:.1f} s)")


# ---- quantization -------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnnxQuantization:
    """What to quantize: a scheme per graph part, and the 4-bit block size."""

    vision_encoder: str = "fp32"
    token_embedding: str = "fp32"
    text_decoder: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = fp32

    @classmethod
    def from_plan(cls, plan) -> "OnnxQuantization":
        """From the registry's checked :class:`mobilemllm.quantization.Plan` of an ONNX recipe."""
        return cls(**{p: plan.scheme(p) for p in GRAPH_FILES}, block_size=plan.group_size("text_decoder"),
                   accuracy_level=plan.accuracy_level)

    def scheme(self, part: str) -> str:
        return getattr(self, part)

    def summary(self) -> str:
        return "/".join(self.scheme(p) for p in GRAPH_FILES)

    @property
    def strongest(self) -> str:
        """The most lossy scheme used anywhere (picks the parity gate)."""
        used = {self.scheme(p) for p in GRAPH_FILES}
        return "int4" if "int4" in used else "int8" if "int8" in used else "fp32"

    def to_manifest(self) -> dict[str, dict[str, Any]]:
        from mobilemllm import quantization as Q

        out = {}
        for part in GRAPH_FILES:
            scheme = self.scheme(part)
            entry: dict[str, Any] = {"scheme": {"int8": "int8", "int4": "int4_weight"}.get(scheme, scheme),
                                     "group_size": self.block_size if scheme == "int4" else None}
            if scheme != "fp32":
                entry["backend"] = Q.scheme("onnxruntime", scheme).tool
            out[part] = entry
        return out


def parse_quantization(spec: Any, block_size: Any = None) -> OnnxQuantization:
    """A recipe's ``quantization`` value -> OnnxQuantization, with every problem reported together.

    ``spec`` is one scheme name (``int8``: every graph int8; ``int4``: the decoder 4-bit, vision and
    embedding fp32), or a mapping by part, as the other targets' recipes write it::

        quantization:
          text_decoder: {scheme: int4, block_size: 32}
          vision_encoder: {scheme: int8}
          token_embedding: fp32

    The registry (:func:`mobilemllm.quantization.resolve`) reads and checks it.
    """
    from mobilemllm import quantization as Q

    recipe: dict[str, Any] = {"format": "onnx", "quantization": spec}
    if block_size is not None:
        recipe["quantization"] = {**Q.onnx_mapping(spec), "block_size": block_size}
    errors = Q.check(recipe)
    if errors:
        raise ConfigError("invalid ONNX quantization: " + "; ".join(errors))
    return OnnxQuantization.from_plan(Q.resolve(recipe))


class _quiet_root_logger:
    def __enter__(self):
        import logging

        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        import logging

        logging.getLogger().setLevel(self.level)


def quantize_graph(src: Path, dst: Path, scheme: str, q: OnnxQuantization) -> None:
    """Quantize one graph file ``src`` into ``dst`` (a different path) with ``scheme``."""
    if scheme == "fp32":
        if src != dst:
            shutil.copyfile(src, dst)
        return
    large = src.stat().st_size > EXTERNAL_DATA_BYTES or Path(str(src) + ".data").exists()
    if scheme == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():  # onnxruntime logs "consider pre-processing" on the root logger
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
        return
    if scheme == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)

        cfg = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True,
                                           accuracy_level=q.accuracy_level, op_types_to_quantize=("MatMul",))
        quant = MatMulNBitsQuantizer(str(src), bits=4, block_size=q.block_size, is_symmetric=True,
                                     accuracy_level=q.accuracy_level, algo_config=cfg)
        with _quiet_root_logger():
            quant.process()
            quant.model.save_model_to_file(str(dst), use_external_data_format=large)
        return
    raise ConfigError(f"unknown ONNX quantization {scheme!r} for a graph file")


def quantize_graphs(fp32_paths: dict[str, Path], out_dir: Path, q: OnnxQuantization) -> dict[str, Path]:
    """Quantize each graph per ``q`` into ``out_dir`` (same file names); fp32 parts are moved as they are."""
    out: dict[str, Path] = {}
    for part, src in fp32_paths.items():
        dst = out_dir / src.name
        scheme = q.scheme(part)
        if scheme == "fp32":
            os.replace(src, dst)
            data = Path(str(src) + ".data")
            if data.exists():
                os.replace(data, Path(str(dst) + ".data"))
        else:
            quantize_graph(src, dst, scheme, q)
        out[part] = dst
    return out


def _size_of(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def count_ops(path: str | Path) -> dict[str, int]:
    """Operator histogram of an ONNX file (used by tests and the manifest to show what ran)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def graph_io(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs of an ONNX file as manifest tensor entries (name, dtype, shape with symbolic dims)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def entry(v) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


# ---- parity -------------------------------------------------------------------------------------
PARITY_QUESTION = "What is in the image?"


def parity_image(vision_cfg, seed: int = 0):
    """A deterministic test image (smooth gradients plus noise) at the encoder's size."""
    import numpy as np
    from PIL import Image

    s = vision_cfg.image_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1) * 200
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


@torch.inference_mode()
def eager_reference(model, ids: list[int], image, num_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Eager greedy tokens after ``ids`` and the logits (num_tokens, V) that chose each of them."""
    from mobilemllm.data.images import preprocess

    pix = preprocess(image, model.config.vision).unsqueeze(0)
    tokens = model.generate(torch.tensor([ids]), pix, max_new_tokens=num_tokens, eos_ids=())
    full = torch.tensor([ids + tokens[:-1]])
    logits = model(full, pix).logits[0, len(ids) - 1:].float()
    return logits, tokens


def onnx_teacher_forced(runner, ids: list[int], image, tokens: list[int]):
    """ONNX logits (len(tokens), V) when fed the reference tokens one by one after the prompt."""
    import numpy as np

    emb = runner.embed(ids, runner.encode_image(image))
    past = runner.empty_past()
    rows = []
    for tok in tokens:
        logits, past = runner.step(emb, past)
        rows.append(logits)
        emb = runner.embed([tok])
    return np.stack(rows)


def measure_parity(model, tokenizer, runner, scheme: str, num_tokens: int = 16,
                   overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Parity checks of an ONNX runner against the eager model, gated per :func:`parity_gates`."""
    from mobilemllm.data.images import preprocess, to_uint8_views
    from mobilemllm.export import parity
    from mobilemllm.inference import prompt_ids

    cfg = model.config
    image = parity_image(cfg.vision)
    ids = prompt_ids(cfg, tokenizer, PARITY_QUESTION)
    num_tokens = max(1, min(num_tokens, cfg.llm.max_position_embeddings - len(ids)))
    ref_logits, ref_tokens = eager_reference(model, ids, image, num_tokens)
    got_logits = torch.from_numpy(onnx_teacher_forced(runner, ids, image, ref_tokens))
    got_tokens, _, _ = runner.generate_ids(ids, image, max_new_tokens=num_tokens)
    with torch.inference_mode():
        ref_img = model.encode_images(preprocess(image, cfg.vision).unsqueeze(0))
    got_img = runner.vision.run(None, {"pixel_values": to_uint8_views(image, cfg.vision)})[0]

    gates = parity_gates(scheme)
    overrides = overrides or {}
    if "max_rel_diff" in overrides and scheme == "fp32":
        gates["max_rel_diff"] = float(overrides["max_rel_diff"])
    if "min_logit_cosine" in overrides and scheme != "fp32":
        gates["min_cosine"] = float(overrides["min_logit_cosine"])
    rel = parity.max_rel_diff(got_logits, ref_logits)
    cos = parity.logit_cosine(got_logits, ref_logits)
    agree = parity.greedy_agreement(got_tokens, ref_tokens)
    img_rel = parity.max_rel_diff(got_img, ref_img)
    checks = []
    g = gates.get("max_rel_diff")
    checks.append(parity.check("image_embedding_max_rel_diff", img_rel, g, None if g is None else img_rel <= g))
    checks.append(parity.check("logits_max_rel_diff", rel, g, None if g is None else rel <= g))
    g = gates.get("min_cosine")
    checks.append(parity.check("logit_cosine", cos, g, None if g is None else cos >= g))
    g = gates.get("min_greedy_agreement")
    checks.append(parity.check(f"greedy_agreement_{num_tokens}", agree, g, None if g is None else agree >= g))
    checks.append(parity.check("logits_max_abs_diff", float((got_logits - ref_logits).abs().max())))
    checks.append(parity.check("prompt_tokens", len(ids)))
    return checks


# ---- ONNX Runtime GenAI's model builder (fused decoder) ---------------------------------------------
DECODER_BUILDERS = ("auto", "torch", "genai")  # auto: genai when installed and the LLM is a LLaMA, else torch


def _genai_available() -> bool:
    # find_spec, not import: importing the builder configures the root logger at INFO level
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def resolve_decoder_builder(choice: str, model, log: Callable[[str], None] = lambda s: None) -> str:
    """``auto`` -> ``genai`` where ONNX Runtime GenAI's builder is installed and fits the LLM, else ``torch``."""
    if choice != "auto":
        return choice
    if type(model.llm).__name__ != "LlamaForCausalLM":
        log("decoder: auto -> torch (ONNX Runtime GenAI's builder is used for LLaMA decoders only)")
        return "torch"
    if not _genai_available():
        log("decoder: auto -> torch (install onnxruntime-genai for the fused GroupQueryAttention decoder: "
            "pip install 'mobilemllm[genai]')")
        return "torch"
    log("decoder: auto -> genai (ONNX Runtime GenAI's model builder)")
    return "genai"


def build_genai_decoder(model, tokenizer, q: OnnxQuantization, work: Path,
                        log: Callable[[str], None] = lambda s: None) -> tuple[Path, dict[str, Any]]:
    """``decoder.onnx`` from ONNX Runtime GenAI's model builder, run on a local transformers folder of our LLM.

    The builder emits fused GroupQueryAttention / SkipSimplifiedLayerNorm / MatMulNBits graphs. With
    ``exclude_embeds`` the decoder takes ``inputs_embeds`` (our three-graph design), and with
    ``prune_lm_head`` it returns only the last position's logits, like our own exporter. Its int4/int8
    precisions are weight-only MatMulNBits (symmetric, ``q.block_size``). Returns (path, genai_config).
    """
    import json
    import subprocess
    import sys

    arch = type(model.llm).__name__
    if arch != "LlamaForCausalLM":
        raise ConfigError(f"decoder: genai builds LLaMA decoders; this LLM is {arch}. Use decoder: torch")
    hf_dir, out_dir = work / "hf", work / "genai"
    model.llm.config.architectures = [arch]
    model.llm.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    precision = {"fp32": "fp32", "int8": "int8", "int4": "int4"}[q.text_decoder]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache"), "--extra_options",
           "exclude_embeds=true", "prune_lm_head=true", "hf_token=false", "filename=decoder.onnx"]
    if precision != "fp32":
        cmd += [f"block_size={q.block_size}", f"accuracy_level={q.accuracy_level}", "is_symmetric=true"]
    log(f"building the decoder with ONNX Runtime GenAI's model builder ({precision}, fused attention)")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (out_dir / "decoder.onnx").exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise UserError(f"ONNX Runtime GenAI's model builder failed (exit {proc.returncode}):\n{tail}\n"
                        "Use `decoder: torch` in the recipe for our own exporter")
    log(f"genai decoder built ({time.perf_counter() - t0:.1f} s)")
    config = json.loads((out_dir / "genai_config.json").read_text())
    return out_dir / "decoder.onnx", config


def genai_config_for_bundle(builder_config: dict[str, Any], cfg) -> dict[str, Any]:
    """The builder's genai_config.json, pointed at the bundle's files, with our vision/embedding graphs named.

    ONNX Runtime GenAI's runtime loads ``model.decoder`` as written by its own builder. Its multimodal
    pipelines (``model.vision``/``model.embedding``) are tied to model types it knows (phi3v, qwen2.5-vl, ...),
    so the two extra sections here document our graphs for apps; they are not a GenAI model type.
    """
    import copy

    out = copy.deepcopy(builder_config)
    model = out.setdefault("model", {})
    model.setdefault("decoder", {})["filename"] = GRAPH_FILES["text_decoder"]
    model["context_length"] = cfg.llm.max_position_embeddings
    model["mobilemllm"] = {
        "vision": {"filename": GRAPH_FILES["vision_encoder"], "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_embeds"}},
        "embedding": {"filename": GRAPH_FILES["token_embedding"], "inputs": {"input_ids": "input_ids"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "image_token_id": -200,
        "num_image_tokens": cfg.num_visual_tokens,
    }
    out.setdefault("search", {})["max_length"] = cfg.llm.max_position_embeddings
    return out


# ---- bundle -------------------------------------------------------------------------------------
def build_bundle(model, tokenizer, out_dir: str | Path, q: OnnxQuantization, *, target: str = "onnx",
                 recipe: dict[str, Any] | None = None, source: str | None = None, force: bool = False,
                 parity_tokens: int = 16, log: Callable[[str], None] = lambda s: None,
                 fp32_graphs: dict[str, Path] | None = None, decoder_builder: str = "torch") -> Path:
    """Export, quantize, check parity and write an ONNX bundle folder at ``out_dir`` (atomically).

    ``fp32_graphs`` (from :func:`export_graphs` of the same model) skips the export step: several
    quantized bundles of one model share one export (the benchmark and the tests do this).
    """
    from mobilemllm import bundle as bundle_mod
    from mobilemllm.export import manifest_sections as S
    from mobilemllm.export import parity
    from mobilemllm.runtime.onnx_runner import OnnxRunner

    if tokenizer is None:
        raise UserError("an ONNX bundle needs a tokenizer; export from a checkpoint folder that has tokenizer.json")
    bundle_mod.check_out_dir(out_dir)
    decoder_builder = resolve_decoder_builder(decoder_builder, model, log)
    t_start = time.perf_counter()
    staging = bundle_mod.new_bundle_dir(out_dir)
    try:
        work = staging / "_fp32"
        parts = tuple(p for p in GRAPH_FILES if not (p == "text_decoder" and decoder_builder == "genai"))
        if fp32_graphs is None:
            fp32 = export_graphs(model, work, log=log, parts=parts)
        else:
            work.mkdir()
            fp32 = {}
            for part, src in fp32_graphs.items():
                if part not in parts:
                    continue
                fp32[part] = work / Path(src).name
                shutil.copyfile(src, fp32[part])
                if Path(str(src) + ".data").exists():
                    shutil.copyfile(str(src) + ".data", str(fp32[part]) + ".data")
        genai_config = None
        if decoder_builder == "genai":
            built, builder_config = build_genai_decoder(model, tokenizer, q, work, log=log)
        if q.strongest != "fp32":
            log(f"quantizing: {q.summary()} (vision/embed/decoder), 4-bit block size {q.block_size}")
        paths = quantize_graphs(fp32, staging, q)  # the genai decoder is already quantized by its builder
        if decoder_builder == "genai":
            paths["text_decoder"] = staging / GRAPH_FILES["text_decoder"]
            os.replace(built, paths["text_decoder"])
            os.replace(str(built) + ".data", str(paths["text_decoder"]) + ".data")
            genai_config = genai_config_for_bundle(builder_config, model.config)
            (staging / "genai_config.json").write_text(json.dumps(genai_config, indent=4) + "\n")
        shutil.rmtree(work)
        tokenizer.save_pretrained(staging / bundle_mod.TOKENIZER_DIR)

        runner = OnnxRunner(staging, model.config, tokenizer)
        checks = measure_parity(model, tokenizer, runner, q.strongest, num_tokens=parity_tokens,
                                overrides=(recipe or {}).get("parity"))
        del runner
        result = parity.summarize(checks, forced=force)
        for c in checks:
            log(f"parity {c['name']}: {c['value']}" + (f" (needs {c['threshold']})" if c["threshold"] is not None
                                                        else ""))
        if not result["passed"] and not force:
            raise UserError("ONNX export failed parity against eager: " + "; ".join(parity.failures(result))
                            + ". Re-run with --force to write the bundle anyway")

        cfg = model.config
        ctx = cfg.llm.max_position_embeddings
        graphs = {part: {"file": p.name, **graph_io(p)} for part, p in paths.items()}
        quant_manifest = q.to_manifest()
        if decoder_builder == "genai":
            graphs["text_decoder"]["builder"] = "onnxruntime-genai model builder"
            entry = quant_manifest["text_decoder"]
            if q.text_decoder != "fp32":
                entry.update({"scheme": f"{q.text_decoder}_weight", "group_size": q.block_size,
                              "backend": "onnxruntime_genai.models.builder (MatMulNBits)"})
        manifest: dict[str, Any] = {
            "schema_version": bundle_mod.SCHEMA_VERSION,
            "format": "onnx",
            "target": target,
            "model": S.model_section(model, source),
            "graphs": graphs,
            "tokenizer": S.tokenizer_section(tokenizer, cfg.llm.vocab_size),
            "prompt": S.prompt_section(cfg, tokenizer),
            "preprocessing": S.preprocessing_section(cfg.vision, "uint8", True),
            "context": {"max_seq_len": ctx, "max_context_len": ctx},
            "quantization": quant_manifest,
            "parity": result,
            "export": {"recipe": dict(recipe or {"quantization": q.summary()}),
                       "seconds": round(time.perf_counter() - t_start, 2),
                       "versions": S.versions(), "backend": "onnxruntime",
                       "decoder_builder": decoder_builder,
                       "opset": OPSET, "kv_cache": {"layers": cfg.llm.num_layers, "heads": cfg.llm.kv_heads,
                                                    "head_dim": cfg.llm.head_dim, "layout": "BHSD"}},
        }
        roles = {p.name: "graph" for p in paths.values()}
        roles["genai_config.json"] = "other"
        roles.update({p.name + ".data": "weights" for p in paths.values()})
        sizes = ", ".join(f"{p.name} {_size_of(p) / 1e6:.1f} MB" for p in paths.values())
        out = bundle_mod.finish_bundle(staging, out_dir, manifest, roles)
        log(f"ONNX bundle ({q.summary()}) written to {out}: {sizes}; run it with "
            f"`mobilemllm generate --bundle {out} --image IMG --prompt TEXT`")
        return out
    except BaseException:
        bundle_mod.discard(staging)
        raise


# ---- the recipe entry point (mobilemllm export) ---------------------------------------------------
RECIPE_KEYS = ("name", "format", "description", "quantization", "parity", "decoder")


def preflight(recipe: dict[str, Any]) -> OnnxQuantization:
    """Check an ONNX recipe before any weights load; returns its quantization."""
    errors = []
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        errors.append(f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(RECIPE_KEYS)})")
    par = recipe.get("parity") or {}
    if not isinstance(par, dict) or set(par) - set(PARITY_KEYS):
        errors.append(f"parity takes only {', '.join(PARITY_KEYS)}")
    else:
        if not isinstance(par.get("greedy_tokens", 16), int) or par.get("greedy_tokens", 16) < 1:
            errors.append(f"parity.greedy_tokens must be a positive integer, got {par.get('greedy_tokens')!r}")
        for key in ("max_rel_diff", "min_logit_cosine"):
            if key in par and not isinstance(par[key], (int, float)):
                errors.append(f"parity.{key} must be a number, got {par[key]!r}")
    try:
        q = parse_quantization(recipe.get("quantization"))
    except ConfigError as e:
        errors.append(str(e))
        q = None
    builder = recipe.get("decoder", "torch")
    if builder not in DECODER_BUILDERS:
        errors.append(f"decoder must be one of {', '.join(DECODER_BUILDERS)}, got {builder!r}")
    if errors:
        raise ConfigError(f"invalid ONNX recipe {recipe.get('name', '')!r}: " + "; ".join(errors))
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        from mobilemllm.errors import BackendUnavailable

        raise BackendUnavailable(f"the ONNX target needs onnx, onnxscript and onnxruntime ({e})") from None
    if builder == "genai" and not _genai_available():
        from mobilemllm.errors import BackendUnavailable

        raise BackendUnavailable("decoder: genai needs ONNX Runtime GenAI's model builder: "
                                 "pip install 'onnxruntime-genai==0.18.*' (or use decoder: torch)")
    return q


def export_onnx(model, tokenizer, recipe: dict[str, Any], out_dir: str | Path, *, source: str | None = None,
                force: bool = False, log: Callable[[str], None] = print,
                fp32_graphs: dict[str, Path] | None = None) -> Path:
    """Export ``model`` to an ONNX bundle at ``out_dir`` as ``recipe`` says (see export/onnx.yaml)."""
    q = preflight(recipe)
    par = recipe.get("parity") or {}
    return build_bundle(model, tokenizer, out_dir, q, target=recipe.get("name", "onnx"), recipe=recipe,
                        source=source, force=force, parity_tokens=int(par.get("greedy_tokens", 16)), log=log,
                        fp32_graphs=fp32_graphs, decoder_builder=recipe.get("decoder", "torch"))
