"""A small grammar that words the shapes world's questions in thousands of ways (``question_wordings:
compositional``).

A handful of fixed wordings per question type teaches a tiny model to match strings: asked "Can you tell me
what's in the upper-left corner?" it answers as it would the nearest template. Here a question is built from
parts drawn independently — an optional politeness prefix, one of many cores per type (direct and indirect
word order), synonyms for every non-informative word (shape/figure/object/thing, image/picture/photo, corner/
quadrant/part, top/upper), contractions, filler words and made-up words at random places, a suffix, a casing
and an end mark — so the only thing that stays put is the information that decides the answer: the type's key
words (colour/color/hue, how many/number/count, where/which part, is there/do you see/contain ...) and the
asked position or object. The model must key on those and ignore the rest, which is what a new wording needs.

Generated questions never contain a held-out wording (:data:`~mobilemllm.data.wordings.HELD_OUT_WORDINGS`) or
POPE's question, not even inside a longer question (compared lower-cased without punctuation): those measure
transfer and must stay unseen.
"""

from __future__ import annotations

import random
import re

# {col}: a colour word, {thing}/{things}: a noun for the shape(s), {img}: the image, {at}: where a shape is
# ("in the top left corner"), {p}: the bare position ("top left"), {o}: the object ("red circle", "red circle
# shape"), {kindw}: a noun for a shape's kind, {region}: a noun for a part of the image.
CORES: dict[str, tuple[str, ...]] = {
    "colour": (
        "what {col} is the {thing} {at}", "what is the {col} of the {thing} {at}", "which {col} is the {thing} {at}",
        "what {col} does the {thing} {at} have", "{at}, what {col} is the {thing}", "tell me the {col} of the {thing} {at}",
        "the {thing} {at} is what {col}", "what {col} is {at}", "{col} of the {thing} {at}",
        "what is the {col} of the {p} {thing}", "which {col} does the {p} {thing} have", "what {col} is the {p} {thing}",
        "name the {col} of the {thing} {at}", "what {col} do you see {at}", "what {col} the {thing} {at} is",
        "the {col} of the {p} {thing}", "what is the {thing} {at} coloured", "what {col} has the {thing} {at}",
        "say the {col} of the {thing} {at}", "{at}: which {col}",
    ),
    "kind": (
        "what {kindw} is {at}", "which {kindw} is {at}", "what is the {thing} {at}", "what is {at}",
        "{at}, what {kindw} is there", "name the {thing} {at}", "identify the {thing} {at}",
        "the {thing} {at} is what {kindw}", "what {kindw} is the {thing} {at}", "what {kindw} do you see {at}",
        "what is the {kindw} of the {thing} {at}", "what {kindw} is the {p} {thing}", "what is the {p} {thing}",
        "what {kindw} the {thing} {at} is", "which {kindw} can be seen {at}", "what sits {at}",
        "what {kindw} has been drawn {at}", "{at}: which {kindw}", "what {kindw} appears {at}",
        "what is drawn {at}",
    ),
    "count": (
        "how many {things} are there", "how many {things} are {inimg}", "how many {things} do you see",
        "how many {things} can you see", "how many {things} can you count", "how many {things} does the {img} {has}",
        "what is the number of {things} {inimg}", "count the {things} {inimg}", "number of {things} {inimg}",
        "what is the total number of {things}", "the {img} has how many {things}", "how many {things} appear {inimg}",
        "what is the count of {things}", "how many {things} there are", "how many {things} are shown",
        "how many {things} in total", "the number of {things} {inimg}", "count how many {things} there are",
        "total {things} {inimg}", "how many {things}",
    ),
    "position": (
        "where is the {o}", "where is the {o} {placed}", "where can the {o} be seen", "in which {region} is the {o}",
        "which {region} is the {o} in", "which {region} {has} the {o}", "where in the {img} is the {o}",
        "tell me where the {o} is", "the {o} is where", "the {o} is in which {region}", "locate the {o}",
        "what is the position of the {o}", "what is the location of the {o}", "where does the {o} appear",
        "where do you see the {o}", "where the {o} is", "in what {region} is the {o} {placed}",
        "which {region} of the {img} is the {o} in", "where is the {o} {inimg}", "where would i find the {o}",
    ),
    "existence": (
        "is there a {o}", "is there any {o}", "is there a {o} {inimg}", "are there any {o}s", "do you see a {o}",
        "can you spot a {o}", "does the {img} {has} a {o}", "is the {img} showing a {o}", "is there a {o} anywhere",
        "does a {o} appear {inimg}", "can a {o} be seen", "any {o} {inimg}", "is a {o} there", "do you notice a {o}",
        "is there a {o} here", "does this {img} {has} any {o}", "whether there is a {o}", "is there one {o}",
        "can you find a {o}", "do i see a {o} {inimg}",
    ),
    "detail": (
        "describe the {img} in detail", "describe the {img}", "give a detailed description of the {img}",
        "what is in the {img}? describe it in detail", "describe everything you see", "tell me what the {img} shows",
        "describe this {img} in detail", "write a detailed description of the {img}", "what does the {img} show",
        "give a description of the {img}",
    ),
}
# The indirect order of a question after "can you tell me ...": the verb moves to the end.
INDIRECT_PREFIXES = ("can you tell me", "could you tell me", "please tell me", "tell me", "i want to know",
                     "i'd like to know", "do you know", "i wonder", "let me know")
