"""What a phone app does with a bundle before it calls the runner, written out step by step in Python.

The demo apps (``android_demo/.../BundleInputs.kt``, ``ios_demo/.../BundleInputs.swift``) are line-by-line
ports of this file, and it reads nothing but the bundle's ``manifest.json`` and decoded RGB pixels:

1. **Image** (``manifest["preprocessing"]``): pad to a square with ``pad_color`` (or stretch), resize
   with Pillow's bicubic filter reproduced in integer fixed point (22 fraction bits, the same
   coefficients, rounding, clamping and pass order as Pillow 13's ``Resample.c``), cut tiles when ``hires`` is
   ``tiles``, and lay the views out as uint8 ``(V, 3, S, S)``. The result is byte-identical to
   :func:`mobilemllm.data.images.to_uint8_views` (tests/test_apps.py checks it on many shapes).
2. **Prompt** (``manifest["prompt"]``): the template's segments in order, ``{question}`` replaced by the
   stripped question. BOS is either already the first text segment's first characters
   (``bos_in_first_text``: the tokenizer parses ``<s>`` to ``bos_id``) or, when the prompt starts with
   the image, one BOS token the runner prefills (``num_bos`` = 1). Each text segment is tokenized on its
   own without adding special tokens (as ExecuTorch's MultimodalRunner does), so the ids equal
   :func:`mobilemllm.inference.prompt_ids`.

Decoding the file (PNG/JPEG -> RGB) is the platform's job and is not covered: PNG decodes exactly
everywhere, JPEG decoders may differ by a level or two. EXIF orientation is ignored, as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tokenizers import Tokenizer

from mobilemllm.bundle.layout import QUESTION
from mobilemllm.errors import UserError

PRECISION_BITS = 22  # fixed-point fraction bits of the 8-bit resampler (32 - 8 - 2)
BICUBIC_SUPPORT = 2.0


# ---- image ---------------------------------------------------------------------------------------
def bicubic(x: float) -> float:
    """The bicubic convolution kernel with a = -0.5."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _c_int(x: float) -> int:
    """C's (int) cast: truncate toward zero."""
    return int(x)


def resample_coefficients(in_size: int, out_size: int) -> tuple[list[int], list[list[int]]]:
    """For each output pixel: the first input index and the integer weights of the input pixels it mixes."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filter_scale
    starts: list[int] = []
    weights: list[list[int]] = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        inv = 1.0 / filter_scale
        xmin = max(_c_int(center - support + 0.5), 0)
        xmax = min(_c_int(center + support + 0.5), in_size)
        w = [bicubic((x + xmin - center + 0.5) * inv) for x in range(xmax - xmin)]
        total = sum(w)
        if total != 0.0:
            w = [v / total for v in w]
        one = float(1 << PRECISION_BITS)
        starts.append(xmin)
        weights.append([_c_int(v * one - 0.5) if v < 0 else _c_int(v * one + 0.5) for v in w])
    return starts, weights


def _resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample uint8 (H, W, 3) along ``axis`` (1: horizontal, 0: vertical) with rounding and clamping."""
    starts, weights = resample_coefficients(pixels.shape[axis], out_size)
    src = np.moveaxis(pixels.astype(np.int64), axis, 0)
    out = np.empty((out_size,) + src.shape[1:], dtype=np.int64)
    for i, (start, w) in enumerate(zip(starts, weights)):
        acc = np.full(src.shape[1:], 1 << (PRECISION_BITS - 1), dtype=np.int64)
        for j, k in enumerate(w):
            acc += src[start + j] * k
        out[i] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis).astype(np.uint8)


def vertical_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width does (older Pillow always went horizontal first; the order changes the bytes)."""
    shrink_h = in_h - out_h
    return shrink_h > 0 and shrink_h > (in_w - out_w) * 2


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3) in two separable passes, each only if its size changes."""
    in_h, in_w = pixels.shape[:2]
    if vertical_first(in_w, in_h, width, height):
        if in_h != height:
            pixels = _resample_axis(pixels, height, axis=0)
        if in_w != width:
            pixels = _resample_axis(pixels, width, axis=1)
        return pixels
    if in_w != width:
        pixels = _resample_axis(pixels, width, axis=1)
    if in_h != height:
        pixels = _resample_axis(pixels, height, axis=0)
    return pixels


