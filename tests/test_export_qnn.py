"""android-qnn (ExecuTorch's Qualcomm QNN delegate): what runs without the QNN SDK.

Tested here: the recipe, SoC / HTP compile specs and partitioners, preflight errors, the static-shape
decoder against our LLaMA, QNN PT2E quantization (QnnQuantizer, calibrated, converted) of the decoder and
the vision encoder against eager, and the whole export up to the lowering, which needs the SDK's HTP
library (checked: without it the QnnManager cannot start), and the decoder design against ExecuTorch's
C++ MultimodalRunner contract in a portable (no delegate) program. Lowering and running need the QNN SDK.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_tiny_config, make_tiny_model
from conftest_runner import mute_stray_bytes
from mobilemllm.errors import BackendUnavailable, ConfigError


@pytest.fixture(autouse=True)
def _no_sdk_download(monkeypatch):
    """Any attempt of ExecuTorch's setup_qnn_sdk() to download the SDK fails the test (never downloads)."""
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    def refuse():
        raise AssertionError("ExecuTorch tried to download the QNN SDK")

    monkeypatch.setattr(qnn_sdk_setup, "_install_qnn_sdk", refuse)
    monkeypatch.setattr(qnn_sdk_setup, "_sdk_ready", False)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)


def _model(seed=0, scale=0.08):
    model = make_tiny_model(make_tiny_config(), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights than the default init: clear logits, errors show
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


# ---- recipe, SoC, specs ---------------------------------------------------------------------------
def test_recipe_loads_with_qnn_schemes_and_bad_ones_are_refused(tmp_path):
    from mobilemllm.export import qnn as Q
    from mobilemllm.export.pipeline import check_recipe
    from mobilemllm.export.recipes import load_recipe

    rec = load_recipe("android-qnn")
    assert rec["backend"] == "qnn" and rec["soc_model"] == "SM8650"
    assert Q.part_schemes(rec) == {"text_decoder": "16a4w", "vision_encoder": "8a8w"}
    assert rec["quantization"]["token_embedding"]["scheme"] == "embedding4"
    assert check_recipe(rec)[1] == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: executorch\nbackend: qnn\nquantization:\n  text_decoder: {scheme: 8da4w}\n")
    with pytest.raises(ConfigError, match="not a QNN scheme.*16a4w"):
        load_recipe(path=bad)
    bad.write_text("format: executorch\nbackend: qnn\nsoc_model: SM9999\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path=bad)
    assert "SM9999" in str(e.value) and "SM8650" in str(e.value) and "\n" not in str(e.value)


def test_soc_and_compile_specs():
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.partition.utils import generate_qnn_executorch_option
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset, QnnExecuTorchHtpPrecision
    from executorch.backends.qualcomm.serialization.qc_schema_serialize import flatbuffer_to_option
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from mobilemllm.export import qnn as Q

    assert Q.soc_chipset(None) == QcomChipset.SM8650 and Q.soc_chipset("sm8750") == QcomChipset.SM8750
    assert {"SM8450", "SM8550", "SM8650", "SM8750"} <= set(Q.htp_socs())
    with pytest.raises(ConfigError, match="unknown QNN soc_model 'SM1'; valid: .*SM8650"):
        Q.soc_chipset("SM1")

    def options(specs):
        return flatbuffer_to_option(generate_qnn_executorch_option(specs))

    rec = {"backend": "qnn", "soc_model": "SM8550",
           "quantization": {"text_decoder": {"scheme": "16a4w"}, "vision_encoder": {"scheme": "fp16"}}}
    specs = Q.method_compile_specs(rec)
    dec, vis = options(specs["text_decoder"]), options(specs["vision_encoder"])
    assert dec.soc_info.soc_model == QcomChipset.SM8550
    assert dec.backend_options.htp_options.precision == QnnExecuTorchHtpPrecision.kHtpQuantized
    assert vis.backend_options.htp_options.precision == QnnExecuTorchHtpPrecision.kHtpFp16
    parts = Q.qnn_partitioners(rec)
    assert [type(p[0]) for p in (parts["vision_encoder"], parts["text_decoder"], parts["token_embedding"])] == [
        QnnPartitioner, QnnPartitioner, XnnpackPartitioner]
    assert options(parts["text_decoder"][0].compiler_specs_snapshot).soc_info.soc_model == QcomChipset.SM8550


# ---- preflight ------------------------------------------------------------------------------------
def test_preflight_errors(tmp_path, monkeypatch):
    from mobilemllm.export.pipeline import preflight
    from mobilemllm.export.recipes import load_recipe

    rec = load_recipe("android-qnn")
    cases = [(None, "QNN_SDK_ROOT is not set"), (str(tmp_path / "nope"), "which does not exist"),
             (str(tmp_path), "has no lib/x86_64-linux-clang/libQnnHtp.so")]
    for root, why in cases:
        if root is None:
            monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
        else:
            monkeypatch.setenv("QNN_SDK_ROOT", root)
        with pytest.raises(BackendUnavailable) as e:
            preflight(rec)
        assert why in str(e.value) and "\n" not in str(e.value) and "--target android" in str(e.value)
    # the SDK's layout is all preflight asks for (the library is loaded only by the lowering)
    lib = tmp_path / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert preflight(rec).name == "executorch"
    with pytest.raises(ConfigError, match="soc_model"):
        preflight({**rec, "soc_model": "SM0000"})


# ---- the static decoder ---------------------------------------------------------------------------
def test_static_decoder_matches_llama_and_only_the_padding_sees_the_length():
    from torch.export import Dim, export

    from mobilemllm.export import qnn as Q

    model = _model()
    cfg = model.config.llm
    dec = Q.build_decoder(model, 64, 16)
    emb = torch.randn(1, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb).logits[0]
        pos = 0
        for n, last in zip([8, 1, 1, 2], (7, 8, 9, 11)):  # segments, then decode steps, as the runner calls
            torch.testing.assert_close(dec(emb[:, pos:pos + n], torch.tensor([pos]))[0], ref[last],
                                       atol=1e-4, rtol=1e-4)
            pos += n
    with pytest.raises(ConfigError, match="prefill length"):
        Q.build_decoder(model, 64, 65)
    dec.core.reset_cache()
    ep = export(dec, (torch.zeros(1, 4, cfg.hidden_size), torch.tensor([0])),
                dynamic_shapes=({1: Dim("seq", min=1, max=16)}, None), strict=True)
    symbolic = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                and any(isinstance(d, torch.SymInt) for d in getattr(n.meta.get("val"), "shape", ()))}
    assert symbolic == {"aten.ones.default"}  # the valid-row mask's ones(T); everything else is static
    assert sorted(ep.run_decompositions({}).graph_signature.buffers_to_mutate.values()) == sorted(
        f"core.inner.layers.{i}.{kv}_cache" for i in range(cfg.num_layers) for kv in "kv")


# ---- PT2E quantization ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tok():
    from mobilemllm.data.tokenizer import tiny_tokenizer

    return tiny_tokenizer(vocab_size=make_tiny_config().llm.vocab_size, seed=0, num_images=60)


def _compare(model, tok, float_core, quant_core, prefill_len):
    """Logit cosines and argmax agreement on a prompt and image the calibration did not see."""
    from mobilemllm.export import qnn as Q
    from mobilemllm.export.parity import logit_cosine

    img = Q.calibration_images(model, 4)[3:]
    calls = Q.decoder_calibration_inputs(model, tok, prefill_len, img, ["Is there a red square?"], 12)
    float_core.reset_cache()
    with torch.no_grad():
        for name, buf in quant_core.named_buffers():
            if name.endswith("_cache"):
                buf.zero_()
        pairs = [(float_core(*c), quant_core(*c)) for c in calls]
    cos = [logit_cosine(q, f) for f, q in pairs]
    agree = sum(int(f.argmax() == q.argmax()) for f, q in pairs) / len(pairs)
    return cos, agree, len(pairs)


@pytest.mark.parametrize("scheme", ["16a16w", "16a4w"])
def test_decoder_quantization_stays_close_to_eager(scheme, tiny_tok):
    from torch.export import Dim, export

    from mobilemllm.export import qnn as Q

    model = _model()
    p = 32
    dec = Q.build_decoder(model, 128, p)
    qdec = Q.quantize_decoder(model, tiny_tok, dec, scheme, "SM8650", steps=6)
    assert os.environ.get("QNN_SDK_ROOT") is None  # restored after quantization
    qnodes = [n for n in qdec.core.graph.nodes if "quantize_per" in str(n.target)]
    assert len(qnodes) > 50  # a quantized graph, not the float one
    cos, agree, n = _compare(model, tiny_tok, dec.core, qdec.core, p)
    assert n == 15
    if scheme == "16a16w":  # 16-bit weights and activations: only rounding (measured: min cosine 0.99998)
        assert min(cos) > 0.999 and agree == 1.0
    else:  # 4-bit per-channel weights, random weights (measured: min 0.938, mean 0.967, 14/15 argmax)
        assert min(cos) > 0.85 and sum(cos) / n > 0.93 and agree >= 0.8
    # the quantized core inside the runner-facing method, exported with a dynamic length: the cache is state
    ep = export(qdec, (torch.zeros(1, 4, model.config.llm.hidden_size), torch.tensor([0])),
                dynamic_shapes=({1: Dim("seq", min=1, max=p)}, None), strict=True)
    assert len(ep.run_decompositions({}).graph_signature.buffers_to_mutate) == 2 * model.config.llm.num_layers
    emb = torch.randn(1, 9, model.config.llm.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.05
    with torch.no_grad():
        for name, buf in qdec.core.named_buffers():
            if name.endswith("_cache"):
                buf.zero_()
        want = [qdec(emb[:, :8], torch.tensor([0])), qdec(emb[:, 8:], torch.tensor([8]))]
        m = ep.module()
        got = [m(emb[:, :8], torch.tensor([0])), m(emb[:, 8:], torch.tensor([8]))]  # decode uses the prefill's cache
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_vision_quantization_8a8w_stays_close_to_eager():
    from mobilemllm.export import qnn as Q
    from mobilemllm.export.modules import VisionEncoder
    from mobilemllm.export.parity import logit_cosine

    model = make_tiny_model(seed=0)
    vis = VisionEncoder(model).eval()
    qvis = Q.quantize_vision(model, vis, "8a8w", None)
    assert any("quantize_per" in str(n.target) for n in qvis.graph.nodes)
    with torch.no_grad():
        for img in Q.calibration_images(model, 6)[4:]:  # images the calibration did not see
            assert logit_cosine(qvis(img), vis(img)) > 0.99  # measured 0.998 / 0.9984


def test_quantization_neither_downloads_nor_aborts_without_an_sdk(tmp_path, monkeypatch):
    """Unset, and a folder without the libraries (there ExecuTorch's RecomposeHadamard pass would ask the
    missing library for its version, which aborts the process): quantization runs, the variable is restored."""
    from mobilemllm.export import qnn as Q

    mod = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    xs = [(torch.randn(2, 16, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    for root in (None, str(tmp_path)):
        if root is None:
            monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
        else:
            monkeypatch.setenv("QNN_SDK_ROOT", root)
        q = Q.quantize_for_qnn(mod, xs[0], xs, "8a8w")
        assert os.environ.get("QNN_SDK_ROOT") == root
        with torch.no_grad():
            assert torch.nn.functional.cosine_similarity(q(*xs[1]).flatten(), mod(*xs[1]).flatten(), 0) > 0.99
    with pytest.raises(ConfigError, match="QNN quantization scheme"):
        Q.make_quantizer("8da4w")


# ---- lowering needs the SDK -----------------------------------------------------------------------
def test_lowering_needs_the_sdk_library(monkeypatch):
    from executorch.backends.qualcomm.utils.qnn_manager_lifecycle import QnnManagerContext

    from mobilemllm.export import qnn as Q

    rec = {"backend": "qnn"}
    monkeypatch.setenv("QNN_SDK_ROOT", "")  # "left to the caller": no download, and no library on this machine
    with pytest.raises(RuntimeError, match="Failed to initialize QNN backend"):
        with QnnManagerContext(Q.method_compile_specs(rec)):
            pass
    with pytest.raises(BackendUnavailable, match="QNN lowering needs the QNN SDK"):
        Q.lower_qnn({}, {}, rec)


def test_qnn_export_runs_up_to_the_lowering(tmp_path, monkeypatch):
    """The whole android-qnn export (QNN modules, PT2E quantization, torch.export of every method) runs
    here; the lowering then stops with BackendUnavailable, and no bundle is written."""
    from mobilemllm.data.tokenizer import tiny_tokenizer
    from mobilemllm.export.executorch_backends import Qnn
    from mobilemllm.export.pipeline import export_bundle
    from mobilemllm.export.recipes import load_recipe

    seen = {}
    real_lower = Qnn.lower

    def spy_lower(self, programs, constants, recipe):
        seen["programs"], seen["constants"] = programs, constants
        return real_lower(self, programs, constants, recipe)

    monkeypatch.setattr(Qnn, "require", lambda self, recipe: None)  # no SDK here: go past the check
    monkeypatch.setattr(Qnn, "lower", spy_lower)
    model = make_tiny_model(seed=0)
    tok = tiny_tokenizer(vocab_size=model.config.llm.vocab_size, seed=0, num_images=60)
    rec = {**load_recipe("android-qnn"), "max_context_len": 64, "calibration_steps": 2}
    logs = []
    with pytest.raises(BackendUnavailable, match="QNN_SDK_ROOT is not set"):
        export_bundle(model, rec, tmp_path / "b", tokenizer=tok, log=logs.append)
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    assert any("QNN PT2E quantization: vision 8a8w, decoder 16a4w (SoC SM8650, prefill length 64)" in x
               for x in logs)
    progs, consts = seen["programs"], seen["constants"]
    assert set(progs) == {"vision_encoder", "token_embedding", "text_decoder"}
    assert consts["get_max_seq_len"] == 64 and consts["get_max_context_len"] == 64
    dec = progs["text_decoder"]
    assert any("quantize_per" in str(n.target) for n in dec.graph.nodes)
    assert any("quantize_per" in str(n.target) for n in progs["vision_encoder"].graph.nodes)


# ---- the runner contract, without the SDK: the QNN decoder in a portable (no delegate) program -------
def test_qnn_decoder_design_runs_in_multimodal_runner_like_eager(tmp_path, tiny_tok):
    """What the QNN lowering would receive (QnnRunnerDecoder: a prompt segment of T <= P rows padded to a
    static P in the graph, the KV cache in mutable buffers; float, then its 16a16w PT2E-converted core),
    exported like android-qnn and lowered like ``portable`` (no delegate), run by ExecuTorch's C++
    MultimodalRunner (segment-sized prefill calls, then one-token decode calls): its greedy tokens equal
    eager ``model.generate``'s for a fixed image and prompt."""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner

    from mobilemllm.data.images import normalize, to_uint8_views
    from mobilemllm.export import executorch as E
    from mobilemllm.export import manifest_sections as S
    from mobilemllm.export import qnn as Q
    from mobilemllm.export.parity import scene_image
    from mobilemllm.inference import prompt_ids
    from mobilemllm.runtime.executorch_runner import _inputs, _quiet_stdout, image_tensor, load_kernels
    from mobilemllm.runtime.piece_tokenizer import PieceDecoder, decode_only_tokenizer_dir, token_bytes

    # clear winners (0.08 weights repeat one token), and only ids the test tokenizer has text for
    model = mute_stray_bytes(_model(0, scale=0.3), tiny_tok)
    cfg = model.config
    question, n_new = "What shape is in the image?", 12
    rec = {"backend": "qnn", "max_context_len": 96, "max_seq_len": 32}
    ctx, seq = E.context_lengths(model, rec)
    assert (ctx, seq) == (96, 32)
    views = torch.from_numpy(to_uint8_views(scene_image(cfg), cfg.vision))
    ids = prompt_ids(cfg, tiny_tok, question)
    with torch.no_grad():
        eager = model.generate(torch.tensor([ids]), normalize(views, cfg.vision).unsqueeze(0),
                               max_new_tokens=n_new, eos_ids=[tiny_tok.eos_token_id])
    assert len(eager) == n_new and len(set(eager)) >= 8, eager  # no early EOS, and not one token repeated
    tbytes = token_bytes(tiny_tok)
    want = [tbytes[t] or b"" for t in eager]
    load_kernels()
    pieces_dir = decode_only_tokenizer_dir(tiny_tok, f"qnn-runner-test-{len(tiny_tok)}")
    for variant in ("float", "16a16w"):
        modules = E.build_modules(model, ctx, backend="qnn", max_seq_len=seq)
        decoder = modules["text_decoder"]
        assert isinstance(decoder, Q.QnnRunnerDecoder) and decoder.prefill_len == seq
        if variant != "float":
            modules["text_decoder"] = Q.quantize_decoder(model, tiny_tok, decoder, variant, None, steps=4)
        programs = E.export_programs(model, modules, seq)
        constants = E.constant_methods(model, tiny_tok, ctx, seq)
        et = E.lower(programs, constants, "portable", rec)
        summary = E.delegation_summary(et)
        assert all(s["delegate_calls"] == 0 for s in summary.values())
        pte = tmp_path / f"{variant}.pte"
        pte.write_bytes(et.buffer)
        sections = E.manifest_sections(cfg, rec, summary, constants)
        manifest = {**sections, "tokenizer": S.tokenizer_section(tiny_tok, cfg.llm.vocab_size),
                    "prompt": S.prompt_section(cfg, tiny_tok),
                    "preprocessing": {**S.preprocessing_section(cfg.vision), **sections["preprocessing"]}}
        got, stats = [], {}
        decode = PieceDecoder(lambda b: None)
        with _quiet_stdout():
            runner = MultimodalRunner(str(pte), str(pieces_dir))
            runner.generate(_inputs(manifest, tiny_tok, image_tensor(manifest, views), question),
                            GenerationConfig(echo=False, max_new_tokens=n_new, temperature=0.0, num_bos=0,
                                             num_eos=0, seq_len=ctx),
                            lambda piece: got.append(b"".join(bytes.fromhex(h) for h in
                                                              decode._ENVELOPE.findall(piece))),
                            lambda s: stats.update(json.loads(s.to_json_string())))
        assert int(stats["prompt_tokens"]) == len(ids), variant
        assert got == want, (variant, got, want)