PREFIXES = ("", "", "", "", "please", "hey,", "question:", "quick question:", "look at the {img}.",
            "based on the {img},", "in this {img},", "hi!", "so", "ok,", "now,", "one more:", "here is my question:",
            "answer briefly:", "please answer:", "looking at the {img},")
SUFFIXES = ("", "", "", "", ", please", " please", ", thanks", " for me", " if you can", " exactly",
            ", if you know", " right now", " then", ", thank you")
FILLERS = ("the", "actually", "exactly", "really", "just", "here", "now", "kindly", "um", "so", "please",
           "there", "this", "visible", "little", "one", "again", "also", "very", "image", "thing", "object")

SYNONYMS: dict[str, tuple[str, ...]] = {
    "col": ("colour", "color", "colour", "color", "hue", "shade", "tint", "colouring", "coloring", "paint colour"),
    "thing": ("shape", "shape", "object", "figure", "thing", "item", "form", "element", "one", "drawing",
              "symbol", "geometric shape", "graphic", "sign"),
    "things": ("shapes", "shapes", "objects", "figures", "things", "items", "forms", "elements", "geometric shapes",
               "symbols", "drawings", "graphics", "pieces"),
    "img": ("image", "picture", "photo", "pic", "scene", "drawing", "frame", "img", "illustration", "view",
            "canvas", "photograph", "grid"),
    "kindw": ("shape", "shape", "kind of shape", "type of shape", "sort of shape", "figure", "form", "kind of object",
              "type of figure", "geometric shape", "type of thing", "kind of thing", "kind", "type", "sort of figure"),
    "region": ("quadrant", "corner", "part", "area", "region", "section", "side", "place", "spot", "position",
               "quarter", "location", "zone"),
    "has": ("contain", "have", "show", "include", "hold", "display"),
    "placed": ("located", "positioned", "placed", "found", "situated", "sitting", "drawn", "shown", "lying",
               "at", "appearing"),
    "prep": ("in the", "in the", "at the", "on the", "in the", "within the", "inside the", "over in the"),
    "pos_noun": ("", "", "", " corner", " quadrant", " part", " area", " region", " side", " section", " spot",
                 " quarter"),
}
_VERTICAL = {"top": ("top", "top", "upper"), "bottom": ("bottom", "bottom", "lower")}
_CONTRACTIONS = (("what is", "what's"), ("where is", "where's"), ("that is", "that's"), ("there is", "there's"),
                 ("how many", "how many"), ("it is", "it's"), ("i would", "i'd"))
