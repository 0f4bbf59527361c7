"""Image handling: load with Pillow, convert to RGB, pad to square or resize, normalise.

Preprocessing is split in two so exported programs and apps agree with training:
1. ``to_uint8_views``: geometry only (pad/resize, tiles) -> uint8 RGB arrays of the encoder's size.
   This is what the phone apps do before calling ``vision_encoder`` (the manifest describes it).
2. ``normalize``: uint8 -> float, scaled by 1/255 and normalised with the tower's mean/std. Exported
   ``vision_encoder`` methods do this inside the graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mobilemllm.config import VisionConfig
from mobilemllm.errors import DataError

RESAMPLE = "bicubic"


def load_image(path: str | Path):
    """Open an image as RGB, with one clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


def _square(img, cfg: VisionConfig):
    from PIL import Image

    if cfg.image_aspect == "resize" or img.width == img.height:
        return img
    side = max(img.width, img.height)
    canvas = Image.new("RGB", (side, side), cfg.pad_color)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def _resize(img, size: tuple[int, int]):
    from PIL import Image

    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.BICUBIC)


def to_uint8_views(img, cfg: VisionConfig) -> np.ndarray:
    """PIL image -> uint8 array (V, 3, S, S): one view for ``direct``, tiles + a global view for ``tiles``."""
    img = _square(img.convert("RGB"), cfg)
    s = cfg.image_size
    views = []
    if cfg.hires == "tiles":
        rows, cols = cfg.tile_grid
        big = _resize(img, (cols * s, rows * s))
        for r in range(rows):
            for c in range(cols):
                views.append(big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)))
    views.append(_resize(img, (s, s)))
    return np.stack([np.asarray(v, dtype=np.uint8).transpose(2, 0, 1) for v in views])


def normalize(uint8: torch.Tensor | np.ndarray, cfg: VisionConfig) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with the tower's mean/std."""
    x = torch.as_tensor(np.asarray(uint8) if not isinstance(uint8, torch.Tensor) else uint8).float() / 255.0
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return (x - mean) / std


def preprocess(img, cfg: VisionConfig) -> torch.Tensor:
    """PIL image -> float tensor (V, 3, S, S) ready for the vision tower."""
    return normalize(to_uint8_views(img, cfg), cfg)


def preprocess_path(path: str | Path, cfg: VisionConfig) -> torch.Tensor:
    return preprocess(load_image(path), cfg)
