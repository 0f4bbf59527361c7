"""The ONNX bundle's decoder from ONNX Runtime GenAI's model builder (``decoder: genai``): fused
GroupQueryAttention / SkipSimplifiedLayerNorm / MatMulNBits graphs instead of our ``torch.onnx`` export,
plus the ``genai_config.json`` that ONNX Runtime GenAI's runtime reads."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mobilemllm.bundle.layout import GRAPH_FILES, IMAGE_TOKEN_ID
from mobilemllm.errors import ConfigError, UserError

DECODER_BUILDERS = ("auto", "torch", "genai")  # auto: genai when installed and the LLM is a LLaMA, else torch


def genai_available() -> bool:
    # find_spec, not import: importing the builder configures the root logger at INFO level

    return importlib.util.find_spec("onnxruntime_genai") is not None


def resolve_decoder_builder(choice: str, model, log: Callable[[str], None] = lambda s: None) -> str:
    """``auto`` -> ``genai`` where ONNX Runtime GenAI's builder is installed and fits the LLM, else ``torch``."""
    if choice != "auto":
        return choice
    if type(model.llm).__name__ != "LlamaForCausalLM":
        log("decoder: auto -> torch (ONNX Runtime GenAI's builder is used for LLaMA decoders only)")
        return "torch"
    if not genai_available():
        log("decoder: auto -> torch (install onnxruntime-genai for the fused GroupQueryAttention decoder: "
            "pip install 'mobilemllm[genai]')")
        return "torch"
    log("decoder: auto -> genai (ONNX Runtime GenAI's model builder)")
    return "genai"


def build_genai_decoder(model, tokenizer, q, work: Path,
                        log: Callable[[str], None] = lambda s: None) -> tuple[Path, dict[str, Any]]:
    """``decoder.onnx`` from ONNX Runtime GenAI's model builder, run on a local transformers folder of our LLM.

    The builder emits fused GroupQueryAttention / SkipSimplifiedLayerNorm / MatMulNBits graphs. With
    ``exclude_embeds`` the decoder takes ``inputs_embeds`` (our three-graph design), and with
    ``prune_lm_head`` it returns only the last position's logits, like our own exporter. Its int4/int8
    precisions are weight-only MatMulNBits (symmetric, ``q.block_size``). Returns (path, genai_config).
    """
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
    out = copy.deepcopy(builder_config)
    model = out.setdefault("model", {})
    model.setdefault("decoder", {})["filename"] = GRAPH_FILES["text_decoder"]
    model["context_length"] = cfg.llm.max_position_embeddings
    model["mobilemllm"] = {
        "vision": {"filename": GRAPH_FILES["vision_encoder"], "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_embeds"}},
        "embedding": {"filename": GRAPH_FILES["token_embedding"], "inputs": {"input_ids": "input_ids"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}},
        "image_token_id": IMAGE_TOKEN_ID,
        "num_image_tokens": cfg.num_visual_tokens,
    }
    out.setdefault("search", {})["max_length"] = cfg.llm.max_position_embeddings
    return out