def pad_to_square(pixels: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """Centre the image on a square canvas of ``color`` (offsets rounded down)."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    side = max(h, w)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:, :] = np.asarray(color, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


def image_views(pixels: np.ndarray, pre: Mapping[str, Any]) -> np.ndarray:
    """Decoded RGB uint8 (H, W, 3) -> uint8 (V, 3, S, S), following ``manifest["preprocessing"]``."""
    check_preprocessing(pre)
    if pre["aspect"] == "pad":
        pixels = pad_to_square(pixels, pre["pad_color"])
    s = int(pre["image_size"])
    views = []
    if pre.get("hires", "direct") == "tiles":
        rows, cols = pre["tile_grid"]
        big = resize(pixels, cols * s, rows * s)
        for r in range(rows):
            for c in range(cols):
                views.append(big[r * s:(r + 1) * s, c * s:(c + 1) * s])
    views.append(resize(pixels, s, s))
    return np.stack([v.transpose(2, 0, 1) for v in views])


def runner_image(views: np.ndarray) -> np.ndarray:
    """Views (V, 3, S, S) -> the runner's image (3, V*S, S): the views stacked top to bottom in each
    channel plane, as the program's vision_encoder takes it (apps pass width S, height V*S, 3 channels)."""
    v, c, s, _ = views.shape
    return np.ascontiguousarray(views.transpose(1, 0, 2, 3).reshape(c, v * s, s))


def check_preprocessing(pre: Mapping[str, Any]) -> None:
    """The manifest's preprocessing must be one the apps implement (the same checks the apps make)."""
    if pre.get("resample") != "bicubic":
        raise UserError(f"manifest preprocessing.resample is {pre.get('resample')!r}; the apps implement 'bicubic'")
    if pre.get("aspect") not in ("pad", "resize"):
        raise UserError(f"manifest preprocessing.aspect is {pre.get('aspect')!r}; expected 'pad' or 'resize'")
    if pre["aspect"] == "pad" and len(pre.get("pad_color") or []) != 3:
        raise UserError("manifest preprocessing.aspect is 'pad' but pad_color (3 ints) is missing")
    if pre.get("hires", "direct") not in ("direct", "tiles"):
        raise UserError(f"manifest preprocessing.hires is {pre.get('hires')!r}; expected 'direct' or 'tiles'")


def pixels_of(image) -> np.ndarray:
    """A decoded PIL image -> RGB uint8 (H, W, 3), the apps' starting point (decoding a file is the
    platform's job: :func:`mobilemllm.data.images.load_image` here, BitmapFactory/UIImage in the apps)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ---- prompt --------------------------------------------------------------------------------------
def prompt_segments(prompt: Mapping[str, Any], question: str) -> list[dict[str, str]]:
    """The manifest's segments with ``{question}`` filled in; empty text segments are dropped."""
    q = question.strip()
    out = []
    for seg in prompt["segments"]:
        if seg["type"] == "image":
            out.append({"type": "image"})
        elif seg["type"] == "text":
            text = seg["text"].replace(QUESTION, q)
            if text:
                out.append({"type": "text", "text": text})
        else:
            raise UserError(f"manifest prompt segment type {seg['type']!r} is not text or image")
    return out


def prompt_token_ids(manifest: Mapping[str, Any], tokenizer_json: str | Path, question: str,
                     image_token_id: int = -200) -> list[int]:
    """Token ids as the runner builds them from the segments (image -> ``num_visual_tokens`` placeholders)."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    prompt = manifest["prompt"]
    ids: list[int] = []
    bos = manifest["tokenizer"]["bos_id"]
    if bos_tokens(prompt) and bos is not None:
        ids.append(int(bos))
    for seg in prompt_segments(prompt, question):
        if seg["type"] == "image":
            ids.extend([image_token_id] * int(prompt["num_visual_tokens"]))
        else:
            ids.extend(tok.encode(seg["text"], add_special_tokens=False).ids)
    return ids


def bos_tokens(prompt: Mapping[str, Any]) -> int:
    """How many BOS tokens the runner must prefill as tokens (``num_bos``): 1 when the prompt has BOS but
    its first segment does not already start with the BOS text (ExecuTorch's HF tokenizer parses ``<s>``
    in text to ``bos_id`` but ignores its own ``bos`` argument)."""
    return 1 if prompt["add_bos"] and not prompt.get("bos_in_first_text", False) else 0


def runner_calls(manifest: Mapping[str, Any], question: str) -> list[tuple[str, Any]]:
    """The apps' calls in order: ("bos", n) is passed to the runner, then ("text", str) / ("image", None)."""
    prompt = manifest["prompt"]
    calls: list[tuple[str, Any]] = [("bos", bos_tokens(prompt))]
    for seg in prompt_segments(prompt, question):
        calls.append((seg["type"], seg.get("text")))
    if calls[-1][0] != "text":
        raise UserError("the manifest's prompt ends with the image; the phone runners need a text segment last")
    return calls



# ---- conversation: follow-ups, new images, a full context ---------------------------------------
class ContextFullError(UserError):
    """The next turn may not fit the bundle's context: the app starts a new conversation instead."""


def follow_up(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    """``manifest["prompt"]["follow_up"]``, or a UserError when the template has no chat turns."""
    fu = manifest["prompt"].get("follow_up")
    if not fu:
        raise UserError(f"this bundle's template {manifest['prompt']['template']!r} has no chat turns "
                        "(prompt.follow_up is missing): ask about a new image instead")
    return fu


def follow_up_calls(manifest: Mapping[str, Any], question: str) -> list[tuple[str, Any]]:
    """What an app prefills after an answer that ended with the end-of-turn token, continuing the runner's
    cache (which holds every answer token but that last one): the end-of-turn text, then the next turn."""
    fu = follow_up(manifest)
    q = question.strip()
    texts = [fu["end_of_turn"]] + [s["text"].replace(QUESTION, q) for s in fu["segments"]]
    return [("text", t) for t in texts if t]


def conversation_calls(manifest: Mapping[str, Any], turns: Sequence[tuple[str, str]], question: str) -> list[tuple[str, Any]]:
    """The whole conversation for an empty cache: the first prompt, then each earlier answer (its text),
    the end-of-turn text and the next question's turn; ends before the next answer."""
    questions = [q for q, _ in turns] + [question]
    calls = runner_calls(manifest, questions[0])
    for (_, answer), nxt in zip(turns, questions[1:]):
        text = follow_up(manifest)["answer"].replace("{answer}", answer.strip())
        if text:
            calls.append(("text", text))
        calls += follow_up_calls(manifest, nxt)
    return calls


def token_bound(manifest: Mapping[str, Any], calls: Sequence[tuple[str, Any]]) -> int:
    """At most how many positions ``calls`` fill, without a tokenizer: a token holds at least one UTF-8 byte
    (byte-level BPE, SentencePiece with byte fallback), plus one for a word-start marker per text."""
    n = 0
    for kind, value in calls:
        if kind == "bos":
            n += int(value)
        elif kind == "image":
            n += int(manifest["prompt"]["num_visual_tokens"])
        elif kind == "text":
            n += len(value.encode("utf-8")) + 1
    return n


class AppChat:
    """The apps' conversation logic (android_demo ``ChatSession.kt``, ios_demo ``ChatSession.swift``).

    One image and its turns. :meth:`calls` gives what to hand the runner for the next question:
    ``("reset", None)`` first when the cache must start again (a new image, or the last answer was cut
    short by Stop or the token limit, so its last token is not in the cache and its text must be
    prefilled again), otherwise only the follow-up turn. :meth:`finish` records the answer.
    ``used``: the positions the runner's cache holds (the app reads it from the runner's stats, or
    bounds it); a turn that may not fit raises :class:`ContextFullError` with one clear message.
    """

    def __init__(self, manifest: Mapping[str, Any]):
        self.manifest = manifest
        self.turns: list[tuple[str, str]] = []
        self.cache_continues = False
        self.used = 0

    def new_image(self) -> None:
        self.turns.clear()
        self.cache_continues = False

    def calls(self, question: str) -> list[tuple[str, Any]]:
        if not question.strip():
            raise UserError("type a question about the image")
        if self.turns and self.cache_continues:
            calls, start = follow_up_calls(self.manifest, question), self.used
        else:
            calls, start = [("reset", None)] + conversation_calls(self.manifest, self.turns, question), 0
        limit = int(self.manifest["context"]["max_context_len"])
        if start + token_bound(self.manifest, calls) + 1 > limit:
            raise ContextFullError(
                f"this conversation has filled the model's context ({limit} tokens): pick a new image or "
                "start a new chat" if self.turns else
                f"the question is too long for the model's context ({limit} tokens): shorten it")
        return calls

    def finish(self, question: str, answer: str, ended_at_end_of_turn: bool, used: int) -> None:
        self.turns.append((question.strip(), answer.strip()))
        self.cache_continues = ended_at_end_of_turn
        self.used = used
