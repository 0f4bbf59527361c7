"""Data: LLaVA JSON/JSONL records, templates and label masking, validation errors, images, collate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_config
from mobilemllm.data.dataset import ConversationDataset, PreferenceDataset, collate, read_records
from mobilemllm.data.images import load_image, normalize, preprocess, to_uint8_views
from mobilemllm.templates import IMAGE, TEMPLATES, get_template
from mobilemllm.errors import ConfigError, DataError
from mobilemllm.bundle.layout import IGNORE_INDEX, IMAGE_TOKEN_ID


def record(i=0, image="a.png", turns=(("<image>\nWhat colour is the circle?", "red"),)):
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec = {"id": f"r{i}", "conversations": conv}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture
def folder(tmp_path):
    """A data folder with two images: a.png (red, 40 x 20) and b.png (blue, 32 x 32)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "images" / "b.png")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def spans(labels):
    """Runs of labelled positions as (start, end) pairs."""
    out, start = [], None
    for i, v in enumerate(labels + [IGNORE_INDEX]):
        if v != IGNORE_INDEX and start is None:
            start = i
        elif v == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


# ------------------------------------------------------------------------------- loading records


def test_json_and_jsonl_give_the_same_samples(folder, tiny_config, tiny_tokenizer):
    records = [record(0), record(1, "b.png", (("Look: <image>\nAnd the square?", "blue"),))]
    a = ConversationDataset(write_json(folder / "d.json", records), None, tiny_tokenizer, tiny_config)
    b = ConversationDataset(write_jsonl(folder / "d.jsonl", records), folder / "images", tiny_tokenizer, tiny_config)
    assert len(a) == len(b) == 2
    for i in range(2):
        sa, sb = a[i], b[i]
        assert sa.input_ids == sb.input_ids and sa.labels == sb.labels
        assert torch.equal(sa.pixel_values, sb.pixel_values)
        assert sa.pixel_values.shape == (1, 3, 32, 32)
    assert a[0].input_ids != a[1].input_ids


def test_label_masking_single_turn(folder, tiny_config, tiny_tokenizer):
    ds = ConversationDataset(write_json(folder / "d.json", [record(0)]), None, tiny_tokenizer, tiny_config)
    s = ds[0]
    assert len(s.input_ids) == len(s.labels)
    n = tiny_config.num_visual_tokens
    assert s.input_ids[0] == tiny_tokenizer.bos_token_id
    # the image: exactly n contiguous IMAGE_TOKEN_ID positions, all unlabelled
    pos = [i for i, t in enumerate(s.input_ids) if t == IMAGE_TOKEN_ID]
    assert len(pos) == n and pos == list(range(pos[0], pos[0] + n))
    assert all(s.labels[i] == IGNORE_INDEX for i in pos)
    # labels: only the answer and EOS, at the end, equal to the input ids there
    (start, end), = spans(s.labels)
    assert end == len(s.input_ids)
    assert s.labels[start:end] == s.input_ids[start:end]
    assert s.labels[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(s.labels[start:end - 1]).strip() == "red"
    prompt = tiny_tokenizer.decode([t for t in s.input_ids[:start] if t >= 0], skip_special_tokens=True)
    assert "What colour is the circle?" in prompt and "ASSISTANT:" in prompt and "red" not in prompt


def test_label_masking_multi_turn(folder, tiny_config, tiny_tokenizer):
    turns = (("<image>\nWhat colour is the circle?", "red"), ("How many shapes are there?", "three shapes"),
             ("Where is the square?", "top left"))
    ds = ConversationDataset(write_json(folder / "d.json", [record(0, turns=turns)]), None, tiny_tokenizer,
                             tiny_config)
    s = ds[0]
    found = spans(s.labels)
    assert len(found) == 3
    for (start, end), (question, answer) in zip(found, turns):
        assert s.input_ids[end - 1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(s.input_ids[start:end - 1]).strip() == answer
    # the second and third questions are in the unlabelled text between the answers
    between = tiny_tokenizer.decode(s.input_ids[found[0][1]:found[1][0]], skip_special_tokens=True)
    assert "How many shapes are there?" in between and "USER:" in between and "ASSISTANT:" in between
    assert s.input_ids.count(IMAGE_TOKEN_ID) == tiny_config.num_visual_tokens


def test_text_only_record_and_plain_template(folder, tiny_config, tiny_tokenizer):
    rec = {"id": "t", "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi"}]}
    ds = ConversationDataset(write_json(folder / "d.json", [rec]), None, tiny_tokenizer, tiny_config)
    s = ds[0]
    assert s.pixel_values is None and IMAGE_TOKEN_ID not in s.input_ids
    # plain (alignment pretraining): BOS, the image, the caption + EOS as the only target
    plain = ConversationDataset(write_json(folder / "p.json", [record(0, turns=(("<image>", "a red square"),))]),
                                None, tiny_tokenizer, tiny_config, template="plain")
    p = plain[0]
    n = tiny_config.num_visual_tokens
    assert p.input_ids[:1 + n] == [tiny_tokenizer.bos_token_id] + [IMAGE_TOKEN_ID] * n
    assert p.labels[:1 + n] == [IGNORE_INDEX] * (1 + n)
    assert tiny_tokenizer.decode(p.labels[1 + n:], skip_special_tokens=True) == "a red square"


