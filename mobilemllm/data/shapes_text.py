"""The shapes world's texts: captions, detailed captions with planted hallucinations, preference pairs,
single-answer questions (canonical, varied or held-out wordings: :mod:`mobilemllm.data.wordings`), POPE probes,
and the object parser the caption-hallucination metric uses."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from mobilemllm.data.shapes_scene import (COLOURS, KINDS, OBJECTS, POSITIONS, SIZES, Scene, Shape, _rng,
                                          sample_scene)
from mobilemllm.data.wordings import word

QUESTION_TYPES: tuple[str, ...] = ("colour", "kind", "count", "position", "existence")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DETAIL_PROMPT = "Describe the image in detail."

_OBJECT_RE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b", re.IGNORECASE
)
PARAPHRASE_TYPES: tuple[str, ...] = QUESTION_TYPES + ("pope",)


@dataclass(frozen=True)
class Question:
    """A question with exactly one right answer, tagged with its type (one of QUESTION_TYPES)."""

    text: str
    answer: str
    type: str


# ----------------------------------------------------------------------------------------- text


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, shapes: Sequence[Shape] | None = None) -> str:
    """Short caption: "a large red circle in the top left and ..." (``shapes``: the order to name them in;
    default quadrant order)."""
    shapes = scene.shapes if shapes is None else shapes
    return _join([f"a {s.phrase()} in the {s.position}" for s in shapes]) + "."


def _sentence(shape: Shape) -> str:
    return f"A {shape.phrase()} is in the {shape.position}."


def _count_sentence(n: int) -> str:
    return "There is 1 shape." if n == 1 else f"There are {n} shapes."


def absent_objects(scene: Scene) -> list[str]:
    """Objects not in the scene, in OBJECTS order."""
    present = set(scene.objects)
    return [o for o in OBJECTS if o not in present]


def _hallucinated_shape(scene: Scene, rng: random.Random, allow_occupied: bool) -> Shape | None:
    free = scene.free_positions()
    if not free:
        if not allow_occupied:
            return None
        free = list(POSITIONS)
    position = rng.choice(free)
    colour, kind = rng.choice(absent_objects(scene)).split(" ")
    return Shape(kind, colour, rng.choice(SIZES), position)


def _detailed_text(scene: Scene, extra: Shape | None) -> str:
    """The count, then one sentence per shape in quadrant order; ``extra`` (a hallucinated shape) goes in its
    quadrant's place (after a real shape of the same quadrant), so its place does not give it away."""
    sentences = [_count_sentence(len(scene.shapes))]
    order = {p: i for i, p in enumerate(POSITIONS)}
    sentences += [_sentence(s) for s in scene.shapes]
    if extra is not None:
        at = sum(1 for s in scene.shapes if order[s.position] <= order[extra.position])
        sentences.insert(1 + at, _sentence(extra))
    return " ".join(sentences)


def detailed_caption(scene: Scene, rng: random.Random, hallucination_rate: float = 0.0) -> tuple[str, list[str]]:
    """"There are 2 shapes. A large red circle is in the top left. ..." and the hallucinated objects.

    With probability ``hallucination_rate`` one sentence about an absent object, in a free quadrant,
    is added (skipped when every quadrant is taken).
    """
    extra = None
    if rng.random() < hallucination_rate:
        extra = _hallucinated_shape(scene, rng, allow_occupied=False)
    return _detailed_text(scene, extra), ([extra.object] if extra else [])


def preference_pair(scene: Scene, rng: random.Random, prompt: str = DETAIL_PROMPT) -> dict[str, Any]:
    """A DPO pair: chosen = faithful detailed caption, rejected = it plus one hallucinated object.

    The hallucinated sentence goes to a free quadrant, or to an occupied one when all are taken.
    """
    extra = _hallucinated_shape(scene, rng, allow_occupied=True)
    assert extra is not None
    return {
        "prompt": prompt,
        "chosen": _detailed_text(scene, None),
        "rejected": _detailed_text(scene, extra),
        "hallucinated": [extra.object],
    }


