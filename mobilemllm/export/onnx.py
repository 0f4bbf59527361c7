"""The ONNX format: three graphs (``vision.onnx``, ``embed.onnx``, ``decoder.onnx``) the way ONNX Runtime
GenAI ships vision-language models, int8 / 4-bit weight quantization, and parity against eager.

One concern per module: :mod:`.onnx_graphs` writes the fp32 graphs (``torch.onnx``, dynamo, opset 18)
and reads them back, :mod:`.onnx_quantize` quantizes the files (ONNX Runtime's tools),
:mod:`.onnx_genai` builds a fused decoder with ONNX Runtime GenAI's model builder (``decoder: genai``),
:mod:`.onnx_parity` measures the bundle against eager through the runtime's ONNX runner. This module is
the format plug-in the export pipeline runs (:class:`OnnxFormat`); export with
:func:`mobilemllm.export.pipeline.export_bundle` (``export_bundle(model, recipe, out, fp32_graphs=...)``:
graphs from :func:`.onnx_graphs.export_graphs` let several quantized bundles share one export).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mobilemllm.bundle.layout import GRAPH_FILES
from mobilemllm.errors import BackendUnavailable
from mobilemllm.export.modules import VisionEncoder
from mobilemllm.export.onnx_genai import (DECODER_BUILDERS, build_genai_decoder, genai_available,
                                          genai_config_for_bundle, resolve_decoder_builder)
from mobilemllm.export.onnx_graphs import OPSET, graph_io, graph_modules, size_of, write_graphs
from mobilemllm.export.onnx_parity import measure_parity
from mobilemllm.export.onnx_quantize import OnnxQuantization, quantize_graphs
from mobilemllm.export.plugin import PARITY_KEYS, ExportFormat, Job
from mobilemllm.runtime.onnx_runner import OnnxRunner

RECIPE_KEYS = ("name", "format", "description", "quantization", "parity", "decoder")
GENAI_CONFIG = "genai_config.json"


class VisionGraph(VisionEncoder):
    """``vision.onnx``'s module: uint8 views (V, 3, S, S) -> image embeddings (1, V*T, D)."""

    def __init__(self, model):
        super().__init__(model, stacked=False)


class OnnxFormat(ExportFormat):
    """Three graphs: exported fp32 (or the decoder from GenAI's builder), then quantized as files."""

    name = "onnx"
    label = "ONNX"
    recipe_keys = RECIPE_KEYS
    parity_keys = PARITY_KEYS
    default_target = "onnx"

    def check(self, recipe: dict[str, Any]) -> list[str]:
        builder = recipe.get("decoder", "torch")
        return [] if builder in DECODER_BUILDERS else [
            f"decoder must be one of {', '.join(DECODER_BUILDERS)}, got {builder!r}"]

    def require(self, recipe: dict[str, Any]) -> None:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"the ONNX target needs onnx, onnxscript and onnxruntime ({e})") from None
        if recipe.get("decoder") == "genai" and not genai_available():
            raise BackendUnavailable("decoder: genai needs ONNX Runtime GenAI's model builder: "
                                     "pip install 'onnxruntime-genai==0.18.*' (or use decoder: torch)")

    def prepare(self, job: Job) -> None:
        job.state["q"] = OnnxQuantization.from_plan(job.plan)
        job.state["builder"] = resolve_decoder_builder(job.recipe.get("decoder", "torch"), job.model, job.log)
        job.state["parts"] = tuple(p for p in GRAPH_FILES
                                   if not (p == "text_decoder" and job.state["builder"] == "genai"))

    def modules(self, job: Job) -> dict[str, Any]:
        given = job.options.get("fp32_graphs") or {}
        return graph_modules(job.model, tuple(p for p in job.state["parts"] if p not in given))

    def convert(self, job: Job, modules: dict[str, Any]) -> None:
        """fp32 graphs into a work folder inside the staging folder (given ones copied), and the GenAI decoder."""
        work = job.staging / "_fp32"
        paths = write_graphs(job.model, modules, work, job.log)
        for part, src in (job.options.get("fp32_graphs") or {}).items():
            if part in job.state["parts"]:
                paths[part] = work / Path(src).name
                shutil.copyfile(src, paths[part])
                if Path(str(src) + ".data").exists():
                    shutil.copyfile(str(src) + ".data", str(paths[part]) + ".data")
        job.state["work"], job.state["fp32"] = work, paths
        if job.state["builder"] == "genai":
            job.state["genai"] = build_genai_decoder(job.model, job.tokenizer, job.state["q"], work, log=job.log)

    def quantize_files(self, job: Job) -> None:
        """Each graph as its scheme says (the GenAI decoder is quantized by its builder), into the bundle."""
        q = job.state["q"]
        if q.strongest != "fp32":
            job.log(f"quantizing: {q.summary()} (vision/embed/decoder), 4-bit block size {q.block_size}")
        paths = quantize_graphs(job.state["fp32"], job.staging, q)
        qinfo = q.to_manifest()
        if job.state["builder"] == "genai":
            built, builder_config = job.state["genai"]
            paths["text_decoder"] = job.staging / GRAPH_FILES["text_decoder"]
            os.replace(built, paths["text_decoder"])
            os.replace(str(built) + ".data", str(paths["text_decoder"]) + ".data")
            config = genai_config_for_bundle(builder_config, job.model.config)
            (job.staging / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
            if q.text_decoder != "fp32":
                qinfo["text_decoder"].update({"scheme": f"{q.text_decoder}_weight", "group_size": q.block_size,
                                              "backend": "onnxruntime_genai.models.builder (MatMulNBits)"})
        shutil.rmtree(job.state["work"])
        job.state["paths"] = {part: paths[part] for part in GRAPH_FILES}
        job.qinfo = qinfo

    def manifest(self, job: Job) -> dict[str, Any]:
        cfg = job.model.config
        graphs = {part: {"file": p.name, **graph_io(p)} for part, p in job.state["paths"].items()}
        if job.state["builder"] == "genai":
            graphs["text_decoder"]["builder"] = "onnxruntime-genai model builder"
        return {"graphs": graphs,
                "export": {"backend": "onnxruntime", "decoder_builder": job.state["builder"], "opset": OPSET,
                           "kv_cache": {"layers": cfg.llm.num_layers, "heads": cfg.llm.kv_heads,
                                        "head_dim": cfg.llm.head_dim, "layout": "BHSD"}}}

    def parity(self, job: Job, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
        runner = OnnxRunner(job.staging, job.model.config, job.tokenizer)
        par = job.parity_recipe
        return measure_parity(job.model, job.tokenizer, runner, job.state["q"].strongest,
                              num_tokens=int(par.get("greedy_tokens", 16)), overrides=par), None

    def roles(self, job: Job) -> dict[str, str]:
        roles = {p.name: "graph" for p in job.state["paths"].values()}
        roles[GENAI_CONFIG] = "other"
        roles.update({p.name + ".data": "weights" for p in job.state["paths"].values()})
        return roles

    def files_summary(self, job: Job, out: Path) -> str:
        return ", ".join(f"{p.name} {size_of(out / p.name) / 1e6:.1f} MB" for p in job.state["paths"].values())

    def quant_summary(self, job: Job) -> str:
        return job.state["q"].summary()
