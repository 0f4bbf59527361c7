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
    out_dir/dpo_omissions.json            preference pairs whose rejected caption leaves an object out
    out_dir/dpo_substitutions.json        preference pairs whose rejected caption misnames a shape
    out_dir/eval_questions.json           single-answer questions with a "type" field
    out_dir/eval_pope_<split>.json        POPE yes/no probes (random, popular, adversarial), "object"
    out_dir/eval_captions.json            detailed-caption prompts with the objects truly present
    out_dir/eval_paraphrase.json          every question type (and POPE's) in held-out wordings
    out_dir/scenes.json                   the ground-truth scenes
    out_dir/corpus.txt                    all the text, one line each (to train a tokenizer)
    out_dir/meta.json                     parameters, counts per file, format version

Detailed captions used for instruction tuning are *noisy*: with probability ``hallucination_rate``
they mention one object that is not in the image, like web captions. The hallucination benchmarks
(POPE, the hallucinated-object rate of free captions via :func:`parse_objects`) measure how much of
that noise a model reproduces, and DPO pairs (faithful vs. hallucinated caption) reduce it; the omission
pairs (faithful vs. a caption that leaves an object out or describes nothing) keep a model that learns from
them describing.

This module writes the files; the scenes (sampling, rendering) are in :mod:`mobilemllm.data.shapes_scene`, the
texts (captions, questions, POPE probes) in :mod:`mobilemllm.data.shapes_text`, the wordings in
:mod:`mobilemllm.data.wordings`. Their public names are importable from here too.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any

from rich.progress import Progress

from mobilemllm.data.shapes_scene import (BACKGROUND, BACKGROUND_NOISE, COLOURS, KINDS, MAX_JITTER,  # noqa: F401
                                          OBJECTS, POSITIONS, SIZE_FRACTION, SIZES, Scene, Shape, _rng, render,
                                          sample_scene, scene_id, shape_box, shape_center)
from mobilemllm.data.shapes_text import (DETAIL_PROMPT, PARAPHRASE_TYPES, POPE_SPLITS, QUESTION_TYPES,  # noqa: F401
                                         Question, absent_objects, adversarial_candidates, ask, caption,
                                         corpus_lines, detailed_caption, object_popularity, paraphrase_questions,
                                         omission_pair, parse_objects, pope_probes, pope_question, preference_pair,
                                         substitution_pair,
                                         sample_questions)
from mobilemllm.data.wordings import Composed, detail_prompt

FORMAT_VERSION = 4  # 2: a train split has questions_canonical.json; 3: dpo_omissions.json; 4: dpo_substitutions.json


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


QUESTION_WORDINGS: tuple[str, ...] = ("canonical", "varied", "compositional")


def _progress(total: int):
    """A transient rich progress bar (``advance()``/``stop()``)."""
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
    question_copies: int = 1,
) -> dict[str, Any]:
    """Generate ``num_images`` scenes from ``seed`` and write images and LLaVA-format files.

    ``single_turn``: write each turn of an instruction conversation as its own record (ids ``<id>_t<j>``),
    so every question and every detailed caption is asked right next to the image (with a question-first
    template, before it) instead of in later turns after it; the texts are the same.
    ``question_wordings``: how the training questions and caption requests of a ``train`` split (instruct.json,
    eval_questions.json, dpo.json) are worded: ``canonical`` (one wording per type), ``varied`` (a few per type,
    mobilemllm.data.wordings.TRAIN_WORDINGS) or ``compositional`` (generated by
    mobilemllm.data.wording_grammar: thousands per type); the content and answers are those of ``canonical``.
    ``question_copies``: questions of each type per image in a train split's eval_questions.json (each drawn
    and worded anew; ids ``<id>_<type>_<j>`` after the first), more wordings for the same steps.
    A train split also writes ``questions_canonical.json``: its first question of each type in the canonical
    wording, whatever ``question_wordings`` is (a curriculum learns the look-ups on it before the wordings).
    The evaluation files of an ``eval`` split keep the canonical wording and one question per type;
    ``eval_paraphrase.json`` (every split) asks in held-out wordings never used in training.

    Every file is written atomically. Returns the meta dict (also written to ``meta.json``).
    """
    opts = dict(seed=seed, image_size=image_size, hallucination_rate=hallucination_rate, split=split,
                single_turn=single_turn, question_wordings=question_wordings, question_copies=question_copies)
    _check_options(num_images, **opts)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = [sample_scene(_rng(seed, i, "scene"), i, seed) for i in range(num_images)]
    popularity = object_popularity(scenes)
    files: dict[str, list[dict[str, Any]]] = {name: [] for name in (
        "pretrain.json", "instruct.json", "dpo.json", "dpo_omissions.json", "dpo_substitutions.json",
        "eval_questions.json",
        *(("questions_canonical.json",) if split == "train" else ()), *(f"eval_pope_{s}.json" for s in POPE_SPLITS), "eval_captions.json", "eval_paraphrase.json")}
    corpus: list[str] = []
    hallucinated = 0
    bar, task = _progress(num_images) if progress else (None, None)
    try:
        for i, scene in enumerate(scenes):
            hallucinated += _write_scene(scene, i, out, files, corpus, popularity, opts)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    files["scenes.json"] = [sc.to_dict() for sc in scenes]
    return _write_files(out, files, corpus, _meta(num_images, hallucinated, popularity, opts))