def test_every_template_builds_prompts_the_same_way_as_training(tiny_config, tiny_tokenizer):
    """The generation prompt is a prefix of the training sequence: train and serve see the same ids."""
    from mobilemllm.data.tokenizer import encode_segments
    from mobilemllm.inference import prompt_ids

    for name, tpl in TEMPLATES.items():
        ids, labels = encode_segments(tiny_tokenizer, tpl.segments([("<image>\nWhat colour is it?", "red")]),
                                      tiny_config.num_visual_tokens)
        prompt = prompt_ids(tiny_config, tiny_tokenizer, "What colour is it?", template=name)
        first_label = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
        if tpl.caption_only:
            assert prompt == ids[:first_label]
        else:
            assert ids[:len(prompt)] == prompt and first_label == len(prompt)
    with pytest.raises(ConfigError, match="valid templates"):
        get_template("chatml")


def test_question_first_template_puts_the_first_question_before_the_image():
    """vicuna_short_qfirst: LLaVA data ("<image>\\nQ", or the image anywhere) gives Q before the image in the
    first turn only; generation prompts match; the image-first twin is unchanged."""
    q = get_template("vicuna_short_qfirst")
    turns = [("<image>\nIs there a red circle?", "yes"), ("Where is it?", "top left")]
    segs = q.segments(turns)
    texts = [t for t, _ in segs]
    assert texts[:3] == ["A chat about an image. USER: Is there a red circle?\n", IMAGE, "\nASSISTANT:"]
    assert texts[4] == " USER: Where is it? ASSISTANT:" and [a for _, a in segs] == [False] * 3 + [True, False, True]
    assert q.segments([("Is there a red circle?\n<image>", "yes")])[:3] == segs[:3]
    assert q.prompt_segments("  Is there a red circle? ") == segs[:3]
    plain = get_template("vicuna_short").prompt_segments("Is there a red circle?")
    assert [t for t, _ in plain] == ["A chat about an image. USER: ", IMAGE, "\nIs there a red circle? ASSISTANT:"]


def test_question_first_template_leaves_the_tiny_tokenizer_unchanged():
    from mobilemllm import templates as T
    from mobilemllm.data.tokenizer import tiny_tokenizer

    with_qfirst = tiny_tokenizer(num_images=40)
    saved = dict(T.TEMPLATES)
    try:
        del T.TEMPLATES["vicuna_short_qfirst"]
        without = tiny_tokenizer(num_images=40)
    finally:
        T.TEMPLATES.clear()
        T.TEMPLATES.update(saved)
    assert with_qfirst.get_vocab() == without.get_vocab()


