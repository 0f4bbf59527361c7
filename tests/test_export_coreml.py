"""Core ML export: the export-ready stateful decoder against our LLaMA (eager and after torch.export),
conversion of the tiny model for every compression recipe with spec checks (inputs, outputs, states,
shapes, deployment target, compression ops), and bad input.

Core ML cannot predict on Linux, so the prediction test runs only on macOS.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_config, make_tiny_model

from mobilemllm.errors import ConfigError

needs_macos = pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML prediction needs macOS")


def _model(kv_heads=None, seed=0):
    cfg = make_tiny_config(llm={"num_kv_heads": kv_heads}) if kv_heads else make_tiny_config()
    model = make_tiny_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the default init: clear logits, errors show
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    return model


def _run_steps(decoder, emb: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    """Feed ``emb`` in chunks through a stateful decoder; the last-position logits of each call."""
    from mobilemllm.export.coreml_decoder import causal_mask

    out, past = [], 0
    for n in chunks:
        out.append(decoder(emb[:, past:past + n], causal_mask(past, n))[0, -1])
        past += n
    return out


# ---- the export-ready decoder in eager PyTorch (runs everywhere) -------------------------------------
@pytest.mark.parametrize("kv_heads", [None, 1])  # multi-head, and grouped KV heads (2 query heads per KV head)
def test_decoder_matches_llama_prefill_and_decode(kv_heads):
    from mobilemllm.export.coreml_decoder import CoreMLDecoder

    model = _model(kv_heads)
    cfg = model.config.llm
    dec = CoreMLDecoder(model.llm, cfg, max_context=64, cache_dtype=torch.float32).eval()
    emb = torch.randn(1, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb).logits[0]
        got = _run_steps(dec, emb, [8, 1, 1, 2])
    for logits, pos in zip(got, (7, 8, 9, 11)):
        torch.testing.assert_close(logits, ref[pos], atol=1e-4, rtol=1e-4)
    # shares the weights, not copies: a change to the original shows up in the export-ready module
    assert dec.layers[0].q_proj.weight is model.llm.model.layers[0].self_attn.q_proj.weight
    assert dec.lm_head.weight is model.llm.lm_head.weight


def test_decoder_fp16_cache_close_and_reset():
    from mobilemllm.export.coreml_decoder import CoreMLDecoder

    model = _model()
    dec = CoreMLDecoder(model.llm, model.config.llm, max_context=32).eval()  # fp16 cache, as Core ML
    emb = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb).logits[0, -1]
        first = _run_steps(dec, emb, [5, 1])[-1]
        dec.reset_cache()
        again = _run_steps(dec, emb, [6])[-1]
    assert torch.nn.functional.cosine_similarity(first, ref, dim=0) > 0.9999
    torch.testing.assert_close(again, first, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_runner_decoder_matches_llama(kv_heads):
    """CoreMLRunnerDecoder: the ExecuTorch text_decoder signature (embeds, start_pos tensor), the cache written
    through a one-hot matmul and read whole under a mask; equal to our LLaMA (fp32 cache), close in fp16."""
    from mobilemllm.export.coreml_decoder import CoreMLRunnerDecoder

    model = _model(kv_heads)
    cfg = model.config.llm
    emb = torch.randn(1, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb).logits[0]
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
            dec = CoreMLRunnerDecoder(model.llm, cfg, max_context=32, cache_dtype=dtype).eval()
            pos = 0
            for n in (8, 1, 1, 2):
                out = dec(emb[:, pos:pos + n], torch.tensor([pos]))[0]
                pos += n
                torch.testing.assert_close(out, ref[pos - 1], atol=tol, rtol=tol)
            assert dec.inner.layers[0].k_cache[0, :, :12].abs().sum() > 0 and dec.inner.layers[0].k_cache[0, :, 12:].abs().sum() == 0
            dec.reset_cache()
            torch.testing.assert_close(dec(emb[:, :12], torch.tensor([0]))[0], ref[11], atol=tol, rtol=tol)
    assert dec.inner.layers[0].q_proj.weight is model.llm.model.layers[0].self_attn.q_proj.weight


def test_runner_decoder_strict_export_keeps_the_cache_as_state():
    """What the ios-coreml target exports: strict torch.export, prefill length dynamic below the cache size."""
    from torch.export import Dim, export

    from mobilemllm.export.coreml_decoder import CoreMLRunnerDecoder

    model = _model(kv_heads=1)
    cfg = model.config.llm
    dec = CoreMLRunnerDecoder(model.llm, cfg, max_context=32, cache_dtype=torch.float32).eval()
    ep = export(dec, (torch.zeros(1, 4, cfg.hidden_size), torch.tensor([0])),
                dynamic_shapes=({1: Dim("seq", min=1, max=31)}, None), strict=True).run_decompositions({})
    assert len(ep.graph_signature.buffers_to_mutate) == 4  # k and v of 2 layers: the future Core ML states
    exported = ep.module()
    emb = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb).logits[0]
        torch.testing.assert_close(exported(emb[:, :7], torch.tensor([0]))[0], ref[6], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(exported(emb[:, 7:8], torch.tensor([7]))[0], ref[7], atol=1e-4, rtol=1e-4)


def test_decoder_after_torch_export_matches_eager():
    from torch.export import Dim, export

    from mobilemllm.export.coreml_decoder import CoreMLDecoder, causal_mask

    model = _model(kv_heads=1)
    dec = CoreMLDecoder(model.llm, model.config.llm, max_context=33, cache_dtype=torch.float32).eval()
    n, end = Dim("n", min=1, max=32), Dim("end", min=1, max=32)
    ep = export(dec, (torch.randn(1, 5, 64), causal_mask(3, 5)),
                dynamic_shapes={"inputs_embeds": {1: n}, "causal_mask": {2: n, 3: end}}).run_decompositions({})
    assert len(ep.graph_signature.buffers_to_mutate) == 4  # k and v of 2 layers: the future Core ML states
    exported = ep.module()
    fresh = CoreMLDecoder(model.llm, model.config.llm, max_context=33, cache_dtype=torch.float32).eval()
    emb = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = _run_steps(fresh, emb, [7, 1, 1])
        got = _run_steps(exported, emb, [7, 1, 1])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_mask():
    from mobilemllm.export.coreml_decoder import MASK_MIN, causal_mask

    m = causal_mask(2, 3)[0, 0]
    assert m.shape == (3, 5)
    assert (m == 0).tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                 [True, True, True, True, True]]
    assert m.min() == MASK_MIN


# ---- conversion and spec checks (Linux and macOS) -------------------------------------------------
ct = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def coreml_bundle(tmp_path_factory, tiny_checkpoint):
    """`mobilemllm export --target coreml` (the shipped recipe: int4, block 32) of the tiny checkpoint."""
    import contextlib
    import io

    from mobilemllm.cli import main

    out = tmp_path_factory.mktemp("cm") / "b"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["export", "--model", str(tiny_checkpoint), "--target", "coreml", "--out", str(out)])
    assert rc == 0, err.getvalue()[-2000:]
    return out, err.getvalue().splitlines()


@pytest.fixture(scope="module")
def fp16_decoder():
    from mobilemllm.export.coreml import convert_decoder

    return convert_decoder(_model())


@pytest.mark.slow
def test_bundle_specs(coreml_bundle, tiny_config):
    from mobilemllm.bundle import load_manifest
    from mobilemllm.export.coreml import IOS18_SPEC_VERSION, package_spec

    b, logs = coreml_bundle
    man = load_manifest(b)
    assert man["format"] == "coreml"
    assert {p.name for p in b.iterdir()} == {"vision.mlpackage", "embed.mlpackage", "decoder.mlpackage",
                                            "tokenizer", "manifest.json"}
    specs = {part: package_spec(b / entry["file"]) for part, entry in man["graphs"].items()}
    assert all(s["spec_version"] >= IOS18_SPEC_VERSION for s in specs.values())  # iOS 18 / macOS 15

    vis = specs["vision_encoder"]
    assert vis["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [1, 3, 32, 32]}]
    assert vis["outputs"][0]["name"] == "image_embeds" and vis["outputs"][0]["shape"] == [1, 16, 64]

    emb = specs["token_embedding"]
    assert emb["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": [1, "1..256"]}]

    dec = specs["text_decoder"]
    assert dec["inputs"] == [
        {"name": "inputs_embeds", "dtype": "float16", "shape": [1, "1..256", 64]},
        {"name": "causal_mask", "dtype": "float16", "shape": [1, 1, "1..256", "1..256"]}]
    assert dec["outputs"] == [{"name": "logits", "dtype": "float16", "shape": [1, 1, 512]}]
    assert len(dec["states"]) == 4
    assert all(s["dtype"] == "float16" and s["shape"] == [1, 2, 257, 32] for s in dec["states"])
    assert dec["ops"].get("constexpr_blockwise_shift_scale", 0) == 2 * 7 + 1  # every linear + LM head
    assert man["graphs"]["text_decoder"]["states"] == dec["states"]
    assert man["quantization"]["text_decoder"] == {"scheme": "int4", "group_size": 32,
                                                    "backend": "coremltools.optimize.coreml"}
    assert man["preprocessing"]["input_dtype"] == "float32" and man["preprocessing"]["normalize_in_graph"]


@pytest.mark.slow
def test_bundle_says_plainly_that_numbers_need_macos(coreml_bundle):
    b, logs = coreml_bundle
    parity = json.loads((b / "manifest.json").read_text())["parity"]
    if platform.system() == "Darwin":
        assert parity["skipped_reason"] is None
        assert any(c["name"] == "logit_cosine" and c["passed"] for c in parity["checks"])
    else:
        assert parity["skipped_reason"].startswith("Core ML prediction needs macOS")
        assert any("Core ML prediction needs macOS" in line for line in logs)
        assert not any(c["name"] == "logit_cosine" for c in parity["checks"])
    assert parity["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme, op, count", [("fp16", None, 0),
                                               ("int8", "constexpr_blockwise_shift_scale", 15),
                                               ("palettize4", "constexpr_lut_to_dense", 15)])
def test_compression_recipes(fp16_decoder, scheme, op, count, tmp_path):
    from mobilemllm.export.coreml import compress, package_spec

    ml = compress(fp16_decoder, scheme)
    path = tmp_path / "decoder.mlpackage"
    ml.save(str(path))
    ops = package_spec(path)["ops"]
    constexpr = {k: v for k, v in ops.items() if k.startswith("constexpr")}
    if op is None:
        assert constexpr == {}
    else:
        assert constexpr == {op: count}
    assert len(package_spec(path)["states"]) == 4  # compression keeps the stateful cache


@needs_macos
@pytest.mark.slow
def test_predictions_match_eager_on_macos(coreml_bundle, tiny_checkpoint, tiny_tokenizer):
    from mobilemllm.export.coreml import PACKAGE_FILES, coreml_teacher_forced
    from mobilemllm.export.parity import eager_reference, logit_cosine, parity_image
    from mobilemllm.inference import prompt_ids
    from mobilemllm.models.checkpoint import load_checkpoint

    b, _ = coreml_bundle
    model, _ = load_checkpoint(tiny_checkpoint)
    image = parity_image(model.config.vision)
    ids = prompt_ids(model.config, tiny_tokenizer, "What is in the image?")
    ref, tokens = eager_reference(model, ids, image, 6)
    loaded = {part: ct.models.MLModel(str(b / name)) for part, name in PACKAGE_FILES.items()}
    got = torch.from_numpy(coreml_teacher_forced(loaded, model.config, ids, image, tokens))
    assert logit_cosine(got, ref) > 0.9


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, message", [
    ({"compression": "int2"}, "unknown Core ML compression 'int2'; valid: fp16, int8, int4, palettize4"),
    ({"compression": "int4", "block_size": 48}, "block_size must be one of"),
    ({"compresion": "int4"}, "unknown key.*compresion"),
])
def test_bad_recipe_fails_before_work(recipe, message, tmp_path):
    from mobilemllm.export.pipeline import export_bundle

    with pytest.raises(ConfigError, match=message):  # no model needed: checked before it loads
        export_bundle(None, {"name": "coreml", "format": "coreml", **recipe}, tmp_path / "b")
    assert not list(tmp_path.iterdir())


def test_coreml_recipe_file_is_valid():
    import yaml

    from mobilemllm.export.pipeline import preflight
    from mobilemllm.quantization import resolve

    path = Path(__file__).resolve().parents[1] / "export" / "coreml.yaml"
    assert path.read_text().startswith("# mobilemllm export")
    recipe = yaml.safe_load(path.read_text())
    assert recipe["format"] == "coreml"
    assert preflight(recipe).name == "coreml"
    plan = resolve(recipe)
    assert (plan.summary(), plan.group_size("text_decoder")) == ("int4/int4/int4", 32)


def test_missing_package(tmp_path):
    from mobilemllm.errors import UserError
    from mobilemllm.export.coreml import package_spec

    with pytest.raises(UserError, match="does not exist"):
        package_spec(tmp_path / "decoder.mlpackage")
