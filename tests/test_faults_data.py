"""Bad input on the data side, through the commands a user runs: images that are bombs, 16-bit, transparent,
damaged or not files at all; data files that are not UTF-8 or hold malformed records; image names that leave
the data folder; a damaged tokenizer.json; a prompt that is not UTF-8. Each must end in one error line (or, for
unusual but valid images, in the picture a viewer shows), never a traceback or a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobilemllm.cli import main
from mobilemllm.data.images import MAX_IMAGE_PIXELS, load_image, to_rgb
from mobilemllm.errors import DataError

GOOD_PROMPT = "What colour is the circle?"


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def generate(capsys, checkpoint, image, prompt=GOOD_PROMPT) -> tuple[int, str]:
    return run(capsys, "generate", "--model", checkpoint, "--image", image, "--prompt", prompt,
               "--max-new-tokens", "2")


# ------------------------------------------------------------------------------------------- images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int) -> Path:
    """A valid all-black 1-bit PNG of side x side pixels: a few kB on disk, side**2 bytes once decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [9000, 20000])  # over our limit; over Pillow's own DecompressionBombError
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, capsys, tiny_checkpoint, side):
    assert side * side > MAX_IMAGE_PIXELS
    bomb = bomb_png(tmp_path / "bomb.png", side)
    assert bomb.stat().st_size < 200_000
    code, err = generate(capsys, tiny_checkpoint, bomb)
    assert_one_line_error(code, err, str(bomb), "pixels", f"{MAX_IMAGE_PIXELS:,}")


def test_an_image_at_the_pixel_limit_still_loads(tmp_path):
    img = load_image(bomb_png(tmp_path / "big.png", 1024))
    assert img.size == (1024, 1024) and img.mode == "RGB"


def test_16_bit_greyscale_keeps_its_gradient(tmp_path):
    values = (np.arange(32 * 64, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow reads it as 16-bit samples
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (32, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], values >> 8)


def test_float_and_32_bit_integer_images_scale_to_8_bits(tmp_path):
    f = np.array([[0.0, 0.5, 1.0, 2.0], [-1.0, 0.25, np.nan, 0.75]], dtype=np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "f.tiff"))[..., 0],
                                  [[0, 128, 255, 255], [0, 64, 0, 191]])
    i = np.array([[0, 256, 40000, 70000, -5]], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(i, "I")))[..., 1], [[0, 1, 156, 255, 0]])


def test_transparency_is_composited_on_white(tmp_path):
    # a palette image whose colour 0 (red) is transparent: the red must not show
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((3, 1), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 3]) == (0, 0, 255)
    # greyscale + alpha, fully transparent black -> white; opaque grey stays grey
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (90, 255))
    la.save(tmp_path / "la.png")
    assert [tuple(p) for p in np.asarray(load_image(tmp_path / "la.png"))[0]] == [(255, 255, 255), (90, 90, 90)]
    # half-transparent colour: blended with white
    Image.new("RGBA", (2, 2), (0, 0, 200, 128)).save(tmp_path / "rgba.png")
    px = np.asarray(load_image(tmp_path / "rgba.png"))[0, 0].astype(int)
    np.testing.assert_allclose(px, [127, 127, 228], atol=1)
    # CMYK (no alpha): Pillow's conversion, cyan stays cyan
    Image.new("CMYK", (2, 2), (255, 0, 0, 0)).save(tmp_path / "cmyk.tiff")
    assert tuple(np.asarray(load_image(tmp_path / "cmyk.tiff"))[0, 0]) == (0, 255, 255)


def test_preprocessing_a_pil_image_composites_its_alpha_too(tiny_config):
    from mobilemllm.data.images import to_uint8_views

    views = to_uint8_views(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), tiny_config.vision)
    assert (views == 255).all()  # transparent red is white, not red


class UnblockingWriter:
    """Opens a FIFO for writing once someone reads it, writes junk and closes: a test of code that opens
    the FIFO then fails instead of hanging forever."""

    def __init__(self, fifo: Path):
        self.fifo, self.stop = fifo, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                continue
            os.write(fd, b"not an image")
            os.close(fd)
            return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_a_fifo_folder_or_device_as_the_image_fails_at_once(tmp_path, capsys, tiny_checkpoint):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with UnblockingWriter(fifo):
        t0 = time.perf_counter()
        code, err = generate(capsys, tiny_checkpoint, fifo)
    assert_one_line_error(code, err, str(fifo), "not a regular file")
    assert time.perf_counter() - t0 < 30
    code, err = generate(capsys, tiny_checkpoint, tmp_path)
    assert_one_line_error(code, err, str(tmp_path), "is a folder")
    if Path("/dev/zero").exists():
        code, err = generate(capsys, tiny_checkpoint, "/dev/zero")
        assert_one_line_error(code, err, "/dev/zero", "not a regular file")