def test_shapes_data_loads(shapes_data, tiny_config, tiny_tokenizer):
    for name, template in (("instruct.json", None), ("pretrain.json", "plain"), ("eval_questions.json", None)):
        ds = ConversationDataset(shapes_data / name, None, tiny_tokenizer, tiny_config, template=template)
        assert len(ds) >= 40
        for i in range(0, len(ds), 7):
            s = ds[i]
            assert s.input_ids.count(IMAGE_TOKEN_ID) == tiny_config.num_visual_tokens
            assert any(v != IGNORE_INDEX for v in s.labels)
            assert len(s.input_ids) <= tiny_config.llm.max_position_embeddings
            assert max(s.input_ids) < tiny_config.llm.vocab_size


# ------------------------------------------------------------------------------------- bad input


def expect_data_error(path, tok, cfg, *fragments, cls=ConversationDataset):
    with pytest.raises(DataError) as e:
        cls(path, None, tok, cfg)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert "\n" not in msg  # one line
    return msg


def test_malformed_json(folder, tiny_config, tiny_tokenizer):
    bad = folder / "bad.json"
    bad.write_text('[{"id": "x", "conversations": [}]')
    expect_data_error(bad, tiny_tokenizer, tiny_config, str(bad), "not valid JSON", "line 1")
    jsonl = folder / "bad.jsonl"
    jsonl.write_text(json.dumps(record(0)) + "\n{oops\n")
    expect_data_error(jsonl, tiny_tokenizer, tiny_config, "line 2", "not valid JSON")
    obj = write_json(folder / "obj.json", {"conversations": []})
    expect_data_error(obj, tiny_tokenizer, tiny_config, "expected a JSON list", "dict")
    expect_data_error(folder / "missing.json", tiny_tokenizer, tiny_config, "not found", "missing.json")
    expect_data_error(write_json(folder / "s.json", [record(0), "text"]), tiny_tokenizer, tiny_config,
                      "record 1", "str")


def test_record_without_conversations(folder, tiny_config, tiny_tokenizer):
    recs = [record(0), {"id": "lonely", "image": "a.png"}]
    expect_data_error(write_json(folder / "d.json", recs), tiny_tokenizer, tiny_config,
                      "record 1", "'lonely'", "'conversations'")


def test_wrong_roles(folder, tiny_config, tiny_tokenizer):
    rec = record(0, turns=(("<image>\nQ1", "A1"), ("Q2", "A2")))
    rec["conversations"][3]["from"] = "human"
    expect_data_error(write_json(folder / "d.json", [record(1), rec]), tiny_tokenizer, tiny_config,
                      "record 1", "'r0'", "conversations[3].from", "'human'", "alternate")
    rec = record(0)
    rec["conversations"] = rec["conversations"][:1]
    expect_data_error(write_json(folder / "e.json", [rec]), tiny_tokenizer, tiny_config, "record 0", "gpt answer")
    rec = record(0)
    del rec["conversations"][1]["value"]
    expect_data_error(write_json(folder / "f.json", [rec]), tiny_tokenizer, tiny_config,
                      "conversations[1]", "'value'")


def test_missing_or_extra_image_placeholder(folder, tiny_config, tiny_tokenizer):
    rec = record(4, turns=(("What colour is the circle?", "red"),))
    expect_data_error(write_json(folder / "d.json", [rec]), tiny_tokenizer, tiny_config,
                      "record 0", "'r4'", IMAGE, "first human turn")
    rec = record(5, turns=(("<image>\nQ1", "A1"), ("<image> Q2", "A2")))
    expect_data_error(write_json(folder / "e.json", [rec]), tiny_tokenizer, tiny_config, "'r5'", "exactly one")


def test_missing_and_corrupt_images(folder, tiny_config, tiny_tokenizer):
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = ConversationDataset(write_json(folder / "d.json", [record(0, "gone.png"), record(1, "corrupt.png")]),
                             None, tiny_tokenizer, tiny_config)
    with pytest.raises(DataError, match=r"record 0 \(id 'r0'\): image not found: .*gone.png"):
        ds[0]
    with pytest.raises(DataError, match=r"record 1 \(id 'r1'\): cannot read image .*corrupt.png"):
        ds[1]
    pref = write_json(folder / "p.json", [{"id": "p", "image": "gone.png", "prompt": "Q", "chosen": "a",
                                           "rejected": "b"}])
    with pytest.raises(DataError, match=r"record 0 \(id 'p'\): image not found"):
        PreferenceDataset(pref, None, tiny_tokenizer, tiny_config)[0]
    with pytest.raises(DataError, match="image not found"):
        load_image(folder / "nope.jpg")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(folder / "d.json")