def omission_pair(scene: Scene, rng: random.Random, prompt: str = DETAIL_PROMPT) -> dict[str, Any]:
    """A preference pair against describing too little: chosen = the faithful detailed caption, rejected = the
    same caption without one shape's sentence (scenes of 2+ shapes, 3 times in 4), else an answer that describes
    nothing (the count alone, "yes" or "no").

    preference_pair's rejected captions only ever add an object, so a model trained on those pairs alone can
    score well by naming less, or nothing; these pairs put that failure on the rejected side."""
    chosen = _detailed_text(scene, None)
    if len(scene.shapes) > 1 and rng.random() < 0.75:
        left_out = rng.randrange(len(scene.shapes))
        kept = [s for j, s in enumerate(scene.shapes) if j != left_out]
        rejected = " ".join([_count_sentence(len(scene.shapes))] + [_sentence(s) for s in kept])
        omitted = [scene.shapes[left_out].object]
    else:
        rejected = rng.choice([_count_sentence(len(scene.shapes)), "yes", "no"])
        omitted = list(scene.objects)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "omitted": omitted}


def substitution_pair(scene: Scene, rng: random.Random, prompt: str = DETAIL_PROMPT) -> dict[str, Any]:
    """A preference pair against misnaming a shape that is there: chosen = the faithful detailed caption,
    rejected = the same caption with one shape's colour or kind (one of the two, at random) changed.

    A captioning model's own hallucinations are mostly of this kind (a real shape in the wrong colour or
    kind), where preference_pair's rejected caption adds a shape that is not there at all."""
    j = rng.randrange(len(scene.shapes))
    old = scene.shapes[j]
    if rng.random() < 0.5:
        new = Shape(old.kind, rng.choice([c for c in COLOURS if c != old.colour]), old.size, old.position)
    else:
        new = Shape(rng.choice([k for k in KINDS if k != old.kind]), old.colour, old.size, old.position)
    shapes = [new if i == j else s for i, s in enumerate(scene.shapes)]
    rejected = " ".join([_count_sentence(len(shapes))] + [_sentence(s) for s in shapes])
    return {"prompt": prompt, "chosen": _detailed_text(scene, None), "rejected": rejected,
            "misnamed": [old.object, new.object]}


def parse_objects(text: str) -> set[str]:
    """Every "colour kind" object mentioned in ``text`` (case-insensitive, plurals accepted)."""
    return {f"{c.lower()} {k.lower()}" for c, k in _OBJECT_RE.findall(text)}


def _share_attribute(obj: str, others: Iterable[str]) -> bool:
    c, k = obj.split(" ")
    return any(o != obj and (o.split(" ")[0] == c or o.split(" ")[1] == k) for o in others)


def adversarial_candidates(scene: Scene) -> list[str]:
    """Absent objects sharing a colour or a kind with a present object, in OBJECTS order."""
    present = set(scene.objects)
    return [o for o in absent_objects(scene) if _share_attribute(o, present)]


