"""Parity of an ONNX bundle against the eager model, run through the runtime's ONNX runner.

fp32 graphs must match eager (logits and image embeddings to a relative 1e-4, greedy tokens identical);
quantized graphs are held to the logit-cosine gate of their most lossy scheme (the registry's
``parity_cosine``), greedy agreement reported. A recipe's ``parity: {max_rel_diff, min_logit_cosine}``
overrides the gates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mobilemllm import quantization as Q
from mobilemllm.data.images import preprocess, to_uint8_views
from mobilemllm.export import parity as P
from mobilemllm.inference import prompt_ids

PARITY_QUESTION = "What is in the image?"
FP32_GATES = {"max_rel_diff": 1e-4, "min_greedy_agreement": 1.0}


def parity_gates(scheme: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gates for a bundle whose most lossy scheme is ``scheme``, with a recipe's overrides."""
    gates: dict[str, Any] = {"min_cosine": Q.scheme("onnxruntime", scheme).parity_cosine,
                             "min_greedy_agreement": None}
    if scheme == "fp32":
        gates.update(FP32_GATES)
    overrides = overrides or {}
    if "max_rel_diff" in overrides and scheme == "fp32":
        gates["max_rel_diff"] = float(overrides["max_rel_diff"])
    if "min_logit_cosine" in overrides and scheme != "fp32":
        gates["min_cosine"] = float(overrides["min_logit_cosine"])
    return gates


def onnx_teacher_forced(runner, ids: list[int], image, tokens: list[int]):
    """ONNX logits (len(tokens), V) when fed the reference tokens one by one after the prompt."""
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
    cfg = model.config
    image = P.parity_image(cfg.vision)
    ids = prompt_ids(cfg, tokenizer, PARITY_QUESTION)
    num_tokens = max(1, min(num_tokens, cfg.llm.max_position_embeddings - len(ids)))
    ref_logits, ref_tokens = P.eager_reference(model, ids, image, num_tokens)
    got_logits = torch.from_numpy(onnx_teacher_forced(runner, ids, image, ref_tokens))
    got_tokens, _, _ = runner.generate_ids(ids, image, max_new_tokens=num_tokens)
    with torch.inference_mode():
        ref_img = model.encode_images(preprocess(image, cfg.vision).unsqueeze(0))
    got_img = runner.vision.run(None, {"pixel_values": to_uint8_views(image, cfg.vision)})[0]

    gates = parity_gates(scheme, overrides)
    rel, cos = P.max_rel_diff(got_logits, ref_logits), P.logit_cosine(got_logits, ref_logits)
    agree, img_rel = P.greedy_agreement(got_tokens, ref_tokens), P.max_rel_diff(got_img, ref_img)
    g_rel, g_cos, g_agree = gates.get("max_rel_diff"), gates.get("min_cosine"), gates.get("min_greedy_agreement")
    return [
        P.check("image_embedding_max_rel_diff", img_rel, g_rel, None if g_rel is None else img_rel <= g_rel),
        P.check("logits_max_rel_diff", rel, g_rel, None if g_rel is None else rel <= g_rel),
        P.check("logit_cosine", cos, g_cos, None if g_cos is None else cos >= g_cos),
        P.check(f"greedy_agreement_{num_tokens}", agree, g_agree, None if g_agree is None else agree >= g_agree),
        P.check("logits_max_abs_diff", float((got_logits - ref_logits).abs().max())),
        P.check("prompt_tokens", len(ids)),
    ]