def test_sample_longer_than_the_context(folder, tiny_tokenizer):
    cfg = make_tiny_config(llm={"max_position_embeddings": 40})
    ds = ConversationDataset(write_json(folder / "d.json", [record(0, turns=(("<image>\n" + "Q " * 30, "A"),))]),
                             None, tiny_tokenizer, cfg)
    with pytest.raises(DataError, match="exceed the context of 40"):
        ds[0]
    with pytest.raises(DataError, match="exceed the context of 40"):  # not cached: every read says so
        ds[0]


def test_samples_are_tokenised_once(folder, tiny_config, tiny_tokenizer, monkeypatch):
    """A sample is read every epoch; its tokens come from the first read (the same ids and labels)."""
    import mobilemllm.data.dataset as dataset

    ds = ConversationDataset(write_json(folder / "d.json", [record(0), record(1)]), None, tiny_tokenizer,
                             tiny_config)
    first = [ds[i] for i in range(2)]
    calls = []
    monkeypatch.setattr(dataset, "encode_segments", lambda *a, **k: calls.append(a) or ([], []))
    again = [ds[i] for i in range(2)]
    assert not calls
    assert [(s.input_ids, s.labels) for s in again] == [(s.input_ids, s.labels) for s in first]
    assert all(isinstance(t, int) for t in again[0].input_ids + again[0].labels)
    again[0].input_ids.append(7)  # a caller's change does not reach the cache
    assert ds[0].input_ids == first[0].input_ids
    monkeypatch.undo()
    capped = ConversationDataset(write_json(folder / "e.json", [record(0), record(1)]), None, tiny_tokenizer,
                                 tiny_config)
    capped.TOKEN_CACHE_SAMPLES = 1  # past the cap a sample is tokenised on every read, the same tokens
    assert [(capped[i].input_ids, capped[i].labels) for i in (0, 1, 1)] == [
        (s.input_ids, s.labels) for s in (first[0], first[1], first[1])]
    assert list(capped._token_cache) == [0]


# ---------------------------------------------------------------------------------------- images


def test_pad_versus_resize(folder, tiny_config):
    img = load_image(folder / "images" / "a.png")  # red, 40 wide x 20 high
    assert img.mode == "RGB" and img.size == (40, 20)
    pad = to_uint8_views(img, tiny_config.vision)
    assert pad.dtype == np.uint8 and pad.shape == (1, 3, 32, 32)
    grey = int(0.5 * 255)  # the tiny tower's mean colour, truncated as LLaVA's expand2square does
    # padded to 40 x 40 (10 rows of mean colour above and below), then resized to 32: 8 rows each side
    assert (pad[0, :, :7] == grey).all() and (pad[0, :, 25:] == grey).all()
    assert (pad[0, :, 9:23] == np.array([255, 0, 0]).reshape(3, 1, 1)).all()
    stretched = to_uint8_views(img, tiny_config.replace(vision={"image_aspect": "resize"}).vision)
    assert (stretched[0] == np.array([255, 0, 0]).reshape(3, 1, 1)).all()
    # a CLIP-mean pad colour follows the config's mean
    clip = make_tiny_config(vision={"image_mean": (0.48145466, 0.4578275, 0.40821073)}).vision
    assert tuple(to_uint8_views(img, clip)[0, :, 0, 0]) == (122, 116, 104)


def test_normalize_and_preprocess(folder, tiny_config):
    img = load_image(folder / "images" / "b.png")
    x = preprocess(img, tiny_config.vision)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 32, 32)
    # blue (0, 0, 255) with mean = std = 0.5: (0 - .5) / .5 = -1, (1 - .5) / .5 = 1
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([-1.0, -1.0, 1.0]))
    clip = make_tiny_config(vision={"image_mean": (0.4, 0.5, 0.6), "image_std": (0.2, 0.25, 0.5)}).vision
    y = normalize(np.full((3, 2, 2), 51, dtype=np.uint8), clip)  # 51 / 255 = 0.2
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([-1.0, -1.2, -0.8]))
    tiles = make_tiny_config(vision={"hires": "tiles"}).vision
    views = to_uint8_views(Image.new("RGB", (64, 64), (0, 255, 0)), tiles)
    assert views.shape == (5, 3, 32, 32)


