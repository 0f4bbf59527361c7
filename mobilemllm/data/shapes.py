"""The built-in "shapes" world: a small, fully deterministic synthetic vision-language data set.

The tiny default model is trained and evaluated on this world so that the whole pipeline (alignment
pretraining, instruction tuning, DPO, evaluation, export) can run end to end in minutes on a CPU,
with no download, and with answers that can be checked exactly.

An image is a dark square with 1 to 4 flat shapes, each in a different quadrant ("top left",
"top right", "bottom left", "bottom right"). A shape has a kind (circle, square, triangle, diamond),
a colour (red, green, blue, yellow, purple, white) with pure RGB values, a size (small ~50% of its
quadrant, large ~85%) and a small jitter of its centre. An *object* is the pair "colour kind", for
example "red circle" (24 objects in all).

Everything is a pure function of a seed: scenes and texts come from ``random.Random`` instances
seeded from ``(seed, index)``, never from the global RNG, so the same seed gives byte-identical files
and scene ``i`` does not depend on how many images are generated.

:func:`write_synthetic` writes a split to disk in the LLaVA data format::

    out_dir/images/<id>.png              the rendered images (id: shapes_<seed>_<index:06d>)
    out_dir/pretrain.json                 <image> -> short caption (alignment pretraining)
    out_dir/instruct.json                 multi-turn questions + noisy detailed captions (SFT)
    out_dir/dpo.json                      {id, image, prompt, chosen, rejected} preference pairs
    out_dir/eval_questions.json           single-answer questions with a "type" field
    out_dir/eval_pope_<split>.json        POPE yes/no probes (random, popular, adversarial), "object"
    out_dir/eval_captions.json            detailed-caption prompts with the objects truly present
    out_dir/scenes.json                   the ground-truth scenes
    out_dir/corpus.txt                    all the text, one line each (to train a tokenizer)
    out_dir/meta.json                     parameters, counts per file, format version

Detailed captions used for instruction tuning are *noisy*: with probability ``hallucination_rate``
they mention one object that is not in the image, like web captions. The hallucination benchmarks
(POPE, the hallucinated-object rate of free captions via :func:`parse_objects`) measure how much of
that noise a model reproduces, and DPO pairs (faithful vs. hallucinated caption) reduce it.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (170, 0, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
OBJECTS: tuple[str, ...] = tuple(f"{c} {k}" for c in COLOURS for k in KINDS)

QUESTION_TYPES: tuple[str, ...] = ("colour", "kind", "count", "position", "existence")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DETAIL_PROMPT = "Describe the image in detail."

BACKGROUND: tuple[int, int, int] = (40, 40, 40)
BACKGROUND_NOISE = 6  # +- grey levels of per-pixel background noise
# Side of a shape's bounding box, as a fraction of the quadrant side.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.85}
# Largest centre jitter, as a fraction of the quadrant side (keeps every shape inside its quadrant).
MAX_JITTER: dict[str, float] = {"small": 0.12, "large": 0.05}

_OBJECT_RE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Shape:
    """One shape of a scene. ``dx``/``dy`` shift the centre, in fractions of the quadrant side."""

    kind: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")

    @property
    def object(self) -> str:
        """The "colour kind" name, e.g. ``"red circle"``."""
        return f"{self.colour} {self.kind}"

    def phrase(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.colour} {self.kind}"


@dataclass
class Scene:
    """An image's content: its shapes, in fixed quadrant order, and its id (the image file stem)."""

    shapes: list[Shape]
    id: str = ""

    @property
    def objects(self) -> list[str]:
        """The objects present, one per shape, in quadrant order (may repeat)."""
        return [s.object for s in self.shapes]

    @property
    def positions(self) -> list[str]:
        return [s.position for s in self.shapes]

    def at(self, position: str) -> Shape | None:
        """The shape in ``position``, or None."""
        for s in self.shapes:
            if s.position == position:
                return s
        return None

    def free_positions(self) -> list[str]:
        taken = set(self.positions)
        return [p for p in POSITIONS if p not in taken]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(shapes=[Shape(**s) for s in d["shapes"]], id=d.get("id", ""))


@dataclass(frozen=True)
class Question:
    """A question with exactly one right answer, tagged with its type (one of QUESTION_TYPES)."""

    text: str
    answer: str
    type: str


# --------------------------------------------------------------------------------------- scenes


def scene_id(seed: int, idx: int) -> str:
    """The id (and image file stem) of scene ``idx`` of the split generated with ``seed``."""
    return f"shapes_{seed}_{idx:06d}"


