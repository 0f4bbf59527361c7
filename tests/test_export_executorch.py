"""ExecuTorch export: the export-ready decoder vs our LLaMA, recipes, and (slow) real bundles run through
ExecuTorch's C++ MultimodalRunner, including every bad input `mobilemllm generate --bundle` must reject.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_config, make_tiny_model
from mobilemllm.cli import main
from mobilemllm.errors import BackendUnavailable, ConfigError


# ---- the export-ready decoder ------------------------------------------------------------------------
def _reference_logits(llm, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm(inputs_embeds=embeds).logits[:, -1]


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_export_llama_matches_transformers(kv_heads):
    """Prefill + cached decode steps equal transformers' full forward (MHA and GQA)."""
    from mobilemllm.export.export_llama import ExportLlama

    cfg = make_tiny_config(llm={"num_kv_heads": kv_heads})
    model = make_tiny_model(cfg, seed=1)
    dec = ExportLlama(model.llm, cfg.llm, max_context_len=64).eval()
    assert dec.layers[0].wq.weight is model.llm.model.layers[0].self_attn.q_proj.weight  # shared, not copied
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(1, 12, cfg.llm.hidden_size, generator=g)
    with torch.no_grad():
        out = dec(seq[:, :9], torch.tensor([0]))
        torch.testing.assert_close(out, _reference_logits(model.llm, seq[:, :9]), rtol=1e-5, atol=1e-5)
        for pos in range(9, 12):  # one token at a time from the cache
            out = dec(seq[:, pos:pos + 1], torch.tensor([pos]))
            torch.testing.assert_close(out, _reference_logits(model.llm, seq[:, :pos + 1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_int8_kv_cache_stays_close_to_the_fp32_cache(kv_heads):
    """kv_cache="int8": per-token int8 keys/values (and query) through llama::custom_quantized_sdpa; prefill and
    cached decode stay within rounding of the fp32 cache, and the cache really is int8."""
    from mobilemllm.export.export_llama import ExportLlama

    cfg = make_tiny_config(llm={"num_kv_heads": kv_heads})
    model = make_tiny_model(cfg, seed=1)
    dec = ExportLlama(model.llm, cfg.llm, max_context_len=64, kv_cache="int8").eval()
    assert dec.layers[0].k_cache.dtype == torch.int8 and dec.layers[0].v_scales.shape == (1, 64, cfg.llm.kv_heads, 1)
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(1, 14, cfg.llm.hidden_size, generator=g)
    with torch.no_grad():
        for lo, hi in [(0, 9)] + [(p, p + 1) for p in range(9, 14)]:
            out = dec(seq[:, lo:hi], torch.tensor([lo]))
            ref = _reference_logits(model.llm, seq[:, :hi])
            assert torch.nn.functional.cosine_similarity(out, ref).item() > 0.9999
            assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item()
            assert out.argmax().item() == ref.argmax().item()
        assert dec.layers[0].k_cache[0, :14].abs().sum() > 0 and dec.layers[0].k_cache[0, 14:].abs().sum() == 0
        dec.reset_cache()
        assert dec.layers[0].k_cache.abs().sum() == 0 and dec.layers[0].k_scales.eq(1).all()
    with pytest.raises(ValueError, match="kv_cache"):
        ExportLlama(model.llm, cfg.llm, max_context_len=64, kv_cache="int4")


def test_export_llama_strict_export_keeps_the_cache_as_state():
    """After strict torch.export (+ RemoveRedundantTransposes, re-export) the cache is still mutable state."""
    from mobilemllm.export.executorch import build_modules, export_programs

    model = make_tiny_model(seed=2)
    cfg = model.config
    programs = export_programs(model, build_modules(model, 64), max_seq_len=64)
    dec = programs["text_decoder"].module()
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(1, 7, cfg.llm.hidden_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(dec(seq[:, :5], torch.tensor([0])), _reference_logits(model.llm, seq[:, :5]),
                                   rtol=1e-5, atol=1e-5)
        step = dec(seq[:, 5:6], torch.tensor([5]))  # only right if the prefill's keys/values were kept
        torch.testing.assert_close(step, _reference_logits(model.llm, seq[:, :6]), rtol=1e-5, atol=1e-5)
        # vision encoder: uint8 in, normalisation inside, equals the eager tower + connector
        from mobilemllm.data.images import normalize

        img = torch.randint(0, 256, (1, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=torch.uint8)
        torch.testing.assert_close(programs["vision_encoder"].module()(img),
                                   model.encode_images(normalize(img, cfg.vision)), rtol=1e-5, atol=1e-5)
        ids = torch.tensor([[5, 7, 9]])
        torch.testing.assert_close(programs["token_embedding"].module()(ids), model.llm.get_input_embeddings()(ids))


# ---- the shared export-ready vision encoder and token embedding (every format) ---------------------------
@pytest.mark.parametrize("hires", ["direct", "tiles"])
def test_vision_encoder_matches_the_model_in_eager_and_after_export(hires):
    """One VisionEncoder for every format: the runner's stacked uint8 image (ExecuTorch), uint8 views (ONNX)
    and float 0..255 views (Core ML) all give the eager tower + connector's embeddings, before and after
    torch.export; it shares the model's weights."""
    from mobilemllm.data.images import normalize
    from mobilemllm.export.modules import VisionEncoder

    cfg = make_tiny_config(vision={"hires": hires, "tile_grid": [1, 2]})
    model = make_tiny_model(cfg, seed=3)
    v, s = cfg.vision.num_views, cfg.vision.image_size
    views = torch.randint(0, 256, (v, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stacked = views.transpose(0, 1).reshape(1, 3, v * s, s).contiguous()  # views top to bottom
    with torch.no_grad():
        want = model.encode_images(normalize(views, cfg.vision).unsqueeze(0))
        for module, image in ((VisionEncoder(model), stacked), (VisionEncoder(model, stacked=False), views),
                              (VisionEncoder(model, stacked=False), views.float())):
            assert module.vision is model.vision and module.connector is model.connector
            torch.testing.assert_close(module.eval()(image), want, rtol=1e-5, atol=1e-5)
            exported = torch.export.export(module, (image,), strict=False).module()
            torch.testing.assert_close(exported(image), want, rtol=1e-5, atol=1e-5)
    assert want.shape == (1, cfg.num_visual_tokens, cfg.llm.hidden_size)


def test_exported_vision_encoder_has_no_safe_softmax_ops():
    """The ExecuTorch vision program is traced with eager attention: SDPA's exported form wraps softmax in
    eq / any / logical_not / where (which XNNPACK leaves to slow portable kernels); the tower's own setting is
    back to SDPA afterwards, and the program gives the model's embeddings."""
    from mobilemllm.data.images import normalize
    from mobilemllm.export.executorch import _example_image, build_modules, export_programs

    model = make_tiny_model(make_tiny_config(), seed=3)  # the tiny preset's CLIP tower
    assert model.config.vision.kind == "clip"
    programs = export_programs(model, build_modules(model, 64), max_seq_len=64)
    assert model.vision.model.config._attn_implementation == "sdpa"
    ops = {str(n.target) for n in programs["vision_encoder"].run_decompositions().graph.nodes
           if n.op == "call_function"}
    assert "aten._softmax.default" in ops
    assert not ops & {"aten.any.dim", "aten.where.self", "aten.logical_not.default", "aten.eq.Scalar"}, ops
    image = _example_image(model.config)
    with torch.no_grad():
        want = model.encode_images(normalize(image.view(3, 1, *image.shape[-2:]).transpose(0, 1),
                                             model.config.vision).unsqueeze(0))
        torch.testing.assert_close(programs["vision_encoder"].module()(image), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vision,connector", [("siglip", "mlp2x_gelu"), ("clip", "patch_merger")])
def test_portable_vision_program_matches_eager(vision, connector):
    """The portable target (no delegate) runs the vision encoder as eager computes it, through ExecuTorch's
    runtime: a SigLIP tower feeding mlp2x_gelu came out 15 % off when XNNPACK's linear pass ran on it."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from mobilemllm.export.executorch import _example_image
    from mobilemllm.export.executorch_backends import lower_program
    from mobilemllm.export.modules import VisionEncoder

    siglip = {"kind": "siglip", "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}
    cfg = make_tiny_config(vision=siglip if vision == "siglip" else {}, connector={"kind": connector})
    model = make_tiny_model(cfg, seed=0)
    encoder, image = VisionEncoder(model).eval(), _example_image(cfg)
    with torch.no_grad():
        want = encoder(image)
        program = lower_program({"vision_encoder": torch.export.export(encoder, (image,), strict=False)}, {}, None)
    got = _load_for_executorch_from_buffer(program.buffer).run_method("vision_encoder", (image,))[0]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_token_embedding_shares_the_weight_and_reads_placeholders_as_row_zero():
    from torch.export import Dim

    from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
    from mobilemllm.export.modules import TokenEmbedding

    model = make_tiny_model(seed=4)
    table = model.llm.get_input_embeddings()
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 9, 0]])
    plain, clamped = TokenEmbedding(table).eval(), TokenEmbedding(table, clamp_negative=True).eval()
    assert plain.embed.weight is table.weight and plain.embed is not table  # quantizing it keeps the model's
    with torch.no_grad():
        want = table(ids.clamp(min=0))
        torch.testing.assert_close(clamped(ids), want)
        torch.testing.assert_close(plain(ids[:, [0, 2]]), table(ids[:, [0, 2]]))
        n = Dim("n", min=1, max=64)
        exported = torch.export.export(clamped, (ids,), dynamic_shapes=({1: n},), strict=True).module()
        torch.testing.assert_close(exported(ids), want)
        torch.testing.assert_close(exported(ids[:, :2]), want[:, :2])  # a dynamic length


def test_8da4w_falls_back_to_per_channel_when_the_group_does_not_divide():
    from torch import nn

    from mobilemllm.export.quantize import quantize_linears

    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 16))
    x = torch.randn(2, 64)
    ref = m(x)
    info = quantize_linears(m, "8da4w", group_size=64)
    assert info["per_channel_fallback"] == 2 and info["group_size"] == 64
    assert all(type(layer.weight).__name__ != "Parameter" or layer.weight.dtype != torch.float32 for layer in m)
    assert torch.nn.functional.cosine_similarity(m(x), ref).min() > 0.9


# ---- recipes -----------------------------------------------------------------------------------------
EXECUTORCH_TARGETS = ["android", "ios", "ios-coreml", "android-qnn", "portable"]


def test_every_executorch_target_has_a_valid_recipe():
    from mobilemllm.export.recipes import load_recipe, targets

    assert set(EXECUTORCH_TARGETS) <= set(targets())
    repo = Path(__file__).resolve().parents[1] / "export"
    for t in EXECUTORCH_TARGETS:
        rec = load_recipe(t)
        assert rec["format"] == "executorch" and rec["name"] == t
        first = (repo / f"{t}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and "mobilemllm export" in first and f"--target {t}" in first


def test_unknown_target_and_bad_recipes(tmp_path):
    from mobilemllm.export.recipes import load_recipe

    with pytest.raises(ConfigError, match="valid targets: .*android.*portable"):
        load_recipe("androd")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: executorch\nbackend: vulkan\nquantization:\n  text_decoder: {scheme: 3bit}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path=bad)
    assert "vulkan" in str(e.value) and "3bit" in str(e.value)  # all problems, together


def test_cli_unknown_target_fails_before_loading(capsys, tmp_path):
    assert main(["export", "--model", "tiny", "--target", "androd", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'androd'" in err and "android" in err
    assert not (tmp_path / "b").exists()


def test_cli_qnn_without_sdk_fails_before_any_work(capsys, tmp_path, monkeypatch):
    import mobilemllm.api

    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)

    def no_load(*a, **k):  # a spy: the model must not even be loaded
        raise AssertionError("weights were loaded before the QNN SDK check")

    monkeypatch.setattr(mobilemllm.api, "load", no_load)
    code = main(["export", "--model", "tiny", "--target", "android-qnn", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == BackendUnavailable.exit_code
    assert "QNN_SDK_ROOT" in err and "QNN SDK" in err and "--target android" in err
    assert not (tmp_path / "b").exists()
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path / "no-such-sdk"))
    assert main(["export", "--model", "tiny", "--target", "android-qnn", "--out", str(tmp_path / "b")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_export_help():
    assert main(["export", "--help"]) == 0


# ---- real bundles (slow) ---------------------------------------------------------------------------------
def _export(ckpt: Path, out: Path, *args: str) -> Path:
    code = main(["export", "--model", str(ckpt), "--out", str(out), *args])
    assert code == 0, f"export {args} failed"
    return out


@pytest.fixture(scope="session")
def android_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("et") / "android", "--target", "android")


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("et") / "fp32", "--target", "android",
                   "--decoder-quant", "fp32", "--embedding-quant", "fp32", "--vision-quant", "fp32")


@pytest.mark.slow
def test_android_bundle_manifest_and_program(android_bundle):
    from mobilemllm.bundle import load_manifest
    from mobilemllm.export.executorch_parity import load_program

    m = load_manifest(android_bundle)
    assert m["format"] == "executorch" and m["target"] == "android"
    assert m["quantization"]["text_decoder"]["scheme"] == "8da4w"
    assert m["quantization"]["token_embedding"]["scheme"] == "embedding4"
    assert m["quantization"]["vision_encoder"]["scheme"] == "8da8w"
    assert m["parity"]["passed"] and not m["parity"]["forced"]
    checks = {c["name"]: c for c in m["parity"]["checks"]}
    assert checks["logit_cosine"]["value"] >= 0.9 and checks["cpp_tokenizer_matches"]["value"] is True
    assert m["methods"]["text_decoder"]["delegate_calls"] > 0  # XNNPACK took the decoder's linears
    leftover = {op.split("::")[-1].split(".")[0] for op in m["methods"]["vision_encoder"]["kernel_operators"]}
    assert not leftover & {"where", "any", "eq", "logical_not"}, leftover  # no safe-softmax ops (eager attention)
    names = load_program(android_bundle / "model.pte").method_names
    for method in ("vision_encoder", "token_embedding", "text_decoder", "get_max_seq_len", "get_max_context_len",
                   "get_bos_id", "get_eos_ids", "get_vocab_size", "use_kv_cache", "enable_dynamic_shape"):
        assert method in names
    assert m["files"]["model.pte"]["size"] == (android_bundle / "model.pte").stat().st_size


@pytest.mark.slow
def test_fp32_bundle_matches_eager_through_multimodal_runner(fp32_bundle, tiny_checkpoint, shapes_image):
    """The C++ runner's greedy text equals eager generation (same prompt template, same image)."""
    from mobilemllm.api import load
    from mobilemllm.data.images import load_image
    from mobilemllm.bundle import load_manifest
    from mobilemllm.inference import answer
    from mobilemllm.runtime import run_bundle

    checks = {c["name"]: c for c in load_manifest(fp32_bundle)["parity"]["checks"]}
    assert checks["logits_max_rel_diff"]["value"] <= 1e-4 and checks["greedy_agreement_32"]["value"] == 1.0
    model, tok = load(tiny_checkpoint)
    img = load_image(shapes_image)
    for q in ["What colour is the circle?", "Describe the image in detail."]:
        streamed: list[str] = []
        res = run_bundle(fp32_bundle, img, q, max_new_tokens=24, on_text=streamed.append, report=False)
        eager = answer(model, tok, img, q, max_new_tokens=24)
        assert res.text.strip() == eager.text
        assert "".join(streamed) == res.text
        assert res.prompt_tokens == eager.prompt_tokens


@pytest.mark.slow
def test_generate_cli_streams_and_reports_speed(android_bundle, shapes_image, capsys):
    code = main(["generate", "--bundle", str(android_bundle), "--image", str(shapes_image),
                 "--prompt", "What shape is it?", "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip()
    assert "time to first token" in out.err and "decode" in out.err and "tok/s" in out.err
    # as a real process: the text reaches the real stdout (the C++ runner's own printing does not)
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mobilemllm", "generate", "--bundle", str(android_bundle), "--image",
                           str(shapes_image), "--prompt", "What shape is it?", "--max-new-tokens", "12"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == out.out.strip()
    assert "PyTorchObserver" not in proc.stdout and "time to first token" in proc.stderr


@pytest.mark.slow
def test_sampled_byte_pieces_stream_as_valid_text(android_bundle, shapes_image):
    """Temperature sampling from a random model emits lone UTF-8 bytes; the stream must not break on them
    (executorch 1.5.1's bindings raise UnicodeDecodeError on such pieces unless we buffer bytes)."""
    from mobilemllm.data.images import load_image
    from mobilemllm.runtime import run_bundle

    img = load_image(shapes_image)
    streamed: list[str] = []
    res = run_bundle(android_bundle, img, "What is this?", max_new_tokens=80, temperature=1.0,
                     on_text=streamed.append, report=False)
    assert res.generated_tokens + 1 >= 2 and "".join(streamed) == res.text
    assert all(isinstance(p, str) and p for p in streamed)


@pytest.mark.slow
def test_generate_bundle_bad_inputs(android_bundle, tmp_path, capsys, shapes_image):
    import shutil

    from PIL import Image

    def run(*args):
        code = main(["generate", "--bundle", *args])
        return code, capsys.readouterr().err

    # missing and corrupt images
    code, err = run(str(android_bundle), "--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    assert code == 2 and "image not found" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code, err = run(str(android_bundle), "--image", str(bad), "--prompt", "hi")
    assert code == 2 and "cannot read image" in err
    # a wrong-sized image is resized, and the user is told
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(big)
    code, err = run(str(android_bundle), "--image", str(big), "--prompt", "hi", "--max-new-tokens", "4")
    assert code == 0 and "64x48" in err and "resized to 32x32" in err
    # a prompt longer than the context
    code, err = run(str(android_bundle), "--image", str(shapes_image), "--prompt", "circle " * 400)
    assert code == 2 and "context is 256" in err
    # damaged bundles: a modified file, a missing file, no manifest
    broken = tmp_path / "broken"
    shutil.copytree(android_bundle, broken)
    data = bytearray((broken / "model.pte").read_bytes())
    data[-10] ^= 0xFF
    (broken / "model.pte").write_bytes(bytes(data))
    code, err = run(str(broken), "--image", str(shapes_image), "--prompt", "hi")
    assert code == 2 and "model.pte has a different sha256" in err
    (broken / "tokenizer" / "tokenizer.json").unlink()
    code, err = run(str(broken), "--image", str(shapes_image), "--prompt", "hi")
    assert code == 2 and "tokenizer/tokenizer.json is missing" in err
    code, err = run(str(tmp_path), "--image", str(shapes_image), "--prompt", "hi")
    assert code == 2 and "no manifest.json" in err


@pytest.mark.slow
def test_reexport_overwrites_and_failed_parity_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    from mobilemllm.bundle import load_manifest

    strict = tmp_path / "strict.yaml"
    strict.write_text("name: strict\nformat: executorch\nbackend: portable\nmax_context_len: 64\n"
                      "parity: {greedy_tokens: 4, max_rel_diff: 1.0e-30}\n")
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(tiny_checkpoint), "--recipe", str(strict), "--out", str(out)]) == 2
    assert "ExecuTorch export failed parity against eager" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    _export(tiny_checkpoint, out, "--recipe", str(strict), "--force")
    m = load_manifest(out)
    assert m["parity"]["forced"] and not m["parity"]["passed"]
    assert m["context"]["max_context_len"] == 64
    loose = tmp_path / "portable.yaml"
    loose.write_text(strict.read_text().replace("1.0e-30", "1.0e-4"))
    _export(tiny_checkpoint, out, "--recipe", str(loose))  # re-export over an existing bundle
    m = load_manifest(out)
    assert m["parity"]["passed"] and not m["parity"]["forced"] and m["export"]["backend"] == "portable"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pte", "tokenizer"]


@pytest.mark.slow
def test_ios_target_builds_and_runs(tiny_checkpoint, tmp_path):
    from mobilemllm.bundle import load_manifest

    out = _export(tiny_checkpoint, tmp_path / "ios", "--target", "ios", "--max-context-len", "64")
    m = load_manifest(out)
    assert m["target"] == "ios" and m["parity"]["passed"] and m["export"]["backend"] == "xnnpack"


@pytest.mark.slow
def test_ios_coreml_target_lowers_but_cannot_run_here(tiny_checkpoint, tmp_path, capsys, shapes_image):
    from mobilemllm.data.images import load_image
    from mobilemllm.bundle import load_manifest
    from mobilemllm.export.executorch_parity import load_program  # noqa: F401
    from mobilemllm.runtime import run_bundle

    out = _export(tiny_checkpoint, tmp_path / "coreml", "--target", "ios-coreml", "--max-context-len", "64")
    assert "numerical parity checks need macOS" in capsys.readouterr().err
    m = load_manifest(out)
    assert m["export"]["backend"] == "coreml"
    assert "macOS" in m["parity"]["skipped_reason"] and m["parity"]["checks"] == []
    assert all(m["methods"][n]["delegate_calls"] > 0 for n in ("vision_encoder", "text_decoder"))
    # the whole decoder is one Core ML call (its KV cache is Core ML state): no CPU kernels, no XNNPACK
    assert m["methods"]["text_decoder"]["backends"] == ["CoreMLBackend"]
    assert m["methods"]["text_decoder"]["delegate_calls"] == 1
    assert m["methods"]["vision_encoder"]["backends"] == ["CoreMLBackend"]
    assert m["quantization"]["text_decoder"]["scheme"] == "fp32"
    assert b"CoreMLBackend" in (out / "model.pte").read_bytes()
    with pytest.raises(BackendUnavailable, match="Apple"):
        run_bundle(out, load_image(shapes_image), "hi", report=False)


@pytest.mark.slow
def test_int8_kv_cache_bundle_runs_and_matches_eager(tiny_checkpoint, tmp_path, shapes_image):
    """--kv-cache int8 end to end: lowered (the quantize/choose-qparams ops need ExecuTorch's quantized
    kernels), run by MultimodalRunner, greedy text equal to eager with fp32 weights, recorded in the manifest."""
    from mobilemllm.api import load
    from mobilemllm.data.images import load_image
    from mobilemllm.bundle import load_manifest
    from mobilemllm.inference import answer
    from mobilemllm.runtime import run_bundle

    out = _export(tiny_checkpoint, tmp_path / "kv8", "--target", "android", "--decoder-quant", "fp32",
                  "--embedding-quant", "fp32", "--vision-quant", "fp32", "--kv-cache", "int8")
    m = load_manifest(out)
    assert m["context"]["kv_cache"] == "int8" and m["export"]["recipe"]["kv_cache"] == "int8"
    checks = {c["name"]: c for c in m["parity"]["checks"]}
    assert m["parity"]["passed"] and checks["logit_cosine"]["value"] > 0.999
    model, tok = load(tiny_checkpoint)
    img = load_image(shapes_image)
    res = run_bundle(out, img, "What colour is the circle?", max_new_tokens=16, report=False)
    assert res.text.strip() == answer(model, tok, img, "What colour is the circle?", max_new_tokens=16).text


def test_ios_coreml_refuses_cpu_quantization_for_core_ml_parts(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_checkpoint), "--target", "ios-coreml", "--decoder-quant", "8da4w",
                 "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "ios-coreml runs the text_decoder in Core ML" in err and "--target ios" in err
    assert not (tmp_path / "c").exists()


def test_kv_cache_option_errors(tiny_checkpoint, tmp_path, capsys):
    from mobilemllm.export.recipes import parse_recipe

    with pytest.raises(ConfigError, match="kv_cache must be one of fp32, int8"):
        parse_recipe("format: executorch\nkv_cache: int4\n", "x.yaml")
    assert main(["export", "--model", str(tiny_checkpoint), "--target", "android", "--kv-cache", "fp8",
                 "--out", str(tmp_path / "a")]) == 2
    assert "kv_cache must be one of fp32, int8, got 'fp8'" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_checkpoint), "--target", "onnx", "--kv-cache", "int8",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--kv-cache applies to ExecuTorch targets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


_TRAINED = (Path(__file__).parent / "_trained.py").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _TRAINED, reason="tests/_trained.py (the trained tiny model) is not in this tree")
def test_trained_model_android_bundle_keeps_accuracy(tmp_path_factory):
    """8da4w/4-bit-embedding bundle of the trained tiny model: held-out question accuracy within 2 points."""
    from _trained import trained_tiny

    from mobilemllm.api import load
    from mobilemllm.data.images import load_image
    from mobilemllm.evaluation.metrics import exact_match
    from mobilemllm.evaluation.run import QUESTIONS_FILE, _questions
    from mobilemllm.inference import answer
    from mobilemllm.runtime import run_bundle

    trained = trained_tiny(tmp_path_factory)
    ckpt, eval_dir = trained["checkpoints"]["dpo"], trained["eval_dir"]
    out = _export(ckpt, tmp_path_factory.mktemp("trained") / "android", "--target", "android")
    model, tok = load(ckpt)
    # Enough questions that one flipped answer moves accuracy by well under the 2-point budget: with ~5 %
    # of answers differing after 4-bit quantization, 150 questions made the net difference a coin toss.
    qs = _questions(eval_dir / QUESTIONS_FILE, 600)
    eager_hits = bundle_hits = 0
    for q in qs:
        img = load_image(eval_dir / "images" / q["image"])
        eager_hits += exact_match(answer(model, tok, img, q["question"], max_new_tokens=8).text, q["answer"])
        bundle_hits += exact_match(run_bundle(out, img, q["question"], max_new_tokens=8, report=False).text,
                                   q["answer"])
    eager_acc, bundle_acc = eager_hits / len(qs), bundle_hits / len(qs)
    print(f"held-out accuracy: eager {eager_acc:.3f}, android bundle {bundle_acc:.3f} ({len(qs)} questions)")
    assert abs(eager_acc - bundle_acc) <= 0.02 + 1e-9