def test_tiles_cut_the_image_into_quadrants_plus_a_global_view():
    tiles = make_tiny_config(vision={"hires": "tiles", "image_aspect": "resize"}).vision
    img = Image.new("RGB", (64, 64))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, c in enumerate(colours):  # quadrants: top left, top right, bottom left, bottom right
        img.paste(c, ((k % 2) * 32, (k // 2) * 32, (k % 2) * 32 + 32, (k // 2) * 32 + 32))
    views = to_uint8_views(img, tiles)
    for k, c in enumerate(colours):
        assert tuple(views[k, :, 16, 16]) == c
    glob = views[4]  # the whole image at 32 px
    assert tuple(glob[:, 4, 4]) == colours[0] and tuple(glob[:, 28, 28]) == colours[3]


# ------------------------------------------------------------------------------ preference, collate


def test_preference_dataset(folder, tiny_config, tiny_tokenizer):
    rec = {"id": "p0", "image": "a.png", "prompt": "Describe the image.", "chosen": "a red square",
           "rejected": "a red square and a blue circle"}
    ds = PreferenceDataset(write_json(folder / "p.json", [rec]), None, tiny_tokenizer, tiny_config)
    chosen, rejected = ds[0]
    assert torch.equal(chosen.pixel_values, rejected.pixel_values)
    (cs, ce), = spans(chosen.labels)
    (rs, re_), = spans(rejected.labels)
    assert cs == rs and chosen.input_ids[:cs] == rejected.input_ids[:rs]  # the same prompt
    assert tiny_tokenizer.decode(chosen.input_ids[cs:ce], skip_special_tokens=True).strip() == "a red square"
    assert tiny_tokenizer.decode(rejected.input_ids[rs:re_], skip_special_tokens=True).strip() == rec["rejected"]
    assert chosen.input_ids.count(IMAGE_TOKEN_ID) == tiny_config.num_visual_tokens
    bad = dict(rec)
    del bad["rejected"]
    expect_data_error(write_json(folder / "q.json", [rec, bad]), tiny_tokenizer, tiny_config,
                      "record 1", "'p0'", "'rejected'", cls=PreferenceDataset)


def test_shapes_preference_pairs_load(shapes_data, tiny_config, tiny_tokenizer):
    ds = PreferenceDataset(shapes_data / "dpo.json", None, tiny_tokenizer, tiny_config)
    assert len(ds) == 40
    chosen, rejected = ds[0]
    assert chosen.input_ids != rejected.input_ids


def test_collate(folder, tiny_config, tiny_tokenizer):
    recs = [record(0), record(1, "b.png", (("<image>\nQ", "a much longer answer about the blue square"),)),
            {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    ds = ConversationDataset(write_json(folder / "d.json", recs), None, tiny_tokenizer, tiny_config)
    samples = [ds[i] for i in range(3)]
    pad = tiny_tokenizer.pad_token_id
    batch = collate(samples, pad)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for r, s in enumerate(samples):
        n = lengths[r]
        assert batch["input_ids"][r, :n].tolist() == s.input_ids
        assert batch["labels"][r, :n].tolist() == s.labels
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][r, n:] == pad).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
    # images are stacked for the rows that have one, in order
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][1], samples[1].pixel_values)
    assert "pixel_values" not in collate(samples[2:], pad)


def test_collated_batch_trains(shapes_data, tiny_config, tiny_tokenizer):
    """A collated shapes batch runs through the model with a finite loss and gradients everywhere."""
    from conftest import make_tiny_model

    model = make_tiny_model(tiny_config).train()
    ds = ConversationDataset(shapes_data / "instruct.json", None, tiny_tokenizer, tiny_config)
    batch = collate([ds[i] for i in range(4)], tiny_tokenizer.pad_token_id)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    for part in (model.connector, model.llm):
        assert all(p.grad is not None for p in part.parameters())
    assert model.vision.model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