def test_a_truncated_or_damaged_image_fails_in_one_line(tmp_path, capsys, tiny_checkpoint):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    code, err = generate(capsys, tiny_checkpoint, tmp_path / "cut.png")
    assert_one_line_error(code, err, "cannot read image", "cut.png")
    (tmp_path / "text.jpg").write_text("hello")
    code, err = generate(capsys, tiny_checkpoint, tmp_path / "text.jpg")
    assert_one_line_error(code, err, "cannot read image", "text.jpg", "not an image file")


# --------------------------------------------------------------------------------------- data files


def record(i=0, image="a.png", question="<image>\nWhat colour is the circle?", answer="red"):
    rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def data_dir(tmp_path):
    """A training data folder: images/a.png and a valid instruct.json, plus secret.png beside images/."""
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(d / "images" / "a.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(d / "secret.png")
    (d / "instruct.json").write_text(json.dumps([record(0), record(1)]))
    return d


def train(capsys, data_dir, checkpoint, out, *extra) -> tuple[int, str]:
    """`mobilemllm train` of the instruct stage on data_dir/instruct.json for one step."""
    return run(capsys, "train", "--recipe", "tiny", "--stage", "instruct", "--data", data_dir, "--init", checkpoint,
               "--out", out, "--no-eval", "--no-progress", *extra, "instruct.data=[instruct.json]",
               "instruct.curriculum_steps=0", "instruct.max_steps=1", "instruct.global_batch=2",
               "instruct.micro_batch=2", "num_threads=1")


def test_training_data_that_is_not_utf8_fails_in_one_line(data_dir, tmp_path, capsys, tiny_checkpoint):
    text = json.dumps([record(0, answer="caf\u00e9")], ensure_ascii=False)
    (data_dir / "instruct.json").write_bytes(text.encode("latin-1"))
    code, err = train(capsys, data_dir, tiny_checkpoint, tmp_path / "out")
    assert_one_line_error(code, err, str(data_dir / "instruct.json"), "not UTF-8", "line 1")


@pytest.mark.parametrize("bad, fragments", [
    ({"id": "x", "image": "a.png"}, ["record 1", "'conversations'"]),
    ({"conversations": "hi"}, ["record 1", "'conversations'"]),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     ["record 1", "conversations[0].value", "string"]),
    ({"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]},
     ["record 1", "conversations[0].from", "alternate"]),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]},
     ["record 1", "conversations[1].from", "alternate"]),
    ({**record(), "image": 7}, ["record 1", "'image'", "file name"]),
    ({**record(), "image": ["a.png"]}, ["record 1", "'image'", "file name"]),
    (record(answer="a\ud800b"), ["record 1", "conversations[1].value", "not valid UTF-8", "U+D800"]),
    ("just text", ["record 1", "str", "object"]),
])
def test_malformed_records_name_the_file_and_the_record(data_dir, tiny_config, tiny_tokenizer, bad, fragments):
    from mobilemllm.data.dataset import ConversationDataset

    path = data_dir / "instruct.json"
    path.write_text(json.dumps([record(0), bad]))
    with pytest.raises(DataError) as e:
        ConversationDataset(path, None, tiny_tokenizer, tiny_config)
    assert "\n" not in str(e.value)
    for f in [str(path), *fragments]:
        assert f in str(e.value), (f, str(e.value))


def test_a_malformed_record_stops_train_in_one_line(data_dir, tmp_path, capsys, tiny_checkpoint):
    (data_dir / "instruct.json").write_text(json.dumps([record(0), record(1, image=7)]))
    code, err = train(capsys, data_dir, tiny_checkpoint, tmp_path / "out")
    assert_one_line_error(code, err, str(data_dir / "instruct.json"), "record 1", "'image'")