def ask(scene: Scene, rng: random.Random, qtype: str, wording: random.Random | None = None,
        held_out: bool = False) -> Question | None:
    """One question of type ``qtype`` about ``scene`` (None if that type cannot be asked). ``wording``: draw
    the wording from :data:`~mobilemllm.data.wordings.TRAIN_WORDINGS` with this rng (default: the canonical
    one), or from the held-out paraphrases; the content drawn from ``rng`` is the same either way."""
    def text(**slots: str) -> str:
        return word(qtype, wording, held_out=held_out, **slots)

    if qtype == "colour":
        s = rng.choice(scene.shapes)
        return Question(text(pos=s.position), s.colour, qtype)
    if qtype == "kind":
        s = rng.choice(scene.shapes)
        return Question(text(pos=s.position), s.kind, qtype)
    if qtype == "count":
        return Question(text(), str(len(scene.shapes)), qtype)
    if qtype == "position":
        counts = Counter(scene.objects)
        unique = [s for s in scene.shapes if counts[s.object] == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        return Question(text(obj=s.object), s.position, qtype)
    if qtype in ("existence", "pope"):
        if rng.random() < 0.5:
            obj, answer = rng.choice(scene.objects), "yes"
        else:
            hard = adversarial_candidates(scene)
            pool = hard if hard and rng.random() < 0.5 else absent_objects(scene)
            obj, answer = rng.choice(pool), "no"
        return Question(text(obj=obj), answer, qtype)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def sample_questions(scene: Scene, rng: random.Random, n: int, wording: random.Random | None = None) -> list[Question]:
    """Up to ``n`` distinct questions of random types (``wording``: as :func:`ask`)."""
    out: list[Question] = []
    seen: set[str] = set()
    for _ in range(20 * n):
        if len(out) >= n:
            break
        q = ask(scene, rng, rng.choice(QUESTION_TYPES), wording)
        if q is not None and q.text not in seen:
            seen.add(q.text)
            out.append(q)
    return out


def object_popularity(scenes: Iterable[Scene]) -> list[str]:
    """All objects, most frequent first (by number of images containing them), ties in OBJECTS order."""
    freq: Counter[str] = Counter()
    for scene in scenes:
        freq.update(set(scene.objects))
    return sorted(OBJECTS, key=lambda o: (-freq[o], OBJECTS.index(o)))


def pope_question(obj: str) -> str:
    return f"Is there a {obj} in the image?"


def pope_probes(
    scene: Scene,
    rng: random.Random,
    split: str,
    popularity: Sequence[str] | None = None,
    max_per_label: int = 3,
) -> list[tuple[str, str, str]]:
    """POPE yes/no probes ``(question, answer, object)``: as many positives as negatives.

    Negatives: ``random`` absent objects, the most ``popular`` absent objects of the split
    (``popularity`` from :func:`object_popularity`), or ``adversarial`` ones sharing colour or kind
    with a present object.
    """
    present = sorted(set(scene.objects), key=OBJECTS.index)
    k = min(max_per_label, len(present))
    if split == "random":
        pool = absent_objects(scene)
        negatives = rng.sample(pool, min(k, len(pool)))
    elif split == "popular":
        ranking = popularity if popularity is not None else OBJECTS
        absent = set(absent_objects(scene))
        negatives = [o for o in ranking if o in absent][:k]
    elif split == "adversarial":
        pool = adversarial_candidates(scene)
        negatives = rng.sample(pool, min(k, len(pool)))
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    positives = rng.sample(present, len(negatives))
    probes = [(pope_question(o), "yes", o) for o in positives]
    probes += [(pope_question(o), "no", o) for o in negatives]
    rng.shuffle(probes)
    return probes


def paraphrase_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question per type of :data:`PARAPHRASE_TYPES` in a held-out wording (POPE's question included)."""
    wording = random.Random(rng.random())
    out = [ask(scene, rng, t, wording, held_out=True) for t in PARAPHRASE_TYPES]
    return [q for q in out if q is not None]


def corpus_lines(num_images: int = 400, seed: int = 0) -> Iterator[str]:
    """The world's text (captions, questions, answers, detailed captions) without writing any files,
    for training the tiny tokenizer in memory. POPE's question is not in it: it is an evaluation wording."""
    for idx in range(num_images):
        scene = sample_scene(_rng(seed, idx, "scene"), idx, seed=seed)
        rng = _rng(seed, idx, "corpus")
        yield caption(scene)
        yield detailed_caption(scene, rng, hallucination_rate=0.5)[0]
        for q in sample_questions(scene, rng, 5):
            yield q.text
            yield q.answer
    yield DETAIL_PROMPT
