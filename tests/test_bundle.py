"""Bundle folders and manifests: schema validation, checksums, atomic writes, prompt segments, UTF-8 streaming.

Fast: no export here (tests/test_export_executorch.py exports real programs).
"""

from __future__ import annotations

import copy
import json

import pytest

from mobilemllm.config import ModelConfig
from mobilemllm.errors import UserError
from mobilemllm import bundle as B
from mobilemllm.export import manifest_sections as S
from mobilemllm.export import parity as P

SMALL = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tok():
    from mobilemllm.data.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    import torch

    from mobilemllm.models.vlm import MobileVLM

    torch.manual_seed(0)
    return MobileVLM(ModelConfig.from_preset("tiny", llm=SMALL)).eval()


def _manifest(model, tok) -> dict:
    cfg = model.config
    return {
        "format": "executorch",
        "target": "test",
        "model": S.model_section(model, "tiny"),
        "files": {},
        "methods": {"text_decoder": {"inputs": [{"name": "embeddings", "dtype": "float32", "shape": [1, "T", 64]}]},
                    "get_max_seq_len": {"value": 256}},
        "tokenizer": S.tokenizer_section(tok, cfg.llm.vocab_size),
        "prompt": S.prompt_section(cfg, tok),
        "preprocessing": S.preprocessing_section(cfg.vision),
        "context": {"max_seq_len": 256, "max_context_len": 256},
        "quantization": {"text_decoder": {"scheme": "8da4w", "group_size": 32}},
        "parity": P.summarize([P.check("logit_cosine", 0.99, 0.9, True)]),
        "export": {"recipe": {"name": "test"}},
    }


@pytest.fixture
def written(tmp_path, model, tok):
    out = tmp_path / "bundle"
    B.write_bundle(out, _manifest(model, tok), {"model.pte": b"\x00program bytes", "tokenizer/tokenizer.json": b"{}"})
    return out


def test_write_and_load_round_trip(written):
    m = B.load_manifest(written)
    assert m["schema_version"] == B.SCHEMA_VERSION
    assert set(m["files"]) == {"model.pte", "tokenizer/tokenizer.json"}
    assert m["files"]["model.pte"]["size"] == len(b"\x00program bytes")
    assert m["files"]["model.pte"]["sha256"] == B.sha256_file(written / "model.pte")
    assert m["files"]["tokenizer/tokenizer.json"]["role"] == "tokenizer"
    assert not list(written.parent.glob(".bundle.tmp-*"))


def test_checksum_mismatch_and_missing_file(written):
    (written / "model.pte").write_bytes(b"\x01program bytes")  # same size, other content
    with pytest.raises(B.BundleError, match="model.pte has a different sha256"):
        B.load_manifest(written)
    B.load_manifest(written, verify=False)  # the schema alone is still fine
    (written / "model.pte").unlink()
    with pytest.raises(B.BundleError, match="model.pte is missing"):
        B.load_manifest(written)


def test_truncated_file(written):
    (written / "tokenizer" / "tokenizer.json").write_bytes(b"{")
    with pytest.raises(B.BundleError, match="tokenizer/tokenizer.json is 1 bytes, manifest says 2"):
        B.load_manifest(written)


