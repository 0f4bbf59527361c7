"""`mobilemllm bench --compare`: one checkpoint exported for ExecuTorch, ONNX Runtime and llama.cpp, measured
interleaved in one run; the comparison's spelling, its one-line errors before any export, and the cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mobilemllm.bench.compare import Spec, apply_options, bundle_dir, parse_compare
from mobilemllm.errors import UserError

PROMPT, NEW = 24, 8


def test_the_spelling_of_a_comparison():
    specs = parse_compare("executorch:group=128, onnx:decoder=genai,gguf:q4_0,gguf:quant=q4_k_m")
    assert [s.label for s in specs] == ["executorch g128", "onnx genai", "gguf q4_0", "gguf q4_k_m"]
    assert [s.backend for s in specs] == ["executorch", "onnxruntime", "llamacpp", "llamacpp"]
    assert [s.target for s in specs] == ["android", "onnx", "gguf", "gguf"]
    assert specs[0].slug == "executorch-group-128" and specs[2].slug == "gguf-quant-q4_0"
    assert Spec("executorch", (("target", "portable"),)).target == "portable"


def test_options_land_in_the_recipe_as_export_flags_put_them():
    from mobilemllm.export.recipes import load_recipe

    android = apply_options(load_recipe(target="android"), parse_compare("executorch:group=128:kv=int8")[0])
    assert android["quantization"]["text_decoder"]["group_size"] == 128 and android["kv_cache"] == "int8"
    assert apply_options(load_recipe(target="gguf"), parse_compare("gguf:q4_0")[0])["quantization"] == "q4_0"
    assert apply_options(load_recipe(target="onnx"), parse_compare("onnx:decoder=genai")[0])["decoder"] == "genai"


@pytest.mark.parametrize("text, words", [
    ("executorch,tflite", ["unknown runtime 'tflite'", "executorch, onnx, gguf"]),
    ("gguf:group=32", ["gguf takes no option 'group'", "quant"]),
    ("executorch:group=big", ["group=big is not a number"]),
    ("gguf,gguf", ["named twice"]),
    ("", ["--compare needs runtimes"]),
])
def test_bad_comparisons_are_one_line(text, words):
    with pytest.raises(UserError) as e:
        parse_compare(text)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def _one_line_error(capsys, args):
    from mobilemllm.cli import main

    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    return err


def test_cli_refuses_an_unknown_runtime_in_one_line(tiny_checkpoint, tmp_path, capsys):
    err = _one_line_error(capsys, ["bench", "--model", str(tiny_checkpoint), "--compare", "executorch,tflite",
                                   "--cache", str(tmp_path / "cache")])
    assert "unknown runtime 'tflite'" in err and not (tmp_path / "cache").exists()


def test_cli_refuses_a_model_llama_cpp_cannot_run_before_any_export(tiny_checkpoint, tmp_path, capsys):
    # the tiny test model's ldpv2 connector runs on an 8x8 patch grid; llama.cpp's ldpv2 needs MobileVLM's 24x24
    err = _one_line_error(capsys, ["bench", "--model", str(tiny_checkpoint), "--compare", "onnx,gguf:q4_0",
                                   "--cache", str(tmp_path / "cache")])
    assert "gguf q4_0 cannot take" in err and not (tmp_path / "cache").exists()


def test_cli_compare_needs_one_model(tiny_checkpoint, capsys):
    err = _one_line_error(capsys, ["bench", "--compare", "onnx"])
    assert "exactly one --model" in err


@pytest.fixture(scope="module")
def gguf_ready_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A tiny random-weight model llama.cpp runs too: SigLIP tower (no class token), mlp2x_gelu connector."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("executorch")
    from conftest import make_tiny_config, make_tiny_model

    from mobilemllm.models.checkpoint import save_checkpoint

    config = make_tiny_config(vision={"kind": "siglip"}, connector={"kind": "mlp2x_gelu"})
    return save_checkpoint(make_tiny_model(config, seed=0), tiny_tokenizer, tmp_path_factory.mktemp("ckpt") / "vlm")


def _check_outputs(out_dir, labels, stdout):
    import jsonschema

    from mobilemllm.bench.report import RESULT_SCHEMA

    doc = json.loads((out_dir / "r.json").read_text())
    jsonschema.validate(doc, RESULT_SCHEMA)
    assert [c["label"] for c in doc["cases"]] == labels
    assert doc["settings"]["order"].startswith("interleaved")
    for c in doc["cases"]:
        s = c["summary"]
        assert len(c["repetitions"]) == 2 and c["load_s"] > 0 and c["peak_rss_bytes"] > 2**20
        assert s["image_encode_s"]["median"] > 0, c["label"]  # every runtime times its image encode
        assert s["prefill_tok_s"]["median"] > 0 and s["decode_tok_s"]["median"] > 0 and s["ttft_s"]["median"] > 0
        assert s["ttft_s"]["median"] >= s["image_encode_s"]["median"]
        assert c["info"]["size_bytes"] > 0 and c["roofline"]["fraction"] > 0
        assert [r["decode_tokens"] for r in c["repetitions"]] == [NEW, NEW]
    with open(out_dir / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["label"] for r in rows}) == sorted(labels) and len(rows) == 2 * len(labels)
    assert all(float(r["image_encode_s"]) > 0 and float(r["decode_tok_s"]) > 0 for r in rows)
    for label in labels:
        assert label in stdout
    assert (out_dir / "r.png").stat().st_size > 1000
    return doc


@pytest.mark.slow
def test_compare_exports_then_reuses_and_measures_every_runtime(gguf_ready_checkpoint, tmp_path, capsys):
    from mobilemllm.cli import main

    ck, cache = str(gguf_ready_checkpoint), tmp_path / "cache"
    common = ["--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--warmup", "1", "--repeat", "2",
              "--threads", "1", "--quiet", "--cache", str(cache), "--json", str(tmp_path / "r.json"),
              "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")]
    compare = "executorch,onnx,gguf:q4_0"
    assert main(["bench", "--model", ck, "--compare", compare, *common]) == 0
    out = capsys.readouterr().out
    labels = ["executorch", "onnx", "gguf q4_0"]
    _check_outputs(tmp_path, labels, out)
    spec = parse_compare("gguf:q4_0")[0]
    gguf_dir = bundle_dir(cache, ck, spec)
    assert (gguf_dir / "manifest.json").is_file()

    # again: every bundle is reused, and a bare GGUF pair (made "elsewhere") joins the run
    pair = f"{gguf_dir / 'model.gguf'},{gguf_dir / 'mmproj.gguf'}"
    assert main(["bench", "--model", ck, "--compare", compare, "--gguf", pair, *common]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("reusing") == 3
    doc = _check_outputs(tmp_path, labels + ["model.gguf"], captured.out)
    bare = doc["cases"][-1]
    assert bare["backend"] == "llamacpp" and bare["info"]["quantization"] == "q4_0"
    assert bare["prefill_tokens"] == doc["cases"][2]["prefill_tokens"]  # BOS + filler around the same image


def test_gguf_pairs_and_the_bytes_a_decode_step_reads(tmp_path):
    from mobilemllm.bench.backends.llamacpp import decode_weight_bytes, is_gguf_pair, split_pair
    from mobilemllm.bench.plan import plan_cases

    assert is_gguf_pair("a/model.gguf,a/mmproj.gguf") and not is_gguf_pair("bundles/tiny-gguf")
    assert split_pair("m.gguf, p.gguf") == (Path("m.gguf"), Path("p.gguf"))
    # untied: the output projection is read in full, the token embedding only one row per token
    assert decode_weight_bytes({"token_embd.weight": 100, "output.weight": 100, "blk.0.attn_q.weight": 10}) == 110
    assert decode_weight_bytes({"token_embd.weight": 100, "blk.0.attn_q.weight": 10}) == 110  # tied
    with pytest.raises(UserError, match="MMPROJ"):
        plan_cases([], [], [], ggufs=[str(tmp_path / "m.gguf")])
    with pytest.raises(UserError, match="no such file"):
        plan_cases([], [], [], ggufs=[f"{tmp_path / 'm.gguf'},{tmp_path / 'p.gguf'}"])
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.gguf").write_bytes(b"GGUF")
    cases = plan_cases([], [], [], ggufs=[f"{tmp_path / 'm.gguf'},{tmp_path / 'p.gguf'}"])
    assert [(c.backend, c.label) for c in cases] == [("llamacpp", "m.gguf")]