def test_json_lines_in_a_json_file_and_unparseable_json(data_dir):
    from mobilemllm.data.dataset import read_records

    lines = data_dir / "lines.json"
    lines.write_text(json.dumps(record(0)) + "\n" + json.dumps(record(1)) + "\n")
    with pytest.raises(DataError, match=r"lines.json: not valid JSON \(Extra data .*name it \.jsonl"):
        read_records(lines)
    lines.rename(data_dir / "lines.jsonl")
    assert len(read_records(data_dir / "lines.jsonl")) == 2
    deep = data_dir / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="deep.json: cannot be read as JSON"):
        read_records(deep)
    bom = data_dir / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([record(0)]).encode())
    assert read_records(bom)[0]["id"] == "r0"
    (data_dir / "folder.json").mkdir()
    with pytest.raises(DataError, match="folder.json is not a regular file"):
        read_records(data_dir / "folder.json")


# ----------------------------------------------------------------------------- images outside the data


def test_image_names_outside_the_image_folder_are_refused(data_dir, tmp_path, capsys, tiny_checkpoint):
    path = data_dir / "instruct.json"
    path.write_text(json.dumps([record(0), record(1, image="../secret.png")]))
    code, err = train(capsys, data_dir, tiny_checkpoint, tmp_path / "out")
    assert_one_line_error(code, err, str(path), "record 1", "'../secret.png'", "--allow-outside-images")
    path.write_text(json.dumps([record(0, image=str(data_dir / "secret.png"))]))
    code, err = train(capsys, data_dir, tiny_checkpoint, tmp_path / "out")
    assert_one_line_error(code, err, str(path), "record 0", "absolute path", "--allow-outside-images")


def test_a_symlink_out_of_the_image_folder_is_refused(data_dir, tiny_config, tiny_tokenizer):
    from mobilemllm.data.dataset import ConversationDataset

    (data_dir / "images" / "link.png").symlink_to(data_dir / "secret.png")
    (data_dir / "images" / "sub").symlink_to(data_dir, target_is_directory=True)
    path = data_dir / "instruct.json"
    path.write_text(json.dumps([record(0, image="link.png"), record(1, image="sub/secret.png"), record(2)]))
    ds = ConversationDataset(path, None, tiny_tokenizer, tiny_config)
    for i in (0, 1):
        with pytest.raises(DataError, match=rf"record {i} .*outside the image folder .*--allow-outside-images"):
            ds[i]
    assert ds[2].pixel_values is not None
    # a link inside the folder, and an image folder that is itself a link, are fine
    (data_dir / "images" / "same.png").symlink_to(data_dir / "images" / "a.png")
    (linked := data_dir / "linked_images").symlink_to(data_dir / "images", target_is_directory=True)
    path.write_text(json.dumps([record(0, image="same.png")]))
    assert ConversationDataset(path, linked, tiny_tokenizer, tiny_config)[0].pixel_values is not None


