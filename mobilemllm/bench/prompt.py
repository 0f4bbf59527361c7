"""The benchmark's request: a prompt of an exact number of text tokens around one image.

Every backend runs the same layout the apps send (BOS, template text, the image, template text) with
filler tokens standing in for the question, so ``--prompt-tokens 128`` means 128 text tokens in every
backend, and prefill = 128 + the image's visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobilemllm.bench.timing import prefill_tokens
from mobilemllm.errors import UserError

FILLER_WORDS = (" the", " image", " a", " shape", " and", " of", " red", " is")


@dataclass(frozen=True)
class BenchPrompt:
    prefix_ids: list[int]  # BOS + template text before the image
    suffix_ids: list[int]  # filler "question" + template text after the image
    num_visual_tokens: int

    @property
    def text_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)

    @property
    def prefill_tokens(self) -> int:
        return prefill_tokens(self.text_tokens, self.num_visual_tokens)


def filler_ids(tokenizer, vocab_size: int) -> list[int]:
    """Candidate filler tokens: single-token common words of ``tokenizer``, else fixed ids."""
    out: list[int] = []
    if tokenizer is not None:
        for word in FILLER_WORDS:
            ids = tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1 and ids[0] not in out:
                out.append(int(ids[0]))
    for i in (vocab_size // 2, vocab_size // 3, vocab_size // 5, 100):
        if 0 <= i < vocab_size and i not in out:
            out.append(i)
    return out


def build_prompt(text_tokens: int, num_visual_tokens: int, *, tokenizer=None, prefix_text: str = "",
                 suffix_text: str = "", bos_id: int | None = None, filler: int = 0) -> BenchPrompt:
    """A prompt of exactly ``text_tokens`` text tokens: [BOS] prefix <image> filler... suffix."""
    enc = (lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []) if tokenizer is not None \
        else (lambda s: [])
    prefix = ([bos_id] if bos_id is not None else []) + list(enc(prefix_text))
    tail = list(enc(suffix_text))
    need = len(prefix) + len(tail)
    if text_tokens < need:
        raise UserError(f"--prompt-tokens {text_tokens} is shorter than the template alone ({need} tokens: BOS, "
                        f"the text around the image); use --prompt-tokens {need} or more")
    suffix = [int(filler)] * (text_tokens - need) + tail
    return BenchPrompt([int(i) for i in prefix], suffix, int(num_visual_tokens))


def bench_image(image_size: int, views: int = 1, seed: int = 0) -> np.ndarray:
    """A seeded uint8 image batch (views, 3, S, S): what an app hands the vision encoder after resizing."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(views, 3, image_size, image_size), dtype=np.uint8)


def check_context(prompt: BenchPrompt, new_tokens: int, max_context: int, what: str) -> None:
    """The request must fit the KV cache: prefill + new tokens (+1, the first token from prefill)."""
    total = prompt.prefill_tokens + new_tokens + 1
    if total > max_context:
        spare = max_context - prompt.num_visual_tokens - new_tokens - 1
        hint = (f"use --prompt-tokens {spare} or fewer" if spare > 0 else
                f"use --new-tokens {max_context - prompt.prefill_tokens - 1} or fewer")
        raise UserError(f"{what}: {prompt.num_visual_tokens} image + {prompt.text_tokens} prompt + {new_tokens} new "
                        f"tokens (+1 from prefill) = {total} exceeds its context of {max_context}; {hint}")
