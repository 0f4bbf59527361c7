"""Tests of the synthetic shapes world (mobilemllm.data.shapes)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from mobilemllm.data import shapes as S
from mobilemllm.data.shapes import (
    COLOURS,
    OBJECTS,
    POSITIONS,
    Scene,
    Shape,
    ask,
    caption,
    detailed_caption,
    omission_pair,
    parse_objects,
    pope_probes,
    preference_pair,
    render,
    sample_scene,
    substitution_pair,
    write_synthetic,
)

N = 40  # images per generated split in these tests


def scenes(n: int = 200, seed: int = 0) -> list[Scene]:
    return [sample_scene(random.Random(f"{seed}-{i}"), i, seed) for i in range(n)]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "train"
    write_synthetic(out, num_images=N, seed=3, hallucination_rate=0.5)
    return out


def load(out: Path, name: str):
    return json.loads((out / name).read_text(encoding="utf-8"))


def scene_map(out: Path) -> dict[str, Scene]:
    return {d["id"] + ".png": Scene.from_dict(d) for d in load(out, "scenes.json")}


def tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- scenes, images


def test_scenes_have_1_to_4_shapes_in_distinct_quadrants() -> None:
    counts = set()
    for scene in scenes(300):
        counts.add(len(scene.shapes))
        assert 1 <= len(scene.shapes) <= 4
        positions = scene.positions
        assert len(set(positions)) == len(positions)
        assert positions == [p for p in POSITIONS if p in positions]  # fixed quadrant order
    assert counts == {1, 2, 3, 4}


def test_sample_scene_is_deterministic() -> None:
    a = sample_scene(random.Random(7), 5, seed=2)
    b = sample_scene(random.Random(7), 5, seed=2)
    assert a == b and a.id == "shapes_2_000005"
    assert [sample_scene(random.Random(i), 0) for i in range(20)] != [
        sample_scene(random.Random(i + 100), 0) for i in range(20)
    ]


@pytest.mark.parametrize("size", [32, 64])
def test_render_colour_at_shape_centres_and_inside_quadrant(size: int) -> None:
    for scene in scenes(150):
        img = render(scene, size)
        assert img.mode == "RGB" and img.size == (size, size)
        for shape in scene.shapes:
            cx, cy = S.shape_center(shape, size)
            assert img.getpixel((int(cx), int(cy))) == COLOURS[shape.colour], (scene, shape)
            x0, y0, x1, y1 = S.shape_box(shape, size)
            qx = 0 if shape.position.endswith("left") else size / 2
            qy = 0 if shape.position.startswith("top") else size / 2
            assert qx <= x0 and x1 < qx + size / 2 and qy <= y0 and y1 < qy + size / 2
        # The background stays dark.
        free = scene.free_positions()
        if free:
            probe = Shape("square", "red", "small", free[0])
            r, g, b = img.getpixel(tuple(int(v) for v in S.shape_center(probe, size)))
            assert max(r, g, b) < 60


def test_render_is_pure_and_sizes_differ() -> None:
    scene = scenes(1)[0]
    assert render(scene).tobytes() == render(scene).tobytes()
    assert render(scene, 64).size == (64, 64)


def test_shape_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError):
        Shape("hexagon", "red", "small", "top left")
    with pytest.raises(ValueError):
        Shape("circle", "red", "small", "middle")


# ------------------------------------------------------------------------------------------ text


def test_caption_lists_shapes_in_quadrant_order() -> None:
    scene = Scene(
        [Shape("circle", "red", "large", "top left"), Shape("square", "blue", "small", "bottom right")],
        "x",
    )
    assert caption(scene) == "a large red circle in the top left and a small blue square in the bottom right."
    text, fake = detailed_caption(scene, random.Random(0), 0.0)
    assert text == (
        "There are 2 shapes. A large red circle is in the top left. A small blue square is in the bottom right."
    )
    assert fake == []


def test_parse_objects_round_trips_detailed_caption() -> None:
    for i, scene in enumerate(scenes(200)):
        text, fake = detailed_caption(scene, random.Random(i), 0.5)
        assert parse_objects(text) == set(scene.objects) | set(fake)
        assert parse_objects(caption(scene)) == set(scene.objects)
    assert parse_objects("Two Red Circles and a white diamond; no squares.") == {"red circle", "white diamond"}
    assert parse_objects("nothing here") == set()


def test_hallucination_rate_zero_and_one() -> None:
    for i, scene in enumerate(scenes(200)):
        _, none = detailed_caption(scene, random.Random(i), 0.0)
        assert none == []
        text, fake = detailed_caption(scene, random.Random(i), 1.0)
        if len(scene.shapes) < 4:
            assert len(fake) == 1 and fake[0] not in scene.objects
            assert fake[0] in parse_objects(text)
            # The fake object sits in a free quadrant.
            assert any(f"{fake[0]} is in the {p}." in text for p in scene.free_positions())
        else:
            assert fake == []


def test_preference_pair_rejected_adds_one_absent_object() -> None:
    for i, scene in enumerate(scenes(100)):
        pair = preference_pair(scene, random.Random(i))
        assert pair["prompt"] == "Describe the image in detail."
        assert parse_objects(pair["chosen"]) == set(scene.objects)
        extra = parse_objects(pair["rejected"]) - set(scene.objects)
        assert len(extra) == 1 and pair["chosen"] != pair["rejected"]
        assert len(pair["rejected"].split(". ")) == len(pair["chosen"].split(". ")) + 1


def test_omission_pair_rejected_leaves_an_object_out_or_describes_nothing() -> None:
    kinds = set()
    for i, scene in enumerate(scenes(200)):
        pair = omission_pair(scene, random.Random(i))
        assert pair["chosen"] == preference_pair(scene, random.Random(i))["chosen"]  # the faithful caption
        named = parse_objects(pair["rejected"])
        assert named <= set(scene.objects) and set(pair["omitted"]) <= set(scene.objects)
        sentences = pair["rejected"].count(" is in the ")
        assert sentences < len(scene.shapes) == pair["chosen"].count(" is in the ")
        kinds.add("one left out" if sentences == len(scene.shapes) - 1 and sentences else "no description")
        if sentences == 0:
            assert pair["rejected"] in ("yes", "no", pair["chosen"].split(". ")[0] + ".")
    assert kinds == {"one left out", "no description"}


def test_substitution_pair_rejected_misnames_one_shape() -> None:
    changed = set()
    for i, scene in enumerate(scenes(200)):
        pair = substitution_pair(scene, random.Random(i))
        assert pair["chosen"] == preference_pair(scene, random.Random(i))["chosen"]
        good, bad = pair["chosen"].split(". "), pair["rejected"].split(". ")
        diff = [(a, b) for a, b in zip(good, bad) if a != b]
        assert len(good) == len(bad) and len(diff) == 1  # same count, same quadrants, one sentence differs
        (a, b), = diff
        was, now = pair["misnamed"]
        assert was in a and now in b and was != now
        same = [x == y for x, y in zip(was.split(" "), now.split(" "))]
        assert sum(same) == 1  # the colour or the kind, not both
        changed.add("kind" if same[0] else "colour")
    assert changed == {"colour", "kind"}


def check_answer(scene: Scene, question: str, answer: str, qtype: str) -> None:
    """Recompute the one right answer of a question from the scene."""
    if qtype == "colour":
        pos = question.removeprefix("What colour is the shape in the ").removesuffix("?")
        assert answer == scene.at(pos).colour
    elif qtype == "kind":
        pos = question.removeprefix("What shape is in the ").removesuffix("?")
        assert answer == scene.at(pos).kind
    elif qtype == "count":
        assert question == "How many shapes are there?" and answer == str(len(scene.shapes))
    elif qtype == "position":
        obj = question.removeprefix("Where is the ").removesuffix("?")
        assert scene.objects.count(obj) == 1
        assert answer == scene.shapes[scene.objects.index(obj)].position
    elif qtype == "existence":
        obj = question.removeprefix("Is there a ").removesuffix("?")
        assert obj in OBJECTS
        assert answer == ("yes" if obj in scene.objects else "no")
    else:
        raise AssertionError(f"unknown type {qtype}")


def test_questions_are_right() -> None:
    answers = {"yes": 0, "no": 0}
    for i, scene in enumerate(scenes(300)):
        rng = random.Random(i)
        for qtype in S.QUESTION_TYPES:
            q = ask(scene, rng, qtype)
            if q is None:
                assert qtype == "position"
                assert all(scene.objects.count(o) > 1 for o in scene.objects)
                continue
            assert q.type == qtype and q.answer == q.answer.lower()
            check_answer(scene, q.text, q.answer, qtype)
            if qtype == "existence":
                answers[q.answer] += 1
    assert 0.4 < answers["yes"] / 300 < 0.6


def test_position_question_skipped_when_no_unique_object() -> None:
    scene = Scene([Shape("circle", "red", "large", "top left"), Shape("circle", "red", "small", "top right")])
    assert all(ask(scene, random.Random(i), "position") is None for i in range(10))


@pytest.mark.parametrize("name", S.POPE_SPLITS)
def test_pope_probes_balanced_and_negatives_absent(name: str) -> None:
    sc = scenes(200)
    popularity = S.object_popularity(sc)
    for i, scene in enumerate(sc):
        probes = pope_probes(scene, random.Random(i), name, popularity)
        yes = [o for _, a, o in probes if a == "yes"]
        no = [o for _, a, o in probes if a == "no"]
        assert len(yes) == len(no) >= 1
        assert all(o in scene.objects for o in yes)
        assert all(o not in scene.objects for o in no)
        assert len(set(no)) == len(no)
        for q, _, o in probes:
            assert q == f"Is there a {o} in the image?"
        if name == "adversarial":
            for o in no:
                c, k = o.split()
                assert any(c == s.colour or k == s.kind for s in scene.shapes)
        if name == "popular":
            absent = [o for o in popularity if o not in scene.objects]
            assert set(no) == set(absent[: len(no)])


def test_object_popularity_ranks_by_frequency_with_deterministic_ties() -> None:
    sc = [
        Scene([Shape("square", "blue", "small", "top left")]),
        Scene([Shape("square", "blue", "small", "top left"), Shape("circle", "red", "small", "top right")]),
    ]
    ranking = S.object_popularity(sc)
    assert ranking[:3] == ["blue square", "red circle", "red square"]
    assert sorted(ranking) == sorted(OBJECTS)


# ----------------------------------------------------------------------------------------- files


def test_write_synthetic_is_deterministic(split: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_synthetic(again, num_images=N, seed=3, hallucination_rate=0.5)
    assert tree(again) == tree(split)
    other = tmp_path / "other"
    write_synthetic(other, num_images=N, seed=4, hallucination_rate=0.5)
    a, b = tree(split), tree(other)
    assert not set(a) & {k for k in b if k.startswith("images/")}  # ids include the seed
    assert a["pretrain.json"] != b["pretrain.json"]
    imgs_a = sorted(v for k, v in a.items() if k.startswith("images/"))
    imgs_b = sorted(v for k, v in b.items() if k.startswith("images/"))
    assert imgs_a != imgs_b
    # The content differs too, not only the ids (and the background noise they seed).
    shapes_a = [d["shapes"] for d in load(split, "scenes.json")]
    shapes_b = [d["shapes"] for d in load(other, "scenes.json")]
    assert sum(x != y for x, y in zip(shapes_a, shapes_b)) > N // 2
    assert not list(split.rglob("*.tmp"))


def test_write_synthetic_meta_and_files(split: Path) -> None:
    meta = load(split, "meta.json")
    assert meta["seed"] == 3 and meta["num_images"] == N and meta["image_size"] == 32
    assert meta["hallucination_rate"] == 0.5 and meta["format_version"] == S.FORMAT_VERSION
    for name, count in meta["counts"].items():
        if name.endswith(".json"):
            assert len(load(split, name)) == count, name
    assert len(list((split / "images").glob("*.png"))) == N
    lines = (split / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == meta["counts"]["corpus.txt"]
    assert "How many shapes are there?" in lines and all(line for line in lines)


def test_images_on_disk_match_scenes(split: Path) -> None:
    from PIL import Image

    for image, scene in scene_map(split).items():
        with Image.open(split / "images" / image) as img:
            assert img.mode == "RGB" and img.size == (32, 32)
            assert img.tobytes() == render(scene, 32).tobytes()


def test_files_are_llava_format_and_answers_right(split: Path) -> None:
    by_image = scene_map(split)
    pretrain = load(split, "pretrain.json")
    for rec in pretrain:
        conv = rec["conversations"]
        assert conv[0] == {"from": "human", "value": "<image>"} and conv[1]["from"] == "gpt"
        assert conv[1]["value"] == caption(by_image[rec["image"]])

    describe = 0
    for rec in load(split, "instruct.json"):
        scene = by_image[rec["image"]]
        conv = rec["conversations"]
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        questions = [t["value"].removeprefix("<image>\n") for t in conv[0::2]]
        answers = [t["value"] for t in conv[1::2]]
        n_describe = questions.count("Describe the image in detail.")
        describe += n_describe
        assert 2 <= len(questions) - n_describe <= 4
        for q, a in zip(questions, answers):
            if q == "Describe the image in detail.":
                fake = parse_objects(a) - set(scene.objects)
                assert len(fake) <= 1
            else:
                qtype = next(t for t, p in [("colour", "What colour"), ("kind", "What shape"),
                                            ("count", "How many"), ("position", "Where"),
                                            ("existence", "Is there")] if q.startswith(p))
                check_answer(scene, q, a, qtype)
    assert 0.2 * N <= describe <= 0.8 * N

    types = set()
    for rec in load(split, "eval_questions.json"):
        conv = rec["conversations"]
        assert len(conv) == 2 and conv[0]["value"].startswith("<image>\n")
        types.add(rec["type"])
        check_answer(by_image[rec["image"]], conv[0]["value"].removeprefix("<image>\n"), conv[1]["value"], rec["type"])
    assert types == set(S.QUESTION_TYPES)

    for name in S.POPE_SPLITS:
        recs = load(split, f"eval_pope_{name}.json")
        labels = [r["conversations"][1]["value"] for r in recs]
        assert labels.count("yes") == labels.count("no") > 0
        for r in recs:
            assert r["conversations"][0]["value"] == f"<image>\nIs there a {r['object']} in the image?"
            assert (r["object"] in by_image[r["image"]].objects) == (r["conversations"][1]["value"] == "yes")

    for rec in load(split, "dpo.json"):
        scene = by_image[rec["image"]]
        assert rec["prompt"] == "Describe the image in detail."
        assert parse_objects(rec["chosen"]) == set(scene.objects)
        assert len(parse_objects(rec["rejected"]) - set(scene.objects)) == 1

    chosen = {rec["image"]: rec["chosen"] for rec in load(split, "dpo.json")}
    omissions = load(split, "dpo_omissions.json")
    assert len(omissions) == len(chosen)
    for rec in omissions:
        assert rec["id"].endswith("_omission") and rec["chosen"] == chosen[rec["image"]]
        assert rec["rejected"].count(" is in the ") < rec["chosen"].count(" is in the ")
    swaps = load(split, "dpo_substitutions.json")
    assert [r["chosen"] for r in swaps] == [chosen[r["image"]] for r in swaps] and len(swaps) == len(chosen)
    assert all(r["id"].endswith("_substitution") and r["rejected"] != r["chosen"] for r in swaps)

    for rec in load(split, "eval_captions.json"):
        assert rec["objects"] == by_image[rec["image"]].objects
        assert rec["prompt"] == "Describe the image in detail."


def test_instruct_hallucination_rate_extremes(tmp_path: Path) -> None:
    for rate in (0.0, 1.0):
        out = tmp_path / str(rate)
        meta = write_synthetic(out, num_images=30, seed=1, image_size=64, hallucination_rate=rate)
        by_image = scene_map(out)
        for rec in load(out, "instruct.json"):
            scene = by_image[rec["image"]]
            conv = rec["conversations"]
            for q, a in zip(conv[0::2], conv[1::2]):
                if q["value"].endswith("Describe the image in detail."):
                    fake = parse_objects(a["value"]) - set(scene.objects)
                    assert len(fake) == (1 if rate == 1.0 and len(scene.shapes) < 4 else 0)
        if rate == 0.0:
            assert meta["hallucinated_instruct_captions"] == 0
        else:
            assert meta["hallucinated_instruct_captions"] > 0


def test_scene_prefix_is_stable_across_split_sizes(tmp_path: Path) -> None:
    small = write_synthetic(tmp_path / "a", num_images=5, seed=9)
    write_synthetic(tmp_path / "b", num_images=8, seed=9)
    assert small["counts"]["pretrain.json"] == 5
    assert load(tmp_path / "a", "scenes.json") == load(tmp_path / "b", "scenes.json")[:5]


def test_write_synthetic_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_synthetic(tmp_path, num_images=0)
    with pytest.raises(ValueError):
        write_synthetic(tmp_path, num_images=2, hallucination_rate=1.5)


def test_varied_wordings_change_only_the_training_questions_wording(split: Path, tmp_path: Path) -> None:
    """question_wordings=varied: the train split's questions and caption requests use many wordings (each a
    training wording of its type), with the same answers, scenes and images; an eval split is unchanged."""
    from mobilemllm.data.wordings import DETAIL_PROMPTS, TRAIN_WORDINGS

    out = tmp_path / "varied"
    write_synthetic(out, num_images=N, seed=3, hallucination_rate=0.5, question_wordings="varied")
    a, b = tree(split), tree(out)
    assert sorted(n for n in a if a[n] != b[n]) == ["corpus.txt", "dpo.json", "dpo_omissions.json",
                                                   "dpo_substitutions.json", "eval_questions.json",
                                                   "instruct.json", "meta.json"]
    base, varied = load(split, "eval_questions.json"), load(out, "eval_questions.json")
    assert [r["conversations"][1] for r in base] == [r["conversations"][1] for r in varied]  # same answers
    patterns = {t: [re.compile(re.escape(w).replace(r"\{pos\}", ".+").replace(r"\{obj\}", ".+") + "$")
                    for w in ws] for t, ws in TRAIN_WORDINGS.items()}
    texts = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in varied]
    for r, text in zip(varied, texts):
        assert any(p.match(text) for p in patterns[r["type"]]), text
    assert len(set(t.split(" ")[0] for t in texts)) > 8  # many openings, not one
    assert {r["prompt"] for r in load(out, "dpo.json")} <= set(DETAIL_PROMPTS)
    assert len({r["prompt"] for r in load(out, "dpo.json")}) > 2
    assert [(r["chosen"], r["rejected"]) for r in load(split, "dpo.json")] == \
        [(r["chosen"], r["rejected"]) for r in load(out, "dpo.json")]
    ev = tmp_path / "eval"
    write_synthetic(ev, num_images=N, seed=3, hallucination_rate=0.5, split="eval", question_wordings="varied")
    assert [n for n, v in tree(ev).items() if v != a[n] and n != "meta.json"] == []
    with pytest.raises(ValueError, match="question_wordings"):
        write_synthetic(tmp_path / "bad", num_images=2, question_wordings="fancy")


def test_single_turn_writes_each_conversation_turn_as_its_own_record(split: Path, tmp_path: Path) -> None:
    """single_turn: the same turns, each a one-question record with the image, ids <id>_t<j>; only
    instruct.json changes."""
    out = tmp_path / "single"
    meta = write_synthetic(out, num_images=N, seed=3, hallucination_rate=0.5, single_turn=True)
    assert meta["single_turn"] is True
    a, b = tree(split), tree(out)
    assert [n for n in a if a[n] != b[n] and n != "meta.json"] == ["instruct.json"]
    convs, singles = load(split, "instruct.json"), load(out, "instruct.json")
    want = []
    for rec in convs:
        turns = rec["conversations"]
        for j in range(0, len(turns), 2):
            human = turns[j]["value"].removeprefix("<image>\n")
            want.append((f'{rec["id"]}_t{j // 2}', rec["image"], human, turns[j + 1]["value"]))
    got = [(r["id"], r["image"], r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in singles]
    assert [(i, im, f"<image>\n{h}", ans) for i, im, h, ans in want] == got
    assert all(len(r["conversations"]) == 2 for r in singles) and len(singles) > len(convs)


def test_training_data_is_rewritten_when_the_synthetic_options_change(tmp_path: Path) -> None:
    from mobilemllm.training.pipeline import prepare_data

    recipe = {"data": None, "eval_data": None, "synthetic": {"train_images": 6, "eval_images": 4}}
    train, evald = prepare_data(recipe, tmp_path, log=lambda s: None)
    assert load(train, "meta.json")["question_wordings"] == "canonical" and load(evald, "meta.json")["num_images"] == 4
    stamp = (train / "meta.json").stat().st_mtime_ns
    prepare_data(recipe, tmp_path, log=lambda s: None)  # same options: reused
    assert (train / "meta.json").stat().st_mtime_ns == stamp
    recipe["synthetic"] |= {"question_wordings": "varied"}
    prepare_data(recipe, tmp_path, log=lambda s: None)
    assert load(train, "meta.json")["question_wordings"] == "varied"
    from mobilemllm.errors import ConfigError

    recipe["synthetic"]["question_wordings"] = "sorted"
    with pytest.raises(ConfigError, match="synthetic: unknown question_wordings 'sorted'"):
        prepare_data(recipe, tmp_path / "bad", log=lambda s: None)
