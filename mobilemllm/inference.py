"""Eager inference: build a prompt the way every runner does, and answer a question about an image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mobilemllm.data.images import load_image, preprocess
from mobilemllm.templates import get_template
from mobilemllm.data.tokenizer import check_text, encode_segments, eos_ids


def prompt_ids(config, tokenizer, question: str, template: str | None = None) -> list[int]:
    """Token ids for a one-image question, with IMAGE_TOKEN_ID at the visual-token positions."""
    tpl = get_template(template or config.template)
    check_text(question, "the prompt")
    ids, _ = encode_segments(tokenizer, tpl.prompt_segments(question), config.num_visual_tokens)
    return ids


class TextStreamer:
    """Turns token ids into text pieces, holding back bytes until a UTF-8 character is complete."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = ""

    def put(self, token: int) -> None:
        self.ids.append(token)
        # lstrip: as the answer's text (sentencepiece decoders keep a word's leading space, see data/cpp_tokenizer.py)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
            self.emitted = text


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int


def answer(model, tokenizer, image, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
    """Answer ``question`` about ``image`` (a path or a PIL image) with the eager model."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    pix = preprocess(image, model.config.vision).unsqueeze(0)
    ids = prompt_ids(model.config, tokenizer, question)
    streamer = TextStreamer(tokenizer, on_text) if on_text else None
    eos = eos_ids(tokenizer)
    tokens = model.generate(torch.tensor([ids]), pix, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, eos_ids=eos, on_token=streamer.put if streamer else None)
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    return Answer(text.strip(), tokens, len(ids))
