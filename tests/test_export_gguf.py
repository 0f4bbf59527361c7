"""GGUF export (`mobilemllm export --target gguf`): the writers read back with the gguf package, what llama.cpp
refuses, and the bundles run through llama.cpp itself (llama-cpp-python) against eager.

Tests that run llama.cpp skip on a developer machine without llama-cpp-python and fail in CI, where the README's
test command installs it (``scripts/install_llama_cpp.py``: 0.3.36 with llama.cpp's CLIP class-token fix, which
the CLIP-tower tests need).
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.specifiers import SpecifierSet

from conftest import make_tiny_config
from mobilemllm.runtime import llamacpp_probe as probe

# Tiny towers llama.cpp's clip.cpp runs exactly: SigLIP (no class token; see docs/gguf.md for CLIP's) at 32 px
# for mlp2x_gelu, and at the 24x24 patch grid clip.cpp's MobileVLM projectors are built for (48 px, 2 px patches).
SIGLIP = {"kind": "siglip", "image_size": 32, "patch_size": 4, "image_mean": (0.5, 0.5, 0.5),
          "image_std": (0.5, 0.5, 0.5)}
GRID24 = {**SIGLIP, "image_size": 48, "patch_size": 2}


def gguf_config(connector: str = "mlp2x_gelu", vision: dict | None = None, **overrides):
    vision = vision if vision is not None else (GRID24 if connector in ("ldp", "ldpv2") else SIGLIP)
    return make_tiny_config(vision=vision, connector={"kind": connector}, **overrides)


def gguf_model(connector: str = "mlp2x_gelu", seed: int = 0, **overrides):
    from mobilemllm.models.vlm import MobileVLM

    torch.manual_seed(seed)
    return MobileVLM(gguf_config(connector, **overrides)).eval()


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _same(tensor, expected: np.ndarray) -> None:
    """A GGUF tensor holds ``expected`` as its stored dtype (fp16 matrices, fp32 vectors) exactly."""
    got = np.asarray(tensor.data)
    want = expected.astype(got.dtype)
    assert got.shape == want.shape, (tensor.name, got.shape, want.shape)
    np.testing.assert_array_equal(got, want, err_msg=tensor.name)


# ---- the writers, read back ----------------------------------------------------------------------------
def test_text_gguf_round_trip(tmp_path, tiny_tokenizer):
    """Every LLaMA tensor and hyperparameter reads back as written: q/k rows interleaved per head as llama.cpp's
    rope needs, norms fp32, matrices fp16, the tied output left to token_embd; the vocabulary and ids are the
    tokenizer's, padded to the embedding table with UNUSED rows."""
    import gguf

    from mobilemllm.export import manifest_sections as S
    from mobilemllm.export.gguf.text import write_text_gguf
    from mobilemllm.export.gguf.vocab import chat_template

    model = gguf_model()
    cfg = model.config.llm
    prompt = S.prompt_section(model.config, tiny_tokenizer)
    path = tmp_path / "model.gguf"
    write_text_gguf(model, tiny_tokenizer, path, prompt, chat_template(prompt), "t")
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_layers and fields["llama.embedding_length"] == cfg.hidden_size
    assert fields["llama.attention.head_count"] == cfg.num_heads
    assert fields["llama.rope.dimension_count"] == cfg.head_dim
    assert fields["llama.context_length"] == cfg.max_position_embeddings

    sd = model.llm.state_dict()
    hd, half = cfg.head_dim, cfg.head_dim // 2
    for i in range(cfg.num_layers):
        q = sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy()
        got_q = np.asarray(tensors[f"blk.{i}.attn_q.weight"].data).astype(np.float32)
        for h in range(cfg.num_heads):  # row 2j of a head is transformers' row j, row 2j+1 its row half + j
            np.testing.assert_array_equal(got_q[h * hd:(h + 1) * hd:2], q[h * hd:h * hd + half].astype(np.float16))
            np.testing.assert_array_equal(got_q[h * hd + 1:(h + 1) * hd:2], q[h * hd + half:(h + 1) * hd]
                                          .astype(np.float16))
        _same(tensors[f"blk.{i}.attn_v.weight"], sd[f"model.layers.{i}.self_attn.v_proj.weight"].numpy())
        _same(tensors[f"blk.{i}.ffn_down.weight"], sd[f"model.layers.{i}.mlp.down_proj.weight"].numpy())
        _same(tensors[f"blk.{i}.attn_norm.weight"], sd[f"model.layers.{i}.input_layernorm.weight"].numpy())
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _same(tensors["token_embd.weight"], sd["model.embed_tokens.weight"].numpy())
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert len(tensors) == 2 + 9 * cfg.num_layers

    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == cfg.vocab_size
    vocab = tiny_tokenizer.get_vocab()
    assert all(tokens[i] == text for text, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size)]
    assert fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.token_type"][tiny_tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"]) > 0 and fields["tokenizer.ggml.add_bos_token"] is True
    assert "<__media__>" in fields["tokenizer.chat_template"]


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "ldp", "ldpv2"])
def test_mmproj_round_trip(tmp_path, connector):
    """Every tower and connector tensor reads back under the name clip.cpp loads, with the keys it reads."""
    import gguf

    from mobilemllm.export.gguf.mmproj import write_mmproj_gguf

    model = gguf_model(connector)
    v = model.config.vision
    path = tmp_path / "mmproj.gguf"
    write_mmproj_gguf(model, path, "t")
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "clip" and fields["clip.has_vision_encoder"] is True
    assert fields["clip.projector_type"] == {"mlp2x_gelu": "mlp", "ldp": "ldp", "ldpv2": "ldpv2"}[connector]
    assert fields["clip.vision.image_size"] == v.image_size and fields["clip.vision.patch_size"] == v.patch_size
    assert fields["clip.vision.block_count"] == v.num_layers
    assert fields["clip.vision.projection_dim"] == model.config.llm.hidden_size
    assert fields["clip.vision.feature_layer"] == [v.num_layers]  # select_layer -1: the last layer's output
    assert fields["clip.use_gelu"] is True  # SigLIP's tanh GELU (ggml_gelu)
    np.testing.assert_allclose(fields["clip.vision.image_mean"], v.image_mean)

    tower = {k.removeprefix("vision_model."): t for k, t in model.vision.model.state_dict().items()}
    _same(tensors["v.patch_embd.weight"], tower["embeddings.patch_embedding.weight"].numpy())
    _same(tensors["v.position_embd.weight"], tower["embeddings.position_embedding.weight"].numpy())
    _same(tensors["v.blk.1.ffn_up.weight"], tower["encoder.layers.1.mlp.fc1.weight"].numpy())
    _same(tensors["v.blk.1.ffn_down.weight"], tower["encoder.layers.1.mlp.fc2.weight"].numpy())
    _same(tensors["v.blk.0.ln1.bias"], tower["encoder.layers.0.layer_norm1.bias"].numpy())
    assert not any(n.startswith("v.post_ln") for n in tensors)  # the connector reads the state before it

    conn = {k: t.numpy() for k, t in model.connector.state_dict().items()}
    if connector == "mlp2x_gelu":
        expected = {"mm.0.weight": conn["0.weight"], "mm.2.bias": conn["2.bias"]}
    elif connector == "ldpv2":
        expected = {"mm.model.mlp.0.weight": conn["mlp.mlp.0.weight"], "mm.model.mlp.2.bias": conn["mlp.mlp.2.bias"],
                    "mm.model.peg.0.weight": conn["peg.peg.0.weight"][:, 0]}  # depthwise (C, 1, 3, 3) -> (C, 3, 3)
    else:
        expected = {"mm.model.mlp.1.weight": conn["mlp.1.weight"],
                    "mm.model.mb_block.1.block.0.0.weight": conn["mb_block.1.block.0.0.weight"][:, 0],
                    "mm.model.mb_block.2.block.1.fc1.weight": conn["mb_block.2.block.1.fc1.weight"][:, :, 0, 0],
                    "mm.model.mb_block.2.block.2.0.weight": conn["mb_block.2.block.2.0.weight"][:, :, 0, 0],
                    "mm.model.mb_block.2.block.2.1.bias": conn["mb_block.2.block.2.1.bias"]}
    for name, want in expected.items():
        _same(tensors[name], want)
    n_tower = sum(1 for k in tower if not k.startswith("post_layernorm."))
    assert len(tensors) == n_tower + len(conn)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for n, t in tensors.items()
               if n.endswith(".weight") and len(t.shape) >= 2)


