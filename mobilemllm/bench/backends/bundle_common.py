"""What every bundle backend reads from a bundle: manifest, config, tokenizer, the benchmark prompt in the
manifest's own layout, and the case description (size, quantization, bytes read per decoded token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobilemllm.bench import timing
from mobilemllm.bench.backends import DEFAULT_FOR_FORMAT
from mobilemllm.bench.harness import CaseInfo
from mobilemllm.bench.prompt import BenchPrompt, build_prompt, check_context, filler_ids
from mobilemllm.bundle import QUESTION, load_manifest
from mobilemllm.config import ModelConfig
from mobilemllm.errors import UserError


def read_bundle(path: str | Path, expect_format: str) -> dict[str, Any]:
    manifest = load_manifest(path)
    if manifest["format"] != expect_format:
        raise UserError(f"{path} is a {manifest['format']} bundle; this backend reads {expect_format} bundles "
                        f"(use --backend {DEFAULT_FOR_FORMAT.get(manifest['format'], '?')} for it)")
    return manifest


def bundle_config(manifest: dict[str, Any]):
    return ModelConfig.from_dict(manifest["model"]["config"])


def quant_label(manifest: dict[str, Any], part: str = "text_decoder") -> str:
    q = (manifest.get("quantization") or {}).get(part) or {}
    scheme = q.get("scheme", "fp32")
    gs = q.get("group_size")
    return f"{scheme}/g{gs}" if gs and scheme not in ("fp32", "fp16") else scheme


def bundle_prompt(manifest: dict[str, Any], tokenizer, text_tokens: int, filler_index: int = 0) -> BenchPrompt:
    """The benchmark prompt in the manifest's segment layout: [BOS] text <image> filler... text."""
    segs = manifest["prompt"]["segments"]
    at = next((i for i, s in enumerate(segs) if s["type"] == "image"), None)
    if at is None:
        raise UserError("the bundle's prompt has no image segment; the benchmark needs a multimodal bundle")
    before = "".join(s["text"] for s in segs[:at] if s["type"] == "text").replace(QUESTION, "")
    after = "".join(s["text"] for s in segs[at + 1:] if s["type"] == "text").replace(QUESTION, "")
    fillers = filler_ids(tokenizer, manifest["tokenizer"]["vocab_size"])
    bos = manifest["tokenizer"]["bos_id"] if manifest["prompt"]["add_bos"] else None
    return build_prompt(text_tokens, manifest["prompt"]["num_visual_tokens"], tokenizer=tokenizer,
                        prefix_text=before, suffix_text=after, bos_id=bos,
                        filler=fillers[filler_index % len(fillers)])


def case_info(path: str | Path, manifest: dict[str, Any]) -> CaseInfo:
    return CaseInfo(model_name=manifest["model"]["name"], format=manifest["format"], quantization=quant_label(manifest),
                    size_bytes=timing.size_on_disk(path), max_context=manifest["context"]["max_context_len"],
                    num_visual_tokens=manifest["prompt"]["num_visual_tokens"],
                    notes=[] if manifest["parity"]["passed"] else ["bundle failed parity at export (--force)"])


def check_fits(manifest: dict[str, Any], prompt: BenchPrompt, new_tokens: int, path: str) -> None:
    check_context(prompt, new_tokens, manifest["context"]["max_context_len"], f"bundle {path}")