def test_schema_violations_are_listed(written):
    m = json.loads((written / "manifest.json").read_text())
    bad = copy.deepcopy(m)
    bad["format"] = "tflite"
    del bad["prompt"]
    (written / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(B.BundleError) as e:
        B.load_manifest(written)
    assert "format" in str(e.value) and "prompt" in str(e.value)
    m["schema_version"] = 99
    (written / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(B.BundleError, match="schema_version 99"):
        B.load_manifest(written)
    (written / "manifest.json").write_text("{not json")
    with pytest.raises(B.BundleError, match="not valid JSON"):
        B.load_manifest(written)


def test_not_a_bundle(tmp_path):
    with pytest.raises(B.BundleError, match="does not exist"):
        B.load_manifest(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(B.BundleError, match="no manifest.json"):
        B.load_manifest(tmp_path)


def test_refuses_to_replace_a_non_bundle_folder(tmp_path, model, tok):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a bundle"):
        B.write_bundle(tmp_path, _manifest(model, tok), {"model.pte": b"x"})
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_failed_write_leaves_the_old_bundle(written, model, tok):
    before = (written / "manifest.json").read_text()
    bad = _manifest(model, tok)
    bad["format"] = "tflite"
    with pytest.raises(B.BundleError):
        B.write_bundle(written, bad, {"model.pte": b"new"})
    assert (written / "manifest.json").read_text() == before
    assert (written / "model.pte").read_bytes() == b"\x00program bytes"
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]


def test_rewrite_replaces_cleanly(written, model, tok):
    B.write_bundle(written, _manifest(model, tok), {"model.pte": b"v2"})
    assert not (written / "tokenizer").exists()
    assert B.load_manifest(written)["files"]["model.pte"]["size"] == 2


def test_shipped_schema_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(B.manifest_schema())


@pytest.mark.parametrize("template", ["vicuna_short", "vicuna_v1", "plain", "vicuna_short_qfirst"])
def test_prompt_segments_reproduce_training_ids(tok, template):
    """The manifest's prompt (what apps and runners use) gives exactly the ids training/eager use."""
    from mobilemllm.inference import prompt_ids

    cfg = ModelConfig.from_preset("tiny", llm=SMALL, template=template)
    section = S.prompt_section(cfg, tok)
    for q in ["What colour is the circle?", "  Describe the image in detail.  "]:
        assert B.prompt_token_ids(section, tok, q, tok.bos_token_id) == prompt_ids(cfg, tok, q)
    if template == "plain":
        assert section["segments"][0] == {"type": "image"} and B.needs_bos_token(section)
    else:
        assert section["segments"][0]["text"].startswith("<s>") and not B.needs_bos_token(section)


def test_parity_helpers():
    import torch

    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert P.max_rel_diff(a, a) == 0.0
    assert P.max_rel_diff(a + 0.03, a) == pytest.approx(0.01)
    assert P.logit_cosine(a, 2 * a) == pytest.approx(1.0)
    assert P.logit_cosine(a, -a) == pytest.approx(-1.0)
    assert P.greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert P.greedy_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    s = P.summarize([P.check("x", 0.5, 0.9, False), P.check("y", 1.0)], forced=True)
    assert not s["passed"] and s["forced"] and P.failures(s) == ["x = 0.5 (needs 0.9)"]


def test_utf8_buffer_holds_incomplete_characters():
    from mobilemllm.runtime.executorch_runner import Utf8Buffer

    out = []
    buf = Utf8Buffer(out.append)
    text = "héllo → 世界 🙂!"
    data = text.encode("utf-8")
    # feed one byte at a time, as surrogate-escaped str pieces (what a byte-level piece can look like)
    for i in range(len(data)):
        buf.put(data[i:i + 1])
    buf.flush()
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)
    # a piece that splits a character, then completes it
    out.clear()
    buf = Utf8Buffer(out.append)
    snow = "☃".encode()
    buf.put(b"a" + snow[:2])
    buf.put(snow[2:] + b"b")
    buf.flush()
    assert out == ["a", "☃b"]


# ---- paths stay inside the bundle; the format matches the files; sizes are bounded -------------------------
def _tamper(bundle, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _entry(path) -> dict:
    return {"size": path.stat().st_size, "sha256": B.sha256_file(path)}


@pytest.mark.parametrize("rel", ["../secret.txt", "tokenizer/../../secret.txt", "/etc/hostname", "C:/x",
                                 "tokenizer\\x", "a//b", "./model.pte", "bad\nname"])
def test_manifest_file_paths_outside_the_bundle_are_refused(written, rel):
    secret = written.parent / "secret.txt"
    secret.write_text("not yours")
    _tamper(written, lambda m: m["files"].__setitem__(rel, _entry(secret)))
    with pytest.raises(B.BundleError, match="outside the bundle") as e:
        B.load_manifest(written)
    assert "\n" not in str(e.value)


def test_symlinks_leading_out_are_refused(written):
    secret = written.parent / "secret.txt"
    secret.write_text("not yours")
    (written / "tokenizer" / "link.txt").symlink_to(secret)
    _tamper(written, lambda m: m["files"].__setitem__("tokenizer/link.txt", _entry(secret)))
    with pytest.raises(B.BundleError, match="leads outside the bundle folder.*symbolic link"):
        B.load_manifest(written)
    with pytest.raises(B.BundleError, match="leads outside"):
        B.load_manifest(written, verify=False)  # refused even when checksums are skipped


def test_tokenizer_dir_outside_the_bundle_is_refused(written):
    elsewhere = written.parent / "tok"
    elsewhere.mkdir()
    _tamper(written, lambda m: m["tokenizer"].__setitem__("dir", "../tok"))
    with pytest.raises(B.BundleError, match="tokenizer dir '../tok'"):
        B.load_manifest(written)
    (written / "toklink").symlink_to(elsewhere)
    _tamper(written, lambda m: m["tokenizer"].__setitem__("dir", "toklink"))
    with pytest.raises(B.BundleError, match="'toklink' leads outside"):
        B.load_manifest(written)


def test_format_must_match_the_files(written, model, tok, tmp_path):
    with pytest.raises(B.BundleError, match="format 'executorch' but no model.pte in files"):
        B.write_bundle(tmp_path / "b", _manifest(model, tok), {"program.bin": b"x"})
    assert not (tmp_path / "b").exists()

    def as_onnx(m):
        m["format"] = "onnx"
        m["graphs"] = {"vision_encoder": {"file": "vision.onnx"}}
    _tamper(written, as_onnx)
    with pytest.raises(B.BundleError, match="graph vision_encoder's vision.onnx is not in files"):
        B.load_manifest(written)


def test_absurd_image_size_is_refused_before_anything_is_allocated(written):
    _tamper(written, lambda m: m["preprocessing"].__setitem__("image_size", 20000))
    with pytest.raises(B.BundleError, match="image_size: 20000 is greater than the maximum of 4096") as e:
        B.load_manifest(written)
    assert "\n" not in str(e.value)