def test_clip_tower_keeps_class_embedding(tmp_path):
    """A CLIP tower's class embedding and its pre-norm are written where clip.cpp looks for them."""
    from mobilemllm.export.gguf.mmproj import write_mmproj_gguf

    model = gguf_model("mlp2x_gelu", vision={})  # the tiny preset's CLIP tower
    write_mmproj_gguf(model, tmp_path / "mmproj.gguf", "t")
    fields, tensors = _read(tmp_path / "mmproj.gguf")
    tower = {k.removeprefix("vision_model."): t for k, t in model.vision.model.state_dict().items()}
    _same(tensors["v.class_embd"], tower["embeddings.class_embedding"].numpy())
    _same(tensors["v.pre_ln.weight"], tower["pre_layrnorm.weight"].numpy())
    assert fields["clip.use_gelu"] is False  # CLIP's quick GELU


def test_chat_template_renders_the_manifest_prompt(tiny_tokenizer):
    """The GGUF's chat template gives the manifest's prompt for the first turn (image where mtmd's marker goes,
    without the BOS text, which llama.cpp adds) and the training layout for a follow-up."""
    import jinja2

    from mobilemllm.export import manifest_sections as S
    from mobilemllm.export.gguf.vocab import chat_template

    cfg = gguf_config()
    prompt = S.prompt_section(cfg, tiny_tokenizer)
    tpl = jinja2.Environment().from_string(chat_template(prompt))
    one = tpl.render(messages=[{"role": "user", "content": "<__media__>What colour is it?"}])
    assert one == "A chat about an image. USER: <__media__>\nWhat colour is it? ASSISTANT:"
    two = tpl.render(messages=[{"role": "user", "content": "What colour is it? <__media__>"},
                               {"role": "assistant", "content": "Red."},
                               {"role": "user", "content": "Where?"}])
    assert two == one + " Red.</s> USER: Where? ASSISTANT:"