def test_allow_outside_images_lets_them_through(data_dir, tiny_config, tiny_tokenizer):
    from mobilemllm.data.dataset import ConversationDataset, PreferenceDataset

    path = data_dir / "instruct.json"
    (data_dir / "images" / "link.png").symlink_to(data_dir / "secret.png")
    path.write_text(json.dumps([record(0, image="../secret.png"), record(1, image=str(data_dir / "secret.png")),
                                record(2, image="link.png")]))
    ds = ConversationDataset(path, None, tiny_tokenizer, tiny_config, allow_outside_images=True)
    green = [ds[i].pixel_values for i in range(3)]
    assert all(g is not None and (g == green[0]).all() for g in green)
    pref = data_dir / "pref.json"
    pref.write_text(json.dumps([{"image": "../secret.png", "prompt": "Q", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match="record 0.*'../secret.png'.*climbs out"):
        PreferenceDataset(pref, None, tiny_tokenizer, tiny_config)
    assert PreferenceDataset(pref, None, tiny_tokenizer, tiny_config, allow_outside_images=True)[0][0].pixel_values \
        is not None


def test_eval_refuses_images_outside_its_data_folder_unless_allowed(data_dir, tmp_path, capsys, tiny_checkpoint):
    questions = data_dir / "eval_questions.json"
    questions.write_text(json.dumps([record(0), record(1, image="../secret.png")]))
    code, err = run(capsys, "eval", "--model", tiny_checkpoint, "--data", data_dir, "--batch-size", "2")
    assert_one_line_error(code, err, str(questions), "record 1", "'../secret.png'", "--allow-outside-images")
    out = tmp_path / "r.json"
    code = main([str(a) for a in ("eval", "--model", tiny_checkpoint, "--data", data_dir, "--batch-size", "2",
                                  "--allow-outside-images", "--json", out)])
    assert code == 0 and json.loads(out.read_text())["vqa"]["n"] == 2
    # a link out of images/ is caught when the image is read
    (data_dir / "images" / "link.png").symlink_to(data_dir / "secret.png")
    questions.write_text(json.dumps([record(0, image="link.png")]))
    code, err = run(capsys, "eval", "--model", tiny_checkpoint, "--data", data_dir)
    assert_one_line_error(code, err, "'link.png'", "outside the image folder")
    captions = data_dir / "eval_captions.json"
    questions.unlink()
    captions.write_text(json.dumps([{"image": "a.png", "prompt": ["Describe"], "objects": []}]))
    code, err = run(capsys, "eval", "--model", tiny_checkpoint, "--data", data_dir)
    assert_one_line_error(code, err, str(captions), "record 0", "prompt")


# ------------------------------------------------------------------------------ tokenizer and prompt


@pytest.mark.parametrize("content, fragment", [
    (b'{"version": "1.0", "model": ', "not valid JSON"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8"),
    (b"[]", "expected a JSON object"),
    (b'{"version": "1.0"}', "not a tokenizer"),
])
def test_a_damaged_tokenizer_json_fails_in_one_line(tmp_path, capsys, tiny_checkpoint, shapes_image, content,
                                                    fragment):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "tokenizer.json").write_bytes(content)
    code, err = generate(capsys, ckpt, shapes_image)
    assert_one_line_error(code, err, str(ckpt / "tokenizer.json"), fragment)


def test_a_prompt_that_is_not_utf8_fails_in_one_line(capsys, tiny_checkpoint, shapes_image):
    prompt = os.fsdecode(b"What is \xed\xa0\x80?")  # how Python hands such bytes of argv to the program
    code, err = generate(capsys, tiny_checkpoint, shapes_image, prompt)
    assert_one_line_error(code, err, "the prompt", "not valid UTF-8", "0xED")
    code, err = generate(capsys, tiny_checkpoint, shapes_image, "lone \ud800")
    assert_one_line_error(code, err, "the prompt", "U+D800")


def test_check_text():
    from mobilemllm.data.tokenizer import check_text

    assert check_text("caf\u00e9 \U0001f600", "x") == "caf\u00e9 \U0001f600"
    with pytest.raises(DataError, match=r"^the question is not valid UTF-8 text: character 2 is a lone surrogate"):
        check_text("ab\udfff", "the question")


def test_train_allow_outside_images_trains_on_them(data_dir, tmp_path, capsys, tiny_checkpoint):
    (data_dir / "instruct.json").write_text(json.dumps([record(0, image="../secret.png"), record(1)]))
    code, err = train(capsys, data_dir, tiny_checkpoint, tmp_path / "out", "--allow-outside-images")
    assert code == 0, err
    assert (tmp_path / "out" / "instruct" / "model.safetensors").exists()


def test_foundations_checks_its_records_and_image_names(data_dir, tmp_path, capsys, tiny_checkpoint,
                                                        tiny_tokenizer, tiny_config):
    from mobilemllm.training.foundations import CaptionPairs

    pretrain = data_dir / "pretrain.json"
    pretrain.write_text(json.dumps([record(0, image="/etc/hostname")]))
    with pytest.raises(DataError, match="record 0.*absolute path"):
        CaptionPairs(pretrain, None, tiny_tokenizer, tiny_config.vision)
    (data_dir / "images" / "link.png").symlink_to(data_dir / "secret.png")
    pretrain.write_text(json.dumps([record(0, image="link.png")]))
    with pytest.raises(DataError, match="record 0.*outside the image folder"):
        CaptionPairs(pretrain, None, tiny_tokenizer, tiny_config.vision)[0]
    assert CaptionPairs(pretrain, None, tiny_tokenizer, tiny_config.vision, allow_outside_images=True)[0] is not None
    # the foundations stage reads every record's text first: a malformed one is one line, not a KeyError
    pretrain.write_text(json.dumps([{"conversations": [{"from": "human"}]}]))
    code, err = run(capsys, "train", "--recipe", "tiny", "--stage", "foundations", "--data", data_dir, "--init",
                    tiny_checkpoint, "--out", tmp_path / "out", "--no-eval", "--no-progress")
    assert_one_line_error(code, err, str(pretrain), "record 0", "'value'")
