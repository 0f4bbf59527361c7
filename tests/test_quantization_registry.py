"""The quantization registry (mobilemllm.quantization): one table of schemes, one check for every
format's recipe shape, read by `mobilemllm export --help`, the export preflight and the roofline."""

from __future__ import annotations

import pytest

from mobilemllm import quantization as Q
from mobilemllm.cli import main
from mobilemllm.errors import ConfigError


def test_the_table_is_consistent():
    for (quantizer, name), s in Q.SCHEMES.items():
        assert quantizer in Q.QUANTIZERS and s.name == name
        assert s.parts and set(s.parts) <= set(Q.PARTS), name
        assert s.alias_of is None or (quantizer, s.alias_of) in Q.SCHEMES
    for key, support in Q.SUPPORT.items():
        assert set(support) == set(Q.PARTS), key
        for part, quantizer in support.items():  # every part has a default its quantizer offers for it
            default = Q.QUANTIZERS[quantizer].defaults[part]
            assert part in Q.scheme(quantizer, default).parts, (key, part)


def test_every_shipped_recipe_passes_the_check():
    from mobilemllm.export.recipes import load_recipe, targets

    for t in targets():
        assert Q.check(load_recipe(t)) == [], t
    plan = Q.resolve(load_recipe("android-qnn"))
    assert plan.summary() == "8a8w/embedding4/16a4w" and plan.parts["text_decoder"].info.impl == "use_16a4w"
    assert Q.resolve(load_recipe("onnx")).summary() == "int8/int8/int4"
    assert Q.resolve(load_recipe("coreml")).summary() == "int4/int4/int4"


@pytest.mark.parametrize("recipe, message", [
    ({"format": "executorch", "quantization": {"text_decoder": {"scheme": "3bit"}}},
     "quantization scheme '3bit' is not valid for text_decoder; choose one of fp32, 8da4w, 8da8w, int8, int8_weight"),
    ({"format": "executorch", "quantization": {"token_embedding": "8da4w"}},
     "not valid for token_embedding; choose one of fp32, embedding4, embedding8"),
    ({"format": "executorch", "quantization": {"text_decoder": {"scheme": "8da4w", "group_size": 33}}},
     "text_decoder group_size must be 0 (per channel) or a positive even integer, got 33"),
    ({"format": "executorch", "backend": "qnn", "quantization": {"vision_encoder": "8da8w"}},
     "is not a QNN scheme for vision_encoder; choose one of 16a4w, 16a8w, 16a16w, 8a8w, 8a4w, fp16"),
    ({"format": "executorch", "backend": "coreml", "quantization": {"vision_encoder": "8da8w"}},
     "ios-coreml runs the vision_encoder in Core ML"),
    ({"format": "executorch", "kv_cache": "int4"}, "kv_cache must be one of fp32, int8, got 'int4'"),
    ({"format": "executorch", "backend": "coreml", "kv_cache": "int8"}, "fp16 Core ML state"),
    ({"format": "onnx", "quantization": "int3"}, "unknown ONNX quantization 'int3' for text_decoder; valid: fp32, "
                                                 "int8, int4"),
    ({"format": "onnx", "quantization": {"token_embedding": "int4"}}, "token_embedding cannot be int4"),
    ({"format": "onnx", "quantization": {"text_decoder": {"scheme": "int4", "block_size": 48}}},
     "block_size must be one of 32, 64, 128, got 48"),
    ({"format": "coreml", "compression": "int2"}, "unknown Core ML compression 'int2'; valid: fp16, int8, int4, "
                                                  "palettize4"),
    ({"format": "coreml", "compression": "int4", "block_size": 48}, "block_size must be one of 16, 32, 64, 128"),
])
def test_a_bad_choice_is_one_line_naming_the_valid_ones(recipe, message):
    errors = Q.check(recipe)
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    with pytest.raises(ConfigError, match="invalid quantization"):
        Q.resolve(recipe)


def test_all_problems_together_and_once():
    errors = Q.check({"format": "coreml", "compression": "int2", "block_size": 7})
    assert len(errors) == 2  # one compression for every package: reported once, with the block size
    errors = Q.check({"format": "executorch", "quantization": {"text_decoder": "x", "vision_encoder": "y",
                                                                 "lm_head": "8da4w"}})
    assert len(errors) == 3 and any("unknown program part 'lm_head'" in e for e in errors)


def test_override_writes_each_format_shape():
    rec = {"format": "executorch", "quantization": {"text_decoder": {"scheme": "8da4w", "group_size": 32}}}
    Q.override(rec, {"text_decoder": "fp32", "vision_encoder": "8da8w", "token_embedding": None}, 64)
    assert rec["quantization"] == {"text_decoder": {"scheme": "fp32", "group_size": 64},
                                   "vision_encoder": {"scheme": "8da8w"}, "token_embedding": {"group_size": 64}}
    rec = {"format": "onnx", "quantization": "int4"}
    Q.override(rec, {"text_decoder": None, "vision_encoder": "int8"}, 128)
    assert Q.resolve(rec).summary() == "int8/fp32/int4" and Q.resolve(rec).group_size("text_decoder") == 128
    rec = {"format": "coreml", "compression": "int4"}
    Q.override(rec, {"text_decoder": "palettize4"}, 16)
    assert (rec["compression"], rec["block_size"]) == ("palettize4", 16)
    with pytest.raises(ConfigError, match="compresses every package with one scheme"):
        Q.override(rec, {"vision_encoder": "int8"})


def test_help_and_roofline_read_the_table():
    from mobilemllm.bench.roofline import scheme_bytes_per_weight

    for quantizer, part in (("torchao", "text_decoder"), ("qnn", "vision_encoder"), ("onnxruntime", "text_decoder"),
                            ("coremltools", "text_decoder"), ("torchao", "token_embedding")):
        assert " | ".join(Q.names(quantizer, part)) in Q.help_text(part)
    assert scheme_bytes_per_weight("8da4w", 32) == 0.5 + 4 / 32
    assert scheme_bytes_per_weight("int4_weight", 32) == scheme_bytes_per_weight("int4", 32)  # a manifest's name
    assert scheme_bytes_per_weight("16a4w", 128) == 0.5 + 4 / 128  # QNN's: 4-bit weights, not fp32
    assert scheme_bytes_per_weight("palettize4") == scheme_bytes_per_weight("int4")
    assert scheme_bytes_per_weight("fp16") == 2.0 and scheme_bytes_per_weight("no-such-scheme") == 4.0


@pytest.mark.parametrize("args, message", [
    (["--target", "android", "--decoder-quant", "int4"], "not valid for text_decoder; choose one of fp32, 8da4w"),
    (["--target", "android-qnn", "--vision-quant", "8da8w"], "not a QNN scheme for vision_encoder"),
    (["--target", "onnx", "--embedding-quant", "int4"], "token_embedding cannot be int4"),
    (["--target", "coreml", "--decoder-quant", "int3"], "unknown Core ML compression 'int3'; valid: fp16, int8"),
])
def test_cli_checks_every_format_before_any_weights_load(args, message, tmp_path, capsys, monkeypatch):
    import mobilemllm.api

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the quantization check")

    monkeypatch.setattr(mobilemllm.api, "load", no_load)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    assert main(["export", "--model", "tiny", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
