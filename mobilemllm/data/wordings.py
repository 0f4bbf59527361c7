"""How the shapes world's questions are worded: the canonical wording, the varied training wordings, and
the held-out paraphrases of ``eval_paraphrase.json``.

A wording is a ``str.format`` template with ``{pos}`` (a quadrant, "top left") or ``{obj}`` (an object,
"red circle") slots. Training may use :data:`TRAIN_WORDINGS` (``synthetic.question_wordings: varied``):
several wordings per question type, with synonyms (colour/color, shape/figure/object, image/picture/photo),
reordered clauses and casing variants, so an answer is tied to what is asked rather than to one string.
:data:`HELD_OUT_WORDINGS` are never written to any training file (a test checks it); they measure whether
the knowledge transfers to wordings the model has not seen. The answers are the same for every wording.
"""

from __future__ import annotations

import random
from functools import lru_cache

from mobilemllm.data.wording_grammar import compose, normalize

# Index 0 of each list is the canonical wording (eval_questions.json, the tokenizer's corpus).
TRAIN_WORDINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the shape in the {pos}?",
        "What color is the shape in the {pos}?",
        "What is the colour of the shape in the {pos}?",
        "In the {pos}, what colour is the shape?",
        "what color is the object in the {pos}",
        "Which colour is the figure in the {pos}?",
        "Tell me the colour of the shape in the {pos}.",
        "The shape in the {pos} is which color?",
    ),
    "kind": (
        "What shape is in the {pos}?",
        "Which shape is in the {pos}?",
        "What kind of shape is in the {pos}?",
        "In the {pos}, what shape is there?",
        "what is the shape in the {pos}",
        "What figure is in the {pos}?",
        "Name the shape in the {pos}.",
        "The object in the {pos} is what shape?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many objects are there?",
        "What is the number of shapes?",
        "how many figures are in the picture",
        "Count the shapes.",
        "How many shapes do you see?",
        "Number of shapes in the photo?",
    ),
    "position": (
        "Where is the {obj}?",
        "Where is the {obj} in the image?",
        "In which quadrant is the {obj}?",
        "Where in the picture is the {obj}?",
        "where is the {obj} located",
        "Which part of the image has the {obj}?",
        "Tell me where the {obj} is.",
        "The {obj} is where?",
    ),
    "existence": (
        "Is there a {obj}?",
        "Is there a {obj} in the picture?",
        "Does the image have a {obj}?",
        "Is there any {obj}?",
        "is a {obj} in the photo",
        "Do you see a {obj}?",
        "Does the picture show a {obj}?",
        "Is there a {obj} in this photo?",
    ),
}

# Never used in training: the held-out paraphrase evaluation ("pope": POPE's question, reworded).
HELD_OUT_WORDINGS: dict[str, tuple[str, ...]] = {
    "colour": (
        "Which colour does the {pos} shape have?",
        "Tell me the color of the object located at the {pos}.",
        "The shape at the {pos}: what colour is it?",
    ),
    "kind": (
        "Which kind of shape sits in the {pos}?",
        "Name the figure found at the {pos}.",
        "At the {pos}, which shape can be seen?",
    ),
    "count": (
        "Count the shapes in this picture.",
        "What is the total number of figures shown?",
        "How many objects can you see in the photo?",
    ),
    "position": (
        "In which corner is the {obj} located?",
        "Where can the {obj} be found?",
        "The {obj} is in which part of the picture?",
    ),
    "existence": (
        "Does the picture contain a {obj}?",
        "Can you see a {obj} anywhere?",
        "Is a {obj} present?",
    ),
    "pope": (
        "Is a {obj} visible in this image?",
        "Do you see any {obj} in the image?",
        "Is there a {obj} shown in this picture?",
    ),
}

DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "Describe the picture in detail.",
    "Give a detailed description of the image.",
    "Describe this photo in detail.",
    "What is in the image? Describe it in detail.",
)
HELD_OUT_DETAIL_PROMPTS: tuple[str, ...] = ("Write a thorough description of everything in this picture.",)


# POPE's own question (mobilemllm.data.shapes_text.pope_question): never generated for training either.
POPE_WORDING = "Is there a {obj} in the image?"


class Composed(random.Random):
    """A wording stream for ``question_wordings: compositional``: :func:`word` and :func:`detail_prompt` build
    each question with :mod:`mobilemllm.data.wording_grammar` instead of picking from :data:`TRAIN_WORDINGS`.
    ``canonical``: the share of questions asked in the canonical wording (what the VQA score is measured on)."""

    canonical = 0.15


def word(qtype: str, rng: random.Random | None = None, *, held_out: bool = False, **slots: str) -> str:
    """A question of ``qtype`` in a wording: canonical (no ``rng``), a random training wording (a
    :class:`Composed` ``rng``: a generated one), or a random held-out one; ``slots`` fill ``{pos}``/``{obj}``."""
    table = HELD_OUT_WORDINGS if held_out else TRAIN_WORDINGS
    if qtype not in table:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {', '.join(table)}")
    options = table[qtype]
    if isinstance(rng, Composed) and not held_out and rng.random() >= rng.canonical:
        return _unseen(lambda: compose(qtype, rng, **slots), slots)
    return (options[0] if rng is None else rng.choice(options)).format(**slots)


def detail_prompt(rng: random.Random | None = None) -> str:
    """The detailed-caption request: canonical, or a random training wording (generated for :class:`Composed`)."""
    if isinstance(rng, Composed) and rng.random() >= rng.canonical:
        return _unseen(lambda: compose("detail", rng), {})
    return DETAIL_PROMPTS[0] if rng is None else rng.choice(DETAIL_PROMPTS)


@lru_cache(maxsize=None)
def _banned(pos: str | None, obj: str | None) -> tuple[str, ...]:
    """The held-out wordings and POPE's question for these slots, normalised and padded with spaces."""
    templates = [t for ts in HELD_OUT_WORDINGS.values() for t in ts] + [POPE_WORDING, *HELD_OUT_DETAIL_PROMPTS]
    out = []
    for t in templates:
        if ("{pos}" in t and pos is None) or ("{obj}" in t and obj is None):
            continue
        out.append(f" {normalize(t.format(pos=pos, obj=obj))} ")
    return tuple(out)


def held_out_inside(text: str, pos: str | None = None, obj: str | None = None) -> bool:
    """Whether ``text`` holds a held-out wording or POPE's question (for these slots), in any casing or
    punctuation, also inside a longer question."""
    padded = f" {normalize(text)} "
    return any(b in padded for b in _banned(pos, obj))


def _unseen(make, slots: dict[str, str]) -> str:
    """A generated question that holds no held-out wording (draw again until it does not)."""
    for _ in range(100):
        text = make()
        if not held_out_inside(text, slots.get("pos"), slots.get("obj")):
            return text
    raise RuntimeError("the wording grammar keeps producing held-out wordings")
