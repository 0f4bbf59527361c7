"""The ONNX bundle's three fp32 graphs, written with ``torch.onnx.export(..., dynamo=True, opset 18)`` from
export-ready modules that share the model's weights:

- ``vision.onnx``: uint8 image views (V, 3, S, S) -> image embeddings (1, V*T, D); scaling by 1/255 and
  the tower's mean/std inside (:class:`mobilemllm.export.modules.VisionEncoder`).
- ``embed.onnx``: token ids (1, n) -> embeddings (1, n, D); image placeholder ids (-200) read row 0 (the
  runner overwrites those rows with the image embeddings).
- ``decoder.onnx`` (:class:`DecoderGraph`): inputs_embeds (1, n, D), attention_mask (1, past+n),
  position_ids (1, n) and ``past_key_values.{i}.key/value`` (1, H, past, hd) -> ``logits`` of the last
  position (1, 1, V) and ``present.{i}.key/value`` (1, H, past+n, hd). Dynamic n and past: one graph
  for prefill and decode. Only the last position's logits leave the graph: the runner never needs the
  others, and skipping the vocabulary projection for every prompt token shortens time to first token.

Also what the manifest and the tests read back from a graph file (inputs/outputs, operator counts).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.export import Dim

from mobilemllm.bundle.layout import GRAPH_FILES
from mobilemllm.export.modules import TokenEmbedding, VisionEncoder
from mobilemllm.models.llm import cache_kwargs, output_cache

OPSET = 18
# Graphs above this size are written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class DecoderGraph(nn.Module):
    """One decoder step over flat past key/values, rebuilt into transformers' DynamicCache."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

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


def graph_modules(model, parts: tuple[str, ...] = tuple(GRAPH_FILES)) -> dict[str, nn.Module]:
    """The export-ready module of each graph part in ``parts`` (sharing ``model``'s weights)."""
    makers = {"vision_encoder": lambda: VisionEncoder(model, stacked=False),
              "token_embedding": lambda: TokenEmbedding(model.llm.get_input_embeddings(), clamp_negative=True),
              "text_decoder": lambda: DecoderGraph(model.llm)}
    return {part: makers[part]().eval() for part in GRAPH_FILES if part in parts}


def write_graphs(model, modules: dict[str, nn.Module], out_dir: str | Path,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
    """Write each module of :func:`graph_modules` as its graph file in ``out_dir``; returns {part: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {"vision_encoder": _vision_args, "token_embedding": _embed_args, "text_decoder": _decoder_args}
    paths = {}
    for part, module in modules.items():
        t0 = time.perf_counter()
        paths[part] = out_dir / GRAPH_FILES[part]
        args, inputs, outputs, dynamic = writers[part](model.config)
        _export(module, args, paths[part], inputs, outputs, dynamic, _bytes_of(module) > EXTERNAL_DATA_BYTES)
        log(f"{GRAPH_FILES[part]} written ({time.perf_counter() - t0:.1f} s)")
    return paths


def export_graphs(model, out_dir: str | Path, log: Callable[[str], None] = lambda s: None,
                  parts: tuple[str, ...] = tuple(GRAPH_FILES)) -> dict[str, Path]:
    """Write the fp32 graphs (``parts``, default all three) of ``model`` into ``out_dir``; returns {part: path}.

    Several quantized bundles of one model can share them (``export_bundle(..., fp32_graphs=...)``)."""
    model = model.float().eval()
    return write_graphs(model, graph_modules(model, parts), out_dir, log)


def _vision_args(cfg):
    v = cfg.vision
    pixels = torch.randint(0, 256, (v.num_views, 3, v.image_size, v.image_size), dtype=torch.uint8)
    return (pixels,), ["pixel_values"], ["image_embeds"], None


def _embed_args(cfg):
    n = Dim("sequence_length", min=1, max=cfg.llm.max_position_embeddings)
    return (torch.tensor([[1, 5, 7, 2, 3]]),), ["input_ids"], ["inputs_embeds"], {"input_ids": {1: n}}


def _decoder_args(cfg):
    ctx = cfg.llm.max_position_embeddings
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
    inputs = ["inputs_embeds", "attention_mask", "position_ids"] + past_names(layers)
    return args, inputs, ["logits"] + present_names(layers), dyn


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: Any, large: bool) -> None:
    onnx_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" per export: noise here
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
                                     input_names=input_names, output_names=output_names, verbose=False,
                                     external_data=large, optimize=True)
        finally:
            onnx_log.setLevel(level)
        if prog is None:  # pragma: no cover - dynamo=True always returns a program
            raise RuntimeError("torch.onnx.export returned nothing")
        prog.save(str(path), external_data=large)


def _bytes_of(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---- reading a graph file back -------------------------------------------------------------------------
def size_of(path: Path) -> int:
    """A graph's bytes, with its external data file."""
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
