"""The manifest sections every export format writes, built from a model, its config and tokenizer."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mobilemllm.bundle.layout import QUESTION, TOKENIZER_DIR
from mobilemllm.data.images import RESAMPLE
from mobilemllm.data.tokenizer import eos_ids
from mobilemllm.templates import IMAGE, get_template


def prompt_section(config, tokenizer) -> dict[str, Any]:
    """How to build the prompt exactly as training did: BOS, then text / image / text segments.

    BOS handling: ExecuTorch's C++ HF tokenizer ignores its ``bos`` argument but parses special-token
    text, so when the prompt starts with text, that first segment starts with the BOS token's text
    (``bos_text``, e.g. ``<s>``) and tokenizes to ``bos_id`` first. When it starts with the image,
    ``bos_id`` is prefilled as a token before it (MultimodalRunner does this for ``num_bos=1``).
    """
    tpl = get_template(config.template)
    marker = "\x00Q\x00"
    segments: list[dict[str, str]] = []
    for text, _ in tpl.prompt_segments(marker):
        if text == IMAGE:
            segments.append({"type": "image"})
        elif text:
            # The template strips the question; apps substitute the stripped question for {question}.
            segments.append({"type": "text", "text": text.replace(marker, QUESTION)})
    add_bos = tokenizer.bos_token_id is not None
    bos_text = tokenizer.bos_token if add_bos else None
    bos_in_text = bool(add_bos and segments and segments[0]["type"] == "text")
    if bos_in_text:
        segments[0] = {"type": "text", "text": bos_text + segments[0]["text"]}
    return {
        "template": tpl.name,
        "add_bos": add_bos,
        "bos_text": bos_text,
        "bos_in_first_text": bos_in_text,
        "segments": segments,
        "num_visual_tokens": config.num_visual_tokens,
        "follow_up": follow_up_section(tpl, tokenizer),
    }


def follow_up_section(tpl, tokenizer) -> dict[str, Any] | None:
    """How a later turn continues the conversation, exactly as training writes a multi-turn record
    (``Template.segments``): the answer (``answer``, used when an app prefills the conversation again), the
    end-of-turn token training appends to every answer (``end_of_turn``: its text, which tokenizers parse to
    that id), then the next question's ``segments``. None for templates without chat turns (captions)."""
    if tpl.caption_only or tokenizer.eos_token is None:
        return None
    q_marker, a_marker = "\x00Q\x00", "\x00A\x00"
    segs = tpl.segments([(f"{IMAGE}\nq", a_marker), (q_marker, "")])
    first = next(i for i, (_, is_answer) in enumerate(segs) if is_answer)
    turn = [text for text, _ in segs[first + 1:-1] if text]
    return {
        "answer": segs[first][0].replace(a_marker, "{answer}"),
        "end_of_turn": tokenizer.eos_token,
        "segments": [{"type": "text", "text": t.replace(q_marker, QUESTION)} for t in turn],
    }


def preprocessing_section(vision_cfg, input_dtype: str = "uint8", normalize_in_graph: bool = True) -> dict[str, Any]:
    """What the app does to an image before the vision encoder (geometry only when normalize_in_graph)."""
    s = vision_cfg.image_size
    return {
        "image_size": s,
        "aspect": vision_cfg.image_aspect,
        "pad_color": list(vision_cfg.pad_color),
        "resample": RESAMPLE,
        "hires": vision_cfg.hires,
        "tile_grid": list(vision_cfg.tile_grid),
        "views": vision_cfg.num_views,
        "input_dtype": input_dtype,
        "input_layout": "NCHW",
        "input_shape": [vision_cfg.num_views, 3, s, s],
        "normalize_in_graph": normalize_in_graph,
        "mean": list(vision_cfg.image_mean),
        "std": list(vision_cfg.image_std),
    }


def tokenizer_section(tokenizer, vocab_size: int) -> dict[str, Any]:
    return {"dir": TOKENIZER_DIR, "bos_id": tokenizer.bos_token_id, "eos_ids": eos_ids(tokenizer),
            "vocab_size": vocab_size}


def model_section(model, source: str | None = None) -> dict[str, Any]:
    cfg = model.config.replace(vision={"pretrained_path": None}, llm={"pretrained_path": None})
    out = {"name": cfg.name, "config": json.loads(json.dumps(cfg.to_dict())),
           "parameters": model.parameter_counts()}
    if source:
        out["source"] = str(source)
    return out


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the bundle."""
    out = {}
    for name in ("mobilemllm", "torch", "executorch", "torchao", "transformers", "onnx", "onnxruntime", "coremltools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
