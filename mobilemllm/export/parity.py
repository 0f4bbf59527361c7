"""Parity metrics shared by every exporter and runner: exported vs eager logits and greedy tokens.

- :func:`max_rel_diff`: ``max|a - b| / max|b|`` -- the largest error relative to the reference's scale
  (element-wise relative error is meaningless for logits near zero).
- :func:`logit_cosine`: mean cosine similarity of the logit rows.
- :func:`greedy_agreement`: fraction of positions where two greedy token sequences agree, counted up to
  the first divergence (after that the contexts differ and the comparison means nothing).

And the references the exporters compare against: fixed test images (:func:`parity_image`,
:func:`scene_image`) and the eager model's greedy tokens with their logits (:func:`eager_reference`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mobilemllm.data.images import preprocess


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().float().cpu()


def max_rel_diff(actual, reference) -> float:
    a, b = _as_tensor(actual), _as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    scale = b.abs().max().clamp(min=1e-12)
    return float((a - b).abs().max() / scale)


def logit_cosine(actual, reference) -> float:
    a, b = _as_tensor(actual), _as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def first_divergence(actual: Sequence[int], reference: Sequence[int]) -> int:
    """Index of the first differing token (len of the shorter one if one is a prefix of the other)."""
    n = min(len(actual), len(reference))
    for i in range(n):
        if int(actual[i]) != int(reference[i]):
            return i
    return n


def greedy_agreement(actual: Sequence[int], reference: Sequence[int]) -> float:
    """Matching prefix length / reference length (1.0 = identical)."""
    if not reference:
        return 1.0 if not actual else 0.0
    if list(map(int, actual)) == list(map(int, reference)):
        return 1.0
    return first_divergence(actual, reference) / len(reference)


def check(name: str, value: Any, threshold: Any = None, passed: bool | None = None) -> dict[str, Any]:
    """One entry of ``manifest["parity"]["checks"]``; ``passed=None`` means reported, not gated."""
    if isinstance(value, float):
        value = float(f"{value:.6g}")
    return {"name": name, "value": value, "threshold": threshold, "passed": passed}


def summarize(checks: list[dict[str, Any]], forced: bool = False, skipped_reason: str | None = None) -> dict[str, Any]:
    """``manifest["parity"]``: passed when no gated check failed."""
    passed = all(c["passed"] is not False for c in checks)
    return {"passed": passed, "forced": bool(forced and not passed), "skipped_reason": skipped_reason,
            "checks": checks}


def failures(parity: dict[str, Any]) -> list[str]:
    return [f"{c['name']} = {c['value']} (needs {c['threshold']})" for c in parity["checks"] if c["passed"] is False]


# ---- references -------------------------------------------------------------------------------------
def parity_image(vision_cfg, seed: int = 0):
    """A deterministic test image (smooth gradients plus noise) at the encoder's size (ONNX, Core ML)."""
    s = vision_cfg.image_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
    base = np.stack([xx, yy, 1 - xx * yy], -1) * 200
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def scene_image(cfg):
    """A fixed image of coloured shapes on a grey background (ExecuTorch, QNN calibration's first scene)."""
    s = max(cfg.vision.image_size, 32)
    img = Image.new("RGB", (s, s), (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle([s // 8, s // 8, s // 2, s // 2], fill=(220, 40, 40))
    d.ellipse([s // 2, s // 2, 7 * s // 8, 7 * s // 8], fill=(40, 40, 220))
    return img


@torch.inference_mode()
def eager_reference(model, ids: list[int], image, num_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Eager greedy tokens after ``ids`` and the logits (num_tokens, V) that chose each of them."""
    pix = preprocess(image, model.config.vision).unsqueeze(0)
    tokens = model.generate(torch.tensor([ids]), pix, max_new_tokens=num_tokens, eos_ids=())
    full = torch.tensor([ids + tokens[:-1]])
    logits = model(full, pix).logits[0, len(ids) - 1:].float()
    return logits, tokens
