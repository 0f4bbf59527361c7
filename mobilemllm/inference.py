"""Eager inference: build a prompt the way every runner does, and answer a question about an image."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


class TextStream:
    """Decoded answer text in, the part that is safe to show out: the one streaming rule of every runner.

    Leading whitespace is dropped (the template puts a space before every answer), trailing whitespace, an
    incomplete UTF-8 character and trailing control characters are held back until more text follows (a
    byte-fallback decoder may re-decode earlier bytes once the next one arrives: ``<0x1B>`` alone is "\\x1b",
    with ``<0xE0>`` after it both become U+FFFD), and so is a tail that may be the start of a stop string; a stop
    string ends the answer before it. The pieces sent to ``on_text`` join to the text :meth:`finish` returns,
    except where the decoder rewrote text already shown; :meth:`finish` always returns the final decode.
    """

    def __init__(self, on_text: Callable[[str], None] | None, stop: Sequence[str] = ()):
        self.on_text = on_text
        self.stop = tuple(stop)
        self.shown = ""
        self.stopped = False

    def update(self, decoded: str) -> bool:
        """Show what is safe of ``decoded`` (the whole answer so far); True once a stop string appeared."""
        text, hit = self._cut(decoded.lstrip())
        if hit:
            self.stopped = True
            self._show(text.rstrip())
            return True
        safe = _held_back(text)
        for s in self.stop:  # hold back a tail that could grow into a stop string
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        self._show(safe.rstrip())
        return False

    def finish(self, decoded: str) -> str:
        """The final text of the answer (before the first stop string); shows the rest of it."""
        text, _ = self._cut(decoded.strip())
        text = text.strip()
        self._show(text)
        return text

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            piece = text[len(self.shown):]
            self.shown = text
            if self.on_text is not None:
                self.on_text(piece)


def _held_back(text: str) -> str:
    """``text`` without its tail of whitespace, replacement and control characters (which may still change)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd"
                   or unicodedata.category(text[end - 1]) == "Cc"):
        end -= 1
    return text[:end]


class TokenStream(TextStream):
    """A :class:`TextStream` fed one token id at a time (eager generation and the ONNX session's loop)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, skip: Sequence[int] = ()):
        super().__init__(on_text)
        self.tokenizer = tokenizer
        self.skip = set(skip)
        self.ids: list[int] = []

    def put(self, token: int) -> None:
        if token not in self.skip:
            self.ids.append(token)
            self.update(self.tokenizer.decode(self.ids, skip_special_tokens=True))


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
    eos = eos_ids(tokenizer)
    stream = TokenStream(tokenizer, on_text, skip=eos)
    tokens = model.generate(torch.tensor([ids]), pix, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, eos_ids=eos, on_token=stream.put)
    text = stream.finish(tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True))
    return Answer(text, tokens, len(ids))
