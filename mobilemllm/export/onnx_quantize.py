"""Quantization of ONNX graph files with ONNX Runtime's tools: ``int8`` (``quantize_dynamic``, MatMul and
Gather weights) and ``int4`` (``MatMulNBits``, weight-only, symmetric, per block). The schemes, block
sizes and parity gates are the registry's ``onnxruntime`` quantizer (:mod:`mobilemllm.quantization`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobilemllm import quantization as Q
from mobilemllm.bundle.layout import GRAPH_FILES
from mobilemllm.errors import ConfigError
from mobilemllm.export import onnx_graphs as G


@dataclass(frozen=True)
class OnnxQuantization:
    """What to quantize: a scheme per graph part, and the 4-bit block size."""

    vision_encoder: str = "fp32"
    token_embedding: str = "fp32"
    text_decoder: str = "fp32"
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = fp32

    @classmethod
    def from_plan(cls, plan: Q.Plan) -> "OnnxQuantization":
        """From the registry's checked plan of an ONNX recipe."""
        return cls(**{p: plan.scheme(p) for p in GRAPH_FILES}, block_size=plan.group_size("text_decoder"),
                   accuracy_level=plan.accuracy_level)

    def scheme(self, part: str) -> str:
        return getattr(self, part)

    def summary(self) -> str:
        return "/".join(self.scheme(p) for p in GRAPH_FILES)

    @property
    def strongest(self) -> str:
        """The most lossy scheme used anywhere (picks the parity gate)."""
        return min((self.scheme(p) for p in GRAPH_FILES), key=lambda s: Q.scheme("onnxruntime", s).weight_bits)

    def to_recipe(self) -> dict[str, Any]:
        """The recipe ``quantization`` mapping that reads back as this."""
        return {"vision_encoder": self.vision_encoder, "token_embedding": self.token_embedding,
                "text_decoder": {"scheme": self.text_decoder, "block_size": self.block_size},
                "accuracy_level": self.accuracy_level}

    def to_manifest(self) -> dict[str, dict[str, Any]]:
        out = {}
        for part in GRAPH_FILES:
            s = Q.scheme("onnxruntime", self.scheme(part))
            entry: dict[str, Any] = {"scheme": s.manifest_name or s.name,
                                     "group_size": self.block_size if s.grouped else None}
            if s.tool:
                entry["backend"] = s.tool
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
    recipe: dict[str, Any] = {"format": "onnx", "quantization": spec}
    if block_size is not None:
        recipe["quantization"] = {**Q.onnx_mapping(spec), "block_size": block_size}
    errors = Q.check(recipe)
    if errors:
        raise ConfigError("invalid ONNX quantization: " + "; ".join(errors))
    return OnnxQuantization.from_plan(Q.resolve(recipe))


class _quiet_root_logger:
    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def quantize_graph(src: Path, dst: Path, scheme: str, q: OnnxQuantization) -> None:
    """Quantize one graph file ``src`` into ``dst`` (a different path) with ``scheme``."""
    if scheme == "fp32":
        if src != dst:
            shutil.copyfile(src, dst)
        return
    large = src.stat().st_size > G.EXTERNAL_DATA_BYTES or Path(str(src) + ".data").exists()
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
    raise ConfigError(f"unknown ONNX quantization {scheme!r}; valid: {', '.join(Q.names('onnxruntime'))}")


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