def _check_options(num_images: int, *, image_size: int, hallucination_rate: float, question_wordings: str,
                   question_copies: int, **_: Any) -> None:
    """Refuse bad options before any file is written (one ValueError line; the pipeline makes it a ConfigError)."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 0.0 <= hallucination_rate <= 1.0:
        raise ValueError(f"hallucination_rate must be in [0, 1], got {hallucination_rate}")
    if question_wordings not in QUESTION_WORDINGS:
        raise ValueError(f"unknown question_wordings {question_wordings!r}; expected one of {QUESTION_WORDINGS}")
    if question_copies < 1:
        raise ValueError(f"question_copies must be at least 1, got {question_copies}")


def _wording_stream(seed: int, i: int, opts: dict[str, Any]) -> random.Random | None:
    """The rng that picks scene ``i``'s training wordings (None: canonical). A stream of its own, so the
    content drawn from the other streams is the same in every wording setting."""
    if opts["split"] != "train" or opts["question_wordings"] == "canonical":
        return None
    if opts["question_wordings"] == "compositional":
        return Composed(_rng(seed, i, "wording").random())
    return _rng(seed, i, "wording")


def _write_scene(scene: Scene, i: int, out: Path, files: dict[str, list], corpus: list[str],
                 popularity: list[str], opts: dict[str, Any]) -> int:
    """Render scene ``i`` and append its records to every file and its texts to the corpus; returns the number
    of instruction captions given a planted hallucination (0 or 1)."""
    seed = opts["seed"]
    image = _render_image(scene, opts["image_size"], out / "images")
    wording = _wording_stream(seed, i, opts)
    cap = caption(scene)  # alignment pretraining
    files["pretrain.json"].append({"id": scene.id, "image": image, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": cap}]})
    corpus.append(cap)
    hallucinated = _instruct_part(scene, i, image, wording, files, corpus, opts)
    pair = preference_pair(scene, _rng(seed, i, "dpo"), detail_prompt(wording))
    files["dpo.json"].append({"id": scene.id, "image": image, "prompt": pair["prompt"],
                              "chosen": pair["chosen"], "rejected": pair["rejected"]})
    corpus += [pair["prompt"], pair["chosen"], pair["rejected"]]
    # their own rng streams, and no new text for the corpus: every other file stays as it was
    omit = omission_pair(scene, _rng(seed, i, "omission"), pair["prompt"])
    files["dpo_omissions.json"].append({"id": f"{scene.id}_omission", "image": image, "prompt": omit["prompt"],
                                        "chosen": omit["chosen"], "rejected": omit["rejected"]})
    swap = substitution_pair(scene, _rng(seed, i, "substitution"), pair["prompt"])
    files["dpo_substitutions.json"].append({"id": f"{scene.id}_substitution", "image": image,
                                            "prompt": swap["prompt"], "chosen": swap["chosen"],
                                            "rejected": swap["rejected"]})
    _question_part(scene, i, image, wording, files, corpus, opts)
    _evaluation_part(scene, i, image, pair["chosen"], files, popularity, seed)
    return hallucinated


def _instruct_part(scene: Scene, i: int, image: str, wording, files: dict[str, list], corpus: list[str],
                   opts: dict[str, Any]) -> int:
    """instruct.json: 2-4 questions, plus a noisy detailed caption for about half the images."""
    rng = _rng(opts["seed"], i, "instruct")
    turns = [(q.text, q.answer) for q in sample_questions(scene, rng, rng.randint(2, 4), wording)]
    fake: list[str] = []
    if rng.random() < 0.5:
        text, fake = detailed_caption(scene, rng, opts["hallucination_rate"])
        turns.insert(rng.randint(0, len(turns)), (detail_prompt(wording), text))
    corpus += [t for qa in turns for t in qa]
    files["instruct.json"] += _instruct_records(scene, image, turns, opts["single_turn"])
    return int(bool(fake))


def _question_part(scene: Scene, i: int, image: str, wording, files: dict[str, list], corpus: list[str],
                   opts: dict[str, Any]) -> None:
    """eval_questions.json: one question of each askable type (``question_copies`` of each in a train split);
    a train split's questions_canonical.json: the first of each type, canonically worded."""
    if opts["split"] == "train":
        rng = _rng(opts["seed"], i, "eval")
        for qtype in QUESTION_TYPES:
            q = ask(scene, rng, qtype, None)
            if q is not None:
                files["questions_canonical.json"].append(
                    _single_turn(f"{scene.id}_{qtype}", image, q.text, q.answer, type=qtype))
                if wording is not None:  # canonical: the same texts as eval_questions.json's
                    corpus += [q.text, q.answer]
    rng = _rng(opts["seed"], i, "eval")
    copies = opts["question_copies"] if opts["split"] == "train" else 1
    for j in range(copies):
        for qtype in QUESTION_TYPES:
            q = ask(scene, rng, qtype, wording)
            if q is None:
                continue
            rid = f"{scene.id}_{qtype}" + (f"_{j}" if j else "")
            files["eval_questions.json"].append(_single_turn(rid, image, q.text, q.answer, type=qtype))
            corpus += [q.text, q.answer]