# ---- what llama.cpp cannot run -------------------------------------------------------------------------
@pytest.mark.parametrize("connector, words", [("patch_merger", "patch_merger connector"),
                                              ("resampler", "resampler connector")])
def test_unrunnable_connectors_are_named(connector, words):
    from mobilemllm.export.gguf.support import problems

    found = problems(gguf_config(connector, vision=SIGLIP))
    assert len(found) == 1 and words in found[0] and "mlp2x_gelu, ldp, ldpv2" in found[0]


def test_mobilevlm_projectors_need_the_24_grid():
    from mobilemllm.export.gguf.support import problems

    found = problems(gguf_config("ldpv2", vision=SIGLIP))  # 8x8 grid
    assert len(found) == 1 and "24x24" in found[0] and "8x8" in found[0]
    assert problems(gguf_config("ldpv2")) == [] and problems(gguf_config("ldp")) == []


def test_unrunnable_model_is_refused_before_anything_is_written(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """export (API and CLI) stops in one line naming what llama.cpp runs; no bundle folder appears."""
    from mobilemllm.cli import main
    from mobilemllm.errors import ConfigError
    from mobilemllm.export.formats import FORMATS

    monkeypatch.setattr(FORMATS["gguf"], "require", lambda recipe: None)  # whether llama.cpp is installed
    with pytest.raises(ConfigError) as e:
        export(gguf_model("patch_merger"), tiny_tokenizer, tmp_path / "b")
    msg = str(e.value)
    assert "\n" not in msg and "patch_merger connector" in msg and "mlp2x_gelu, ldp, ldpv2" in msg
    assert not (tmp_path / "b").exists()
    assert main(["export", "--target", "gguf", "--model", "tiny", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "cannot export to GGUF" in err and "24x24 patch grid" in err and not (tmp_path / "c").exists()


def test_missing_llama_cpp_is_one_line(tmp_path, monkeypatch, capsys):
    """Without llama-cpp-python, export stops before loading weights and the runner says what to install."""
    from mobilemllm.cli import main
    from mobilemllm.errors import BackendUnavailable
    from mobilemllm.runtime.llamacpp_engine import import_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    assert main(["export", "--target", "gguf", "--model", "tiny", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama-cpp-python" in err[0] and "pip install 'mobilemllm[gguf]'" in err[0]
    assert "python scripts/install_llama_cpp.py" in err[0]  # the build with the CLIP fix
    with pytest.raises(BackendUnavailable, match=r"install_llama_cpp\.py.*pip install 'mobilemllm\[gguf\]'"):
        import_llama_cpp()


def test_recipe_and_command_line_choices():
    from mobilemllm import quantization as Q
    from mobilemllm.errors import ConfigError
    from mobilemllm.export.recipes import load_recipe

    rec = load_recipe("gguf")
    assert Q.resolve(rec).summary() == "f16/q4_k_m/q4_k_m" and Q.check(rec) == []
    Q.override(rec, {"text_decoder": "q8_0", "token_embedding": None, "vision_encoder": None})
    assert rec["quantization"] == "q8_0" and Q.resolve(rec).summary() == "f16/q8_0/q8_0"
    with pytest.raises(ConfigError, match="--decoder-quant .f16 . q8_0 . q4_0 . q4_k_m.; the mmproj stays f16"):
        Q.override(rec, {"vision_encoder": "q8_0"})
    with pytest.raises(ConfigError, match="fixes the block sizes"):
        Q.override(rec, {}, group_size=64)
    assert Q.check({"format": "gguf", "quantization": "q5_k"}) == \
        ["unknown GGUF quantization 'q5_k'; valid: f16, q8_0, q4_0, q4_k_m"]


# ---- through llama.cpp ---------------------------------------------------------------------------------
def need_llama_cpp() -> None:
    """Skip without llama-cpp-python on a developer machine; fail in CI, whose dev extra installs it."""
    import importlib.util

    from conftest_apps import need_tool

    need_tool("llama-cpp-python", importlib.util.find_spec("llama_cpp") is not None, "pip install 'mobilemllm[gguf]'")


def export(model, tokenizer, out, scheme: str = "f16", log=None, force: bool = False):
    from mobilemllm.export.pipeline import export_bundle
    from mobilemllm.export.recipes import load_recipe

    recipe = load_recipe("gguf")
    recipe["quantization"] = scheme
    return export_bundle(model, recipe, out, tokenizer=tokenizer, log=log or (lambda s: None), force=force)


def _checks(manifest) -> dict:
    return {c["name"]: c for c in manifest["parity"]["checks"]}


_BUNDLES: dict = {}


@pytest.fixture(scope="module")
def f16_bundle(tmp_path_factory, tiny_tokenizer):
    """(model, bundle folder) of a random-weight SigLIP + mlp2x_gelu model exported f16. Read-only."""
    need_llama_cpp()
    if "f16" not in _BUNDLES:
        model = gguf_model("mlp2x_gelu")
        _BUNDLES["f16"] = (model, export(model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "f16"))
    return _BUNDLES["f16"]


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "ldp", "ldpv2", "mlp2x_gelu-clip"])
def test_f16_bundle_matches_eager_through_llama_cpp(tmp_path, tiny_tokenizer, connector):
    """clip.cpp's image embeddings equal eager's within fp16 rounding for each projector it runs and for a CLIP
    tower (class token; needs the fixed llama.cpp), and llama.cpp answers with eager's greedy tokens; the manifest
    records both."""
    need_llama_cpp()
    from mobilemllm.bundle import load_manifest
    from mobilemllm.data.images import preprocess
    from mobilemllm.export import parity as P
    from mobilemllm.inference import answer
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.base import bundle_views

    connector, _, tower = connector.partition("-")
    model = gguf_model(connector, **({"vision": {}} if tower == "clip" else {}))  # {}: the tiny preset's CLIP
    out = export(model, tiny_tokenizer, tmp_path / "b")
    manifest = load_manifest(out)
    checks = _checks(manifest)
    assert manifest["format"] == "gguf" and manifest["parity"]["passed"]
    assert checks["greedy_agreement_16"]["value"] == 1.0 and checks["image_embedding_max_rel_diff"]["value"] < 5e-3
    assert manifest["graphs"]["vision_encoder"]["projector_type"] == {"mlp2x_gelu": "mlp"}.get(connector, connector)

    runner = open_runner(out).load()
    image = P.parity_image(model.config.vision)
    got = runner.engine.encode_views(bundle_views(manifest, image))
    with torch.inference_mode():
        want = model.encode_images(preprocess(image, model.config.vision).unsqueeze(0))[0]
    assert got.shape == tuple(want.shape) and P.max_rel_diff(got, want) < 5e-3 and P.logit_cosine(got, want) > 0.9999
    for question in ("What is in the image?", "What colour is the shape?"):
        ours = answer(model, tiny_tokenizer, image, question, max_new_tokens=12)
        theirs = runner.generate(image, question, max_new_tokens=12)
        assert theirs.tokens == ours.tokens and theirs.text == ours.text
    runner.close()


def test_quantized_bundles_record_llama_cpp_types_and_agreement(tmp_path, tiny_tokenizer, f16_bundle):
    """q8_0 / q4_0 / q4_k_m come from llama.cpp's quantizer: the manifest names the types the file holds and the
    logit cosine against eager (gated by the scheme) with the greedy agreement (reported)."""
    from mobilemllm import quantization as Q
    from mobilemllm.bundle import load_manifest

    model, f16 = f16_bundle
    f16_size = (f16 / "model.gguf").stat().st_size
    # llama.cpp keeps the tied output projection (token_embd) at Q8_0 or above, and K-quants fall back to 32-blocks
    # for rows narrower than 256 (all of this model's)
    for scheme, types in (("q8_0", {"Q8_0"}), ("q4_0", {"Q4_0", "Q8_0"}), ("q4_k_m", {"Q4_K", "Q5_0", "Q6_K", "Q8_0"})):
        out = export(model, tiny_tokenizer, tmp_path / scheme, scheme)
        manifest = load_manifest(out)
        q = manifest["quantization"]["text_decoder"]
        assert q["scheme"] == scheme and q["backend"] == "llama.cpp llama_model_quantize"
        assert set(q["tensor_types"]) - {"F32"} <= types and set(q["tensor_types"]) & types, q
        assert manifest["quantization"]["vision_encoder"]["scheme"] == "f16"
        assert manifest["quantization"]["token_embedding"]["tensor_type"] in types
        checks = _checks(manifest)
        assert checks["logit_cosine"]["threshold"] == Q.scheme("llamacpp", scheme).parity_cosine
        assert checks["logit_cosine"]["passed"] and checks["greedy_agreement_16"]["passed"] is None
        assert (out / "model.gguf").stat().st_size < f16_size


@pytest.fixture
def unfixed_llama_cpp(monkeypatch):
    """The class-token probe answering as llama-cpp-python 0.3.36 from PyPI does (ggml-org/llama.cpp#25814)."""
    probe.class_token_first.cache_clear()
    monkeypatch.setattr(probe, "probe_rows", lambda: probe.expected_rows(class_first=False))
    yield
    probe.class_token_first.cache_clear()


def test_class_token_probe_tells_the_graphs_apart(monkeypatch):
    """The probe's two expected outputs differ in every patch row's input (the broken graph drops patch 0 and feeds
    the class token last), and the answer follows clip.cpp's output; anything else is not taken for either."""
    right, broken = probe.expected_rows(True), probe.expected_rows(False)
    assert right.shape == broken.shape == (4, 8) and (np.abs(right - broken).min(axis=1) > 0.1).all()
    try:
        for rows, want in ((right, True), (broken, False)):
            probe.class_token_first.cache_clear()
            monkeypatch.setattr(probe, "probe_rows", lambda rows=rows: rows + 1e-3)  # fp16 rounding
            assert probe.class_token_first() is want
        probe.class_token_first.cache_clear()
        monkeypatch.setattr(probe, "probe_rows", lambda: right[::-1])
        with pytest.raises(RuntimeError, match="unexpected output"):
            probe.class_token_first()
        assert probe.clip_problem() is None  # not this issue: the parity check decides
    finally:
        probe.class_token_first.cache_clear()


def test_unfixed_llama_cpp_refuses_a_clip_tower_in_one_line(tmp_path, tiny_tokenizer, unfixed_llama_cpp, capsys):
    """Without llama.cpp's class-token fix, a CLIP-tower model is refused before anything is written, in one line
    naming the issue and the command that installs the fixed build; --force writes it with a warning. SigLIP
    towers (no class token) are not affected."""
    need_llama_cpp()
    from mobilemllm.bundle import load_manifest
    from mobilemllm.cli import main
    from mobilemllm.errors import ConfigError
    from mobilemllm.models.checkpoint import save_checkpoint
    from mobilemllm.export import parity as P
    from mobilemllm.runtime import open_runner

    model = gguf_model("mlp2x_gelu", vision={})
    with pytest.raises(ConfigError) as e:
        export(model, tiny_tokenizer, tmp_path / "b")
    msg = str(e.value)
    assert "\n" not in msg and "ggml-org/llama.cpp#25814" in msg and "python scripts/install_llama_cpp.py" in msg
    assert not (tmp_path / "b").exists()
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt")
    assert main(["export", "--target", "gguf", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "c"),
                 "--decoder-quant", "f16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "#25814" in err[0] and not (tmp_path / "c").exists()
    lines: list[str] = []
    out = export(model, tiny_tokenizer, tmp_path / "b", log=lines.append, force=True)
    assert load_manifest(out)["format"] == "gguf"
    assert any(line.startswith("warning: ") and "#25814" in line and "--force" in line for line in lines)
    siglip = export(gguf_model("mlp2x_gelu"), tiny_tokenizer, tmp_path / "siglip")  # no class token: no refusal
    # the runner still runs such a bundle, with one warning naming the issue and the fix; a SigLIP one, none
    for bundle, expected in ((out, 1), (siglip, 0)):
        notes: list[str] = []
        runner = open_runner(bundle, warn=notes.append).load()
        runner.generate(P.parity_image(model.config.vision), "What is in the image?", max_new_tokens=2)
        runner.close()
        assert len(notes) == expected, notes
        assert all("#25814" in n and "install_llama_cpp.py" in n and "\n" not in n for n in notes)


def test_install_script_patches_the_class_token_order(tmp_path):
    """scripts/install_llama_cpp.py puts the class embedding before the patches in llava.cpp (the order clip.cpp's
    inputs assume), labels the build, and refuses a source that is not the one it was written for."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "install_llama_cpp.py"
    spec = importlib.util.spec_from_file_location("install_llama_cpp", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    graph = ("    // concat class_embeddings and patch_embeddings\n    if (model.class_embedding) {\n"
             "        inp = ggml_concat(ctx0, inp, model.class_embedding, 1);\n    }\n")
    fixed = script.patch_graph(graph)
    assert "ggml_concat(ctx0, model.class_embedding, inp, 1);" in fixed and fixed.count("\n") == graph.count("\n")
    with pytest.raises(script.PatchError, match="already has the class embedding first"):
        script.patch_graph(fixed)
    with pytest.raises(script.PatchError, match="no line to patch"):
        script.patch_graph("int main() {}\n")
    assert script.patch_version('__version__ = "0.3.36"\n') == '__version__ = "0.3.36+clsfix"\n'
    assert script.LOCAL_VERSION in SpecifierSet("==0.3.36")  # the extras' pin accepts the fixed build
    (tmp_path / "llama_cpp_python-0.3.36+clsfix-py3-none-plan9_mips.whl").touch()  # another machine's
    assert script.cached_wheel(tmp_path) is None
    system = {"linux": "linux", "darwin": "macosx_11_0", "win32": "win"}.get(sys.platform, sys.platform)
    mine = tmp_path / f"llama_cpp_python-0.3.36+clsfix-py3-none-{system}_{platform.machine().lower()}.whl"
    mine.touch()
    assert script.cached_wheel(tmp_path) == mine


def test_damaged_gguf_is_one_line(tmp_path, f16_bundle):
    need_llama_cpp()
    import shutil

    from mobilemllm.bundle import BundleError
    from mobilemllm.errors import CheckpointError
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.llamacpp_engine import LlamaCppEngine

    _, bundle = f16_bundle
    mmproj = bundle / "mmproj.gguf"
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="is not a GGUF file") as e:
        LlamaCppEngine(tmp_path / "junk.gguf", mmproj, 64)
    assert "\n" not in str(e.value)
    data = (bundle / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="llama.cpp cannot load the text model") as e:
        LlamaCppEngine(tmp_path / "cut.gguf", mmproj, 64)
    assert "\n" not in str(e.value)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with open(copy / "model.gguf", "r+b") as f:
        f.seek(len(data) - 8)
        f.write(b"\xff" * 8)
    with pytest.raises(BundleError, match="model.gguf"):
        open_runner(copy)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_llama_cpp_tokenizes_like_the_bundle_tokenizer(tmp_path, tiny_tokenizer, kind):
    """llama.cpp's tokenizer, reading only the GGUF's metadata, gives our ids: the tiny byte-level BPE (gpt2) and
    a sentencepiece-style BPE with byte fallback, as MobileLLaMA's is imported (llama)."""
    need_llama_cpp()
    from mobilemllm.data.shapes import corpus_lines
    from mobilemllm.export import manifest_sections as S
    from mobilemllm.export.gguf.text import write_text_gguf
    from mobilemllm.runtime.llamacpp_engine import import_llama_cpp

    if kind == "llama":
        from test_importers import write_spm_tokenizer

        from mobilemllm.models.importers.tokenizer import load_source_tokenizer

        write_spm_tokenizer(tmp_path)
        tokenizer = load_source_tokenizer(tmp_path, "mobilevlm")
    else:
        tokenizer = tiny_tokenizer
    model = gguf_model()
    prompt = S.prompt_section(model.config, tokenizer)
    write_text_gguf(model, tokenizer, tmp_path / "m.gguf", prompt, None, "t")
    llama_cpp, _ = import_llama_cpp()
    vocab = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    lines = list(corpus_lines(num_images=100, seed=1))
    words = sorted({w for line in lines for w in line.split()})
    rng = np.random.default_rng(0)  # run-together words: where the merge order decides the ids
    texts = [s["text"] for s in prompt["segments"] if s["type"] == "text"] + lines
    texts += ["What colour is the shape? ASSISTANT:", "naïve café, 12 + 30 = 42\n", "yesAand", "notrianglebottom"]
    texts += ["".join(rng.choice(words, 3)) for _ in range(300)]
    for text in texts:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == \
            tokenizer.encode(text, add_special_tokens=False), text


@pytest.mark.slow
def test_trained_model_answers_like_eager_through_llama_cpp(tmp_path, tiny_tokenizer):
    """A tiny-like model (SigLIP tower, MobileVLM v2's ldpv2 on a 24x24 grid) trained briefly on the shapes world,
    exported with `mobilemllm export --target gguf` (f16), answers every question with eager's text through
    llama.cpp, and a follow-up continues llama.cpp's KV cache with eager's answer to the whole conversation."""
    need_llama_cpp()
    from mobilemllm.cli import main
    from mobilemllm.data.dataset import ConversationDataset, collate
    from mobilemllm.data.images import load_image, preprocess
    from mobilemllm.data.shapes import write_synthetic
    from mobilemllm.data.tokenizer import eos_ids
    from mobilemllm.inference import answer
    from mobilemllm.models.checkpoint import save_checkpoint
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.conversation import conversation_ids
    from mobilemllm.training.losses import LMObjective
    from mobilemllm.training.trainer import Trainer, TrainConfig

    tok = tiny_tokenizer
    write_synthetic(tmp_path / "data", num_images=24, seed=0, image_size=48, single_turn=True)
    model = gguf_model("ldpv2")
    data = ConversationDataset(tmp_path / "data" / "instruct.json", None, tok, model.config)
    cfg = TrainConfig(lr=3e-3, global_batch=8, micro_batch=8, max_steps=300, warmup_ratio=0.05)
    Trainer(model, LMObjective(), data, lambda s: collate(s, tok.pad_token_id), cfg, tmp_path / "run",
            progress=False).fit(resume=False)
    model.eval()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    assert main(["export", "--target", "gguf", "--model", str(tmp_path / "ckpt"), "--out", str(out),
                 "--decoder-quant", "f16"]) == 0

    runner = open_runner(out)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))[:3]  # 48 px: the encoder's size
    questions = ["What colour is the shape in the top left?", "How many shapes are there?",
                 "What shape is in the bottom right?", "Describe the image."]
    texts = set()
    for path in images:
        for q in questions:
            ours = answer(model, tok, path, q, max_new_tokens=16)
            theirs = runner.generate(path, q, max_new_tokens=16)
            assert (theirs.text, theirs.tokens) == (ours.text, ours.tokens), (path.name, q)
            texts.add(ours.text)
    assert len(texts) >= 4, texts  # trained: different answers to different questions

    chat = runner.conversation(images[0])
    first = chat.ask(questions[0], max_new_tokens=16)
    second = chat.ask(questions[1], max_new_tokens=16)
    assert second.reused_tokens > 0
    ids = conversation_ids(runner.manifest, tok, [(questions[0], first.text)], questions[1])
    pix = preprocess(load_image(images[0]), model.config.vision).unsqueeze(0)
    eager = model.generate(torch.tensor([ids]), pix, max_new_tokens=16, eos_ids=eos_ids(tok))
    assert second.tokens == eager
    runner.close()