def _rng(seed: int, idx: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and processes.
    return random.Random(f"mobilemllm-shapes:{stream}:{seed}:{idx}")


def sample_scene(rng: random.Random, idx: int, seed: int = 0) -> Scene:
    """Draw a scene of 1-4 shapes in distinct quadrants; its id is ``scene_id(seed, idx)``."""
    n = rng.randint(1, 4)
    taken = set(rng.sample(POSITIONS, n))
    shapes = []
    for position in POSITIONS:  # fixed quadrant order
        if position not in taken:
            continue
        kind = rng.choice(KINDS)
        colour = rng.choice(tuple(COLOURS))
        size = rng.choice(SIZES)
        j = MAX_JITTER[size]
        dx = round(rng.uniform(-j, j), 4)
        dy = round(rng.uniform(-j, j), 4)
        shapes.append(Shape(kind, colour, size, position, dx, dy))
    return Scene(shapes=shapes, id=scene_id(seed, idx))


def shape_center(shape: Shape, image_size: int = 32) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of ``shape`` in an image of side ``image_size``."""
    q = image_size / 2
    row = 0 if shape.position.startswith("top") else 1
    col = 0 if shape.position.endswith("left") else 1
    return ((col + 0.5 + shape.dx) * q, (row + 0.5 + shape.dy) * q)


def shape_box(shape: Shape, image_size: int = 32) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of ``shape`` in pixels."""
    cx, cy = shape_center(shape, image_size)
    r = SIZE_FRACTION[shape.size] * image_size / 4  # half of (fraction * quadrant side)
    return (cx - r, cy - r, cx + r, cy + r)


def render(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``image_size`` (a pure function of the scene)."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    noise_rng = np.random.default_rng(zlib.crc32(scene.id.encode("utf-8")))
    grey = noise_rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(image_size, image_size, 1))
    pixels = np.clip(np.asarray(BACKGROUND, dtype=np.int16) + grey, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = shape_box(s, image_size)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return img


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
    from mobilemllm.data.wordings import word

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


# ---------------------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _single_turn(rid: str, image: str, question: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    }


QUESTION_WORDINGS: tuple[str, ...] = ("canonical", "varied")
PARAPHRASE_TYPES: tuple[str, ...] = QUESTION_TYPES + ("pope",)


def _progress(total: int):
    """A transient rich progress bar (``advance()``/``stop()``)."""
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task("shapes", total=total)
    return bar, task


def _render_image(scene: Scene, image_size: int, images_dir: Path) -> str:
    image = f"{scene.id}.png"
    buf = io.BytesIO()
    render(scene, image_size).save(buf, format="PNG")
    _atomic_write_bytes(images_dir / image, buf.getvalue())
    return image


def _instruct_records(scene: Scene, image: str, turns: list[tuple[str, str]], single_turn: bool) -> list[dict]:
    """One multi-turn record (the image before the first question), or one record per turn."""
    if single_turn:
        return [_single_turn(f"{scene.id}_t{j}", image, q, a) for j, (q, a) in enumerate(turns)]
    conv = []
    for j, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": f"<image>\n{q}" if j == 0 else q}, {"from": "gpt", "value": a}]
    return [{"id": scene.id, "image": image, "conversations": conv}]


def paraphrase_questions(scene: Scene, rng: random.Random) -> list[Question]:
    """One question per type of :data:`PARAPHRASE_TYPES` in a held-out wording (POPE's question included)."""
    wording = random.Random(rng.random())
    out = [ask(scene, rng, t, wording, held_out=True) for t in PARAPHRASE_TYPES]
    return [q for q in out if q is not None]


def write_synthetic(
    out_dir: str | os.PathLike[str],
    num_images: int = 2000,
    seed: int = 0,
    image_size: int = 32,
    hallucination_rate: float = 0.3,
    split: str = "train",
    progress: bool = False,
    single_turn: bool = False,
    question_wordings: str = "canonical",
) -> dict[str, Any]:
    """Generate ``num_images`` scenes from ``seed`` and write images and LLaVA-format files.

    ``single_turn``: write each turn of an instruction conversation as its own record (ids ``<id>_t<j>``),
    so every question and every detailed caption is asked right next to the image (with a question-first
    template, before it) instead of in later turns after it; the texts are the same.
    ``question_wordings``: ``varied`` words the training questions and caption requests of a ``train`` split
    (instruct.json, eval_questions.json, dpo.json) in many ways (mobilemllm.data.wordings.TRAIN_WORDINGS);
    the content and answers are those of ``canonical``. The evaluation files of an ``eval`` split keep the
    canonical wording; ``eval_paraphrase.json`` (every split) asks in held-out wordings never used in training.

    Every file is written atomically. Returns the meta dict (also written to ``meta.json``).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 0.0 <= hallucination_rate <= 1.0:
        raise ValueError(f"hallucination_rate must be in [0, 1], got {hallucination_rate}")
    if question_wordings not in QUESTION_WORDINGS:
        raise ValueError(f"unknown question_wordings {question_wordings!r}; expected one of {QUESTION_WORDINGS}")
    from mobilemllm.data.wordings import detail_prompt

    vary = question_wordings == "varied" and split == "train"
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    scenes = [sample_scene(_rng(seed, i, "scene"), i, seed) for i in range(num_images)]
    popularity = object_popularity(scenes)
    files: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "pretrain.json", "instruct.json", "dpo.json", "eval_questions.json",
        *(f"eval_pope_{s}.json" for s in POPE_SPLITS), "eval_captions.json", "eval_paraphrase.json")}
    corpus: list[str] = []
    hallucinated_captions = 0

    bar, task = _progress(num_images) if progress else (None, None)
    try:
        for i, scene in enumerate(scenes):
            image = _render_image(scene, image_size, images_dir)
            # a separate stream picks the wordings, so the content drawn below is the same in either setting
            wording = _rng(seed, i, "wording") if vary else None

            # Alignment pretraining.
            cap = caption(scene)
            files["pretrain.json"].append({"id": scene.id, "image": image, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap}]})
            corpus.append(cap)

            # Instruction tuning: 2-4 questions, plus a noisy detailed caption for about half.
            rng = _rng(seed, i, "instruct")
            turns = [(q.text, q.answer) for q in sample_questions(scene, rng, rng.randint(2, 4), wording)]
            if rng.random() < 0.5:
                text, fake = detailed_caption(scene, rng, hallucination_rate)
                hallucinated_captions += bool(fake)
                turns.insert(rng.randint(0, len(turns)), (detail_prompt(wording), text))
            corpus += [t for qa in turns for t in qa]
            files["instruct.json"] += _instruct_records(scene, image, turns, single_turn)

            # Preference pairs.
            pair = preference_pair(scene, _rng(seed, i, "dpo"), detail_prompt(wording))
            files["dpo.json"].append({"id": scene.id, "image": image, "prompt": pair["prompt"],
                                      "chosen": pair["chosen"], "rejected": pair["rejected"]})
            corpus += [pair["prompt"], pair["chosen"], pair["rejected"]]

            # Evaluation: one question of each askable type.
            rng = _rng(seed, i, "eval")
            for qtype in QUESTION_TYPES:
                q = ask(scene, rng, qtype, wording)
                if q is None:
                    continue
                files["eval_questions.json"].append(
                    _single_turn(f"{scene.id}_{qtype}", image, q.text, q.answer, type=qtype))
                corpus += [q.text, q.answer]

            for name in POPE_SPLITS:
                probes = pope_probes(scene, _rng(seed, i, f"pope_{name}"), name, popularity)
                for j, (q, a, obj) in enumerate(probes):
                    files[f"eval_pope_{name}.json"].append(
                        _single_turn(f"{scene.id}_pope_{name}_{j}", image, q, a, object=obj))
                    corpus += [q, a]

            files["eval_captions.json"].append({"id": scene.id, "image": image, "prompt": DETAIL_PROMPT,
                                                "objects": scene.objects, "reference": pair["chosen"]})
            # Held-out wordings: never in the corpus or any training file.
            for q in paraphrase_questions(scene, _rng(seed, i, "paraphrase")):
                files["eval_paraphrase.json"].append(
                    _single_turn(f"{scene.id}_para_{q.type}", image, q.text, q.answer, type=q.type))
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()

    files["scenes.json"] = [sc.to_dict() for sc in scenes]
    for name, records in files.items():
        _atomic_write_json(out / name, records)
    _atomic_write_bytes(out / "corpus.txt", ("\n".join(corpus) + "\n").encode("utf-8"))

    counts = {name: len(records) for name, records in files.items()}
    counts["corpus.txt"] = len(corpus)
    counts["images"] = num_images
    meta = {
        "dataset": "shapes",
        "format_version": FORMAT_VERSION,
        "split": split,
        "seed": seed,
        "num_images": num_images,
        "image_size": image_size,
        "hallucination_rate": hallucination_rate,
        "single_turn": single_turn,
        "question_wordings": question_wordings,
        "image_folder": "images",
        "hallucinated_instruct_captions": hallucinated_captions,
        "pope_popular_ranking": popularity,
        "counts": counts,
    }
    _atomic_write_json(out / "meta.json", meta)
    return meta


def corpus_lines(num_images: int = 400, seed: int = 0) -> Iterator[str]:
    """The world's text (captions, questions, answers, detailed captions) without writing any files,
    for training the tiny tokenizer in memory."""
    for idx in range(num_images):
        scene = sample_scene(_rng(seed, idx, "scene"), idx, seed=seed)
        rng = _rng(seed, idx, "corpus")
        yield caption(scene)
        yield detailed_caption(scene, rng, hallucination_rate=0.5)[0]
        for q in sample_questions(scene, rng, 5):
            yield q.text
            yield q.answer
        for split in POPE_SPLITS[:1]:
            for q, a, _ in pope_probes(scene, rng, split):
                yield q
                yield a
    yield DETAIL_PROMPT