_BRACE = re.compile(r"\{(\w+)\}")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, collapsed whitespace: how wordings are compared (the evaluation's
    answer normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _position(pos: str, rng: random.Random) -> str:
    """The position in one of its spellings: "top left", "upper left", "top-left", "lower-right" ..."""
    vertical, horizontal = pos.split(" ")
    v = rng.choice(_VERTICAL[vertical])
    sep = "-" if rng.random() < 0.2 else " "
    return f"{v}{sep}{horizontal}"


def _object(obj: str, rng: random.Random) -> str:
    """"red circle", or with a noun after it ("red circle shape")."""
    if rng.random() < 0.8:
        return obj
    return f"{obj} {rng.choice(('shape', 'object', 'figure', 'thing', 'one', 'item'))}"


def _made_up_word(rng: random.Random) -> str:
    """A string of letters no wording uses: its pieces are seen in training, and meaning nothing."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))


def _fill(core: str, rng: random.Random, pos: str | None, obj: str | None) -> str:
    """Each slot of ``core`` from its synonyms (a fresh draw per slot), the position and the object."""
    def slot(m: re.Match) -> str:
        name = m.group(1)
        if name == "p":
            return _position(pos, rng)
        if name == "at":
            return f"{rng.choice(SYNONYMS['prep'])} {_position(pos, rng)}{rng.choice(SYNONYMS['pos_noun'])}"
        if name == "o":
            return _object(obj, rng)
        if name == "inimg":
            return f"{rng.choice(('in the', 'in this', 'in the', 'on the', 'within the'))} {rng.choice(SYNONYMS['img'])}"
        return rng.choice(SYNONYMS[name])

    return _BRACE.sub(slot, core)


def _insert_fillers(words: list[str], rng: random.Random, protected: set[int]) -> list[str]:
    """One or two filler or made-up words between words (never inside a position or object phrase)."""
    for _ in range(rng.choice((1, 1, 2))):
        at = rng.choice([i for i in range(len(words) + 1) if i not in protected] or [len(words)])
        extra = _made_up_word(rng) if rng.random() < 0.4 else rng.choice(FILLERS)
        words.insert(at, extra)
        protected = {i + 1 if i >= at else i for i in protected}
    return words


def _surface(text: str, rng: random.Random) -> str:
    """Contractions, casing and the end mark."""
    if rng.random() < 0.3:
        for full, short in _CONTRACTIONS:
            text = text.replace(full, short)
    r = rng.random()
    if r < 0.5:
        text = text[:1].upper() + text[1:]
    elif r < 0.58:
        text = text.upper()
    elif r < 0.66:
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    end = rng.choice(("?", "?", "?", "", ".", " ?", "??", "?!")) if not text.endswith(("?", ".")) else ""
    return text.rstrip(" ,") + end


def compose(qtype: str, rng: random.Random, pos: str | None = None, obj: str | None = None) -> str:
    """One question of ``qtype`` (a key of :data:`CORES`) about ``pos``/``obj`` in a random wording."""
    core = rng.choice(CORES[qtype])
    body = _fill(core, rng, pos, obj)
    prefix = ""
    if rng.random() < 0.45:
        if rng.random() < 0.5 and not body.startswith(("count ", "locate ", "name ", "tell ", "identify ",
                                                        "describe ", "give ", "write ", "say ")):
            prefix = rng.choice(INDIRECT_PREFIXES)
            body = _indirect(body)
        else:
            prefix = _fill(rng.choice(PREFIXES), rng, pos, obj)
    words = (prefix + " " + body).split() if prefix else body.split()
    if rng.random() < 0.3:
        keep = _phrase_gaps(words, "how many")
        for phrase in filter(None, (pos, obj)):
            keep |= _phrase_gaps(words, phrase)
        words = _insert_fillers(words, rng, keep)
    return _surface(" ".join(words) + rng.choice(SUFFIXES), rng)


def _indirect(body: str) -> str:
    """ "what colour is the shape in the top left" -> "what colour the shape in the top left is" (some cores
    only; the others stay as they are, which users type too)."""
    for verb in (" is ", " are "):
        head, sep, tail = body.partition(verb)
        if sep and head.split()[0] in ("what", "which", "where", "how") and len(head.split()) <= 3 and tail:
            return f"{head} {tail}{verb.rstrip()}"
    return body


def _phrase_gaps(words: list[str], phrase: str) -> set[int]:
    """Insertion points inside ``phrase`` (and its variants' words) in ``words``, so fillers never split it."""
    gaps = set()
    n = len(phrase.split())
    lowered = [w.lower().strip(",.?:!") for w in words]
    variants = {phrase.split()[0], "upper", "lower"} if n > 1 else {phrase}
    for i, w in enumerate(lowered):
        if w in variants or w.split("-")[0] in variants:
            gaps |= {i + j for j in range(1, n + 1)}
    return gaps