def _evaluation_part(scene: Scene, i: int, image: str, reference: str, files: dict[str, list],
                     popularity: list[str], seed: int) -> None:
    """The evaluation-only files: POPE probes, caption prompts, held-out paraphrases. None of their texts go
    to the corpus (POPE's question and the paraphrases must stay unseen by every stage)."""
    for name in POPE_SPLITS:
        for j, (q, a, obj) in enumerate(pope_probes(scene, _rng(seed, i, f"pope_{name}"), name, popularity)):
            files[f"eval_pope_{name}.json"].append(_single_turn(f"{scene.id}_pope_{name}_{j}", image, q, a, object=obj))
    files["eval_captions.json"].append({"id": scene.id, "image": image, "prompt": DETAIL_PROMPT,
                                        "objects": scene.objects, "reference": reference})
    for q in paraphrase_questions(scene, _rng(seed, i, "paraphrase")):
        files["eval_paraphrase.json"].append(_single_turn(f"{scene.id}_para_{q.type}", image, q.text, q.answer,
                                                          type=q.type))


def _meta(num_images: int, hallucinated: int, popularity: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    """meta.json: the options a folder was written with (the pipeline reuses a folder only when they match)."""
    return {"dataset": "shapes", "format_version": FORMAT_VERSION, "split": opts["split"], "seed": opts["seed"],
            "num_images": num_images, "image_size": opts["image_size"],
            "hallucination_rate": opts["hallucination_rate"], "single_turn": opts["single_turn"],
            "question_wordings": opts["question_wordings"], "question_copies": opts["question_copies"],
            "image_folder": "images", "hallucinated_instruct_captions": hallucinated,
            "pope_popular_ranking": popularity}


def _write_files(out: Path, files: dict[str, list], corpus: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    """Every JSON file, corpus.txt and meta.json (with the record counts), each atomically; returns meta."""
    for name, records in files.items():
        _atomic_write_json(out / name, records)
    _atomic_write_bytes(out / "corpus.txt", ("\n".join(corpus) + "\n").encode("utf-8"))
    counts = {name: len(records) for name, records in files.items()}
    counts["corpus.txt"] = len(corpus)
    counts["images"] = meta["num_images"]
    meta["counts"] = counts
    _atomic_write_json(out / "meta.json", meta)
    return meta
