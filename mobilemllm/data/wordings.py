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


def word(qtype: str, rng: random.Random | None = None, *, held_out: bool = False, **slots: str) -> str:
    """A question of ``qtype`` in a wording: canonical (no ``rng``), a random training wording, or a random
    held-out one; ``slots`` fill ``{pos}``/``{obj}``."""
    table = HELD_OUT_WORDINGS if held_out else TRAIN_WORDINGS
    if qtype not in table:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {', '.join(table)}")
    options = table[qtype]
    return (options[0] if rng is None else rng.choice(options)).format(**slots)


def detail_prompt(rng: random.Random | None = None) -> str:
    """The detailed-caption request: canonical, or a random training wording."""
    return DETAIL_PROMPTS[0] if rng is None else rng.choice(DETAIL_PROMPTS)
