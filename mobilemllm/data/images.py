"""Image handling: load with Pillow, convert to RGB, pad to square or resize, normalise.

Preprocessing is split in two so exported programs and apps agree with training:
1. ``to_uint8_views``: geometry only (pad/resize, tiles) -> uint8 RGB arrays of the encoder's size.
   This is what the phone apps do before calling ``vision_encoder`` (the manifest describes it).
2. ``normalize``: uint8 -> float, scaled by 1/255 and normalised with the tower's mean/std. Exported
   ``vision_encoder`` methods do this inside the graph.

Loading refuses what would hang, exhaust memory or silently change the picture (``load_image``):
a path that is not a regular file (a FIFO would block the read forever), more than ``MAX_IMAGE_PIXELS``
pixels (a small file can decode to gigabytes), and a damaged file, each with one ``DataError`` line.
``to_rgb`` converts every Pillow mode to 8-bit RGB without clipping 16-bit greyscale to white and
composites transparency on ``ALPHA_BACKGROUND``.
"""

from __future__ import annotations

import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mobilemllm.config import VisionConfig
from mobilemllm.errors import DataError

RESAMPLE = "bicubic"
# 8192 x 8192: far above any encoder input (the largest tower reads 336 px x a 2 x 2 tile grid), far below
# the gigapixel images a decompression bomb decodes to. Pillow's own guard only warns up to twice its limit.
MAX_IMAGE_PIXELS = 8192 * 8192
# Transparent pixels are composited on white, as transformers' ``convert_to_rgb`` (the image processors of
# LLaVA-style models) does; dropping alpha instead would show whatever colour the transparent pixels hold.
ALPHA_BACKGROUND = (255, 255, 255)
# Pillow modes of 16-bit (and 32-bit integer) samples; Pillow's convert("RGB") clips them at 255.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What Pillow raises on damaged or hostile files (the exceptions its own fuzzers allow).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image(path: str | Path):
    """Open an image file as 8-bit RGB (``to_rgb``), with one clear error for anything unusable."""
    path = Path(path)
    _check_regular_file(path)
    try:
        with warnings.catch_warnings():
            # MAX_IMAGE_PIXELS below is the stricter check; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(im.width, im.height, str(path))
                im.load()
                return to_rgb(im)
    except Image.DecompressionBombError:
        raise DataError(f"image {path} has more pixels than Pillow accepts (a decompression bomb?); "
                        f"images may have at most {MAX_IMAGE_PIXELS:,} pixels") from None
    except DataError:
        raise
    except Image.UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file Pillow can read "
                        "(PNG, JPEG, WebP, BMP, GIF, TIFF, ...)") from None
    except _READ_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {_one_line(e)}") from None


def _check_regular_file(path: Path) -> None:
    """Refuse a missing path and anything but a regular file: opening a FIFO blocks forever, a device
    can stream without end, a folder fails deep inside Pillow."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission
        raise DataError(f"cannot read image {path}: {_one_line(e)}") from None

    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device?)"
        raise DataError(f"image {path} is {kind}; give an image file")


def check_pixels(width: int, height: int, what: str) -> None:
    """Refuse an image larger than MAX_IMAGE_PIXELS before its pixels are decoded."""
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image {what} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                        "accepted (a decompression bomb?); shrink it first")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def to_rgb(img):
    """Any Pillow mode -> 8-bit RGB, keeping the picture a viewer shows.

    - 16-bit greyscale (``I;16*``) and 32-bit integer (``I``, read as 16-bit samples, clipped to 0..65535):
      the top 8 bits (``value >> 8``); Pillow's own conversion clips everything above 255 to white.
    - 32-bit float (``F``): 0.0..1.0 -> 0..255 (clipped, rounded; NaN -> 0), the float-image convention.
    - Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) and palette or greyscale images with a
      transparent colour: composited on ALPHA_BACKGROUND (white).
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES:
        a = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8), "L").convert("RGB")
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _square(img, cfg: VisionConfig):
    if cfg.image_aspect == "resize" or img.width == img.height:
        return img
    side = max(img.width, img.height)
    canvas = Image.new("RGB", (side, side), cfg.pad_color)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def _resize(img, size: tuple[int, int]):
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.BICUBIC)


def to_uint8_views(img, cfg: VisionConfig) -> np.ndarray:
    """PIL image -> uint8 array (V, 3, S, S): one view for ``direct``, tiles + a global view for ``tiles``."""
    img = _square(to_rgb(img), cfg)
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
