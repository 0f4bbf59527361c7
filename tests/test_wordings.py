"""The compositional wording grammar (``question_wordings: compositional``): thousands of wordings per question
type that keep the words deciding the answer, never a held-out wording or POPE's question, and a train split
written with it that changes only the wordings."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mobilemllm.data.shapes import OBJECTS, POSITIONS, QUESTION_TYPES, write_synthetic
from mobilemllm.data.wording_grammar import CORES, compose, normalize
from mobilemllm.data.wordings import HELD_OUT_WORDINGS, POPE_WORDING, Composed, held_out_inside, word

# what a question of each type must still say, whatever the wording (normalised text)
KEY_WORDS = {
    "colour": ("colour", "color", "hue", "shade", "tint"),
    "count": ("how many", "number", "count", "total"),
}


def _draws(qtype: str, n: int, seed: int = 0) -> list[tuple[str, str | None, str | None]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos = rng.choice(POSITIONS) if qtype in ("colour", "kind") else None
        obj = rng.choice(OBJECTS) if qtype in ("position", "existence") else None
        out.append((compose(qtype, rng, pos=pos, obj=obj), pos, obj))
    return out


def test_each_type_gets_many_wordings_that_keep_the_asked_position_or_object():
    for qtype in QUESTION_TYPES:
        draws = _draws(qtype, 300)
        # distinct once the slot is taken out: the variety is in the wording, not in the content
        shapes = {normalize(q).replace(normalize(obj or ""), "OBJ") for q, _, obj in draws}
        assert len(shapes) > 150, (qtype, len(shapes))
        for q, pos, obj in draws:
            text = normalize(q)
            if pos is not None:
                vertical, horizontal = pos.split(" ")
                assert horizontal in text and (vertical in text or {"top": "upper", "bottom": "lower"}[vertical] in text), q
            if obj is not None:
                assert obj in text, q
            if qtype in KEY_WORDS:
                assert any(key in text for key in KEY_WORDS[qtype]), q


def test_casing_fillers_and_prefixes_occur():
    texts = [q for t in QUESTION_TYPES for q, _, _ in _draws(t, 300, seed=1)]
    assert any(q.isupper() for q in texts)                       # ALL CAPS
    assert any(q[:1].islower() for q in texts)                   # lower case
    assert any(normalize(q).startswith(("can you tell me", "could you tell me")) for q in texts)
    assert any("'" in q for q in texts)                          # contractions
    words = {w for q in texts for w in normalize(q).split()}
    core_words = {w for cores in CORES.values() for c in cores for w in normalize(c).split()}
    assert len(words - core_words) > 200                         # synonyms, fillers and made-up words


def test_no_generated_question_holds_a_held_out_wording_or_popes_question():
    rng = Composed(7)
    for _ in range(1000):
        obj = rng.choice(OBJECTS)
        for qtype in ("existence", "position"):
            q = word(qtype, rng, obj=obj)
            assert not held_out_inside(q, obj=obj), q
    # the check itself sees POPE's question and a held-out wording inside a longer question, in any casing
    assert held_out_inside("Please, IS THERE A red circle in the image, thanks", obj="red circle")
    assert held_out_inside("so: " + HELD_OUT_WORDINGS["existence"][2].format(obj="blue square").lower(),
                           obj="blue square")
    assert not held_out_inside("Is there a red circle in the picture?", obj="red circle")
    assert POPE_WORDING.format(obj="red circle") == "Is there a red circle in the image?"


def _load(folder: Path, name: str):
    return json.loads((folder / name).read_text())


def test_compositional_split_changes_only_wordings_and_adds_copies(tmp_path: Path):
    """The first copy of each question has the canonical split's content and answer; copies add questions;
    an eval split stays canonical; the same seed writes the same bytes."""
    canon, comp, again = tmp_path / "c", tmp_path / "x", tmp_path / "y"
    write_synthetic(canon, num_images=12, seed=3)
    meta = write_synthetic(comp, num_images=12, seed=3, question_wordings="compositional", question_copies=3)
    write_synthetic(again, num_images=12, seed=3, question_wordings="compositional", question_copies=3)
    assert (comp / "eval_questions.json").read_bytes() == (again / "eval_questions.json").read_bytes()
    base = {r["id"]: r for r in _load(canon, "eval_questions.json")}
    recs = _load(comp, "eval_questions.json")
    assert meta["counts"]["eval_questions.json"] == len(recs) > 2 * len(base)
    firsts = [r for r in recs if r["id"] in base]
    assert len(firsts) == len(base)
    assert all(r["conversations"][1] == base[r["id"]]["conversations"][1] for r in firsts)
    assert sum(r["conversations"][0] != base[r["id"]]["conversations"][0] for r in firsts) > len(base) // 2
    ev = tmp_path / "ev"
    write_synthetic(ev, num_images=12, seed=3, split="eval", question_wordings="compositional", question_copies=3)
    assert (ev / "eval_questions.json").read_bytes() == (canon / "eval_questions.json").read_bytes()
    corpus = " | ".join(normalize(line) for line in (comp / "corpus.txt").read_text().splitlines())
    assert not [o for o in OBJECTS if normalize(POPE_WORDING.format(obj=o)) in corpus]


def test_canonical_questions_file_is_the_canonical_split_s_first_questions(tmp_path: Path):
    """questions_canonical.json (the tiny recipe's curriculum) holds the canonical split's questions, word for
    word, whatever the wording setting; only a train split has it; its texts are in the tokenizer's corpus."""
    canon, comp, ev = tmp_path / "c", tmp_path / "x", tmp_path / "ev"
    write_synthetic(canon, num_images=12, seed=3)
    write_synthetic(comp, num_images=12, seed=3, question_wordings="compositional", question_copies=3)
    write_synthetic(ev, num_images=12, seed=3, split="eval")
    base = _load(canon, "eval_questions.json")
    assert _load(canon, "questions_canonical.json") == base == _load(comp, "questions_canonical.json")
    assert not (ev / "questions_canonical.json").exists()
    comp_corpus = set((comp / "corpus.txt").read_text().splitlines())
    assert {r["conversations"][0]["value"].removeprefix("<image>\n") for r in base} <= comp_corpus
