"""The pad colour of non-square images is LLaVA/MobileVLM's: the image mean times 255, truncated.

Upstream (LLaVA ``llava/mm_utils.py``, copied by MobileVLM) pads with
``expand2square(image, tuple(int(x*255) for x in image_processor.image_mean))``; for CLIP's mean that is
(122, 116, 104), where rounding would give (123, 117, 104).
"""

from __future__ import annotations

import numpy as np
import pytest

from mobilemllm.config import CLIP_MEAN, SIGLIP_MEAN, VisionConfig


def expand2square(pil_img, background_color):
    """LLaVA's ``llava.mm_utils.expand2square``, verbatim."""
    from PIL import Image

    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def upstream_pad_color(image_mean) -> tuple[int, ...]:
    return tuple(int(x * 255) for x in image_mean)  # as LLaVA's process_images writes it


def test_clip_pad_color_is_truncated_as_upstream():
    assert VisionConfig(image_mean=CLIP_MEAN).pad_color == (122, 116, 104)
    assert VisionConfig(image_mean=SIGLIP_MEAN).pad_color == (127, 127, 127)


@pytest.mark.parametrize("size", [(32, 20), (20, 32), (32, 31), (1, 32), (32, 32)])
def test_padded_pixels_equal_upstream_expand2square(size):
    from PIL import Image

    from mobilemllm.data.images import to_uint8_views

    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=1, num_heads=1,
                       intermediate_size=128, image_mean=CLIP_MEAN, image_aspect="pad")
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * 100 + h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = np.asarray(expand2square(img, upstream_pad_color(CLIP_MEAN))).transpose(2, 0, 1)
    got = to_uint8_views(img, cfg)[0]  # the padded side equals image_size: no resize after padding
    assert np.array_equal(got, want), f"{w}x{h}: max diff {np.abs(got.astype(int) - want).max()}"


def test_manifest_pad_color_equals_upstream():
    from mobilemllm.export.manifest_sections import preprocessing_section

    pre = preprocessing_section(VisionConfig(image_mean=CLIP_MEAN))
    assert pre["pad_color"] == [122, 116, 104] == list(upstream_pad_color(CLIP_MEAN))
