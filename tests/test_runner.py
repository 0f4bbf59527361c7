"""The Runner interface (mobilemllm.runtime): dispatch, preprocessing from the manifest, one result type,
sampling honoured or refused, and multi-turn conversations that equal eager generation of the same
conversation as training builds it. ONNX bundles in the fast tier; ExecuTorch's MultimodalRunner in the
slow tier (it needs an exported .pte)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest_apps import app_bundle  # noqa: F401  (fixture)
from conftest_runner import eager_conversation_ids, eager_greedy, onnx_chat  # noqa: F401  (fixture)

from mobilemllm.errors import BackendUnavailable, UserError

pytest.importorskip("onnxruntime")

Q1, Q2, Q3 = "Is there a red square?", "What colour is it?", "Where is the circle?"
# first questions for the cache test: it needs one whose answer re-tokenizes to the tokens generated
FIRST_QUESTIONS = (Q1, Q3, "How many shapes are there?", "What shape is in the top left?", "Is there a circle?",
                   "What colour is the shape in the bottom right?", "Describe the image.")


def continues_cache(runner, image, question: str, first) -> bool:
    """Whether the follow-up prompt rebuilt from ``first.text`` starts with the tokens the first turn left in
    the cache (its prompt and every generated token but the last): only then can the cache be continued."""
    from mobilemllm.runtime.conversation import conversation_ids

    cached = conversation_ids(runner.manifest, runner.tokenizer, [], question) + first.tokens[:-1]
    follow = runner.conversation(image, history=[(question, first.text)]).prompt_ids(Q2)
    return follow[:len(cached)] == cached


@pytest.fixture(scope="module")
def runner(onnx_chat):
    from mobilemllm.runtime import open_runner

    return open_runner(onnx_chat.bundle).load()


# ---- the interface -------------------------------------------------------------------------------------
def test_open_runner_dispatches_on_the_manifest_format(onnx_chat, tmp_path):
    from mobilemllm.runtime import RUNNERS, Runner, open_runner
    from mobilemllm.runtime.onnx_runner import OnnxBundleRunner

    assert {"executorch", "onnx", "coreml"} <= set(RUNNERS)
    r = open_runner(onnx_chat.bundle, providers=["CPUExecutionProvider"], threads=1)
    assert isinstance(r, OnnxBundleRunner) and isinstance(r, Runner) and not r.loaded
    assert r.load().engine.providers == ["CPUExecutionProvider"] and "ONNX Runtime" in r.describe()
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        open_runner(onnx_chat.bundle, providers=["NoSuchExecutionProvider"]).load()
    with pytest.raises(UserError, match="no manifest.json"):
        open_runner(tmp_path)


def test_options_that_do_not_apply_are_refused(onnx_chat):
    from mobilemllm.runtime import open_runner

    with pytest.raises(UserError, match="option\\(s\\) colour do not apply to onnx bundles"):
        open_runner(onnx_chat.bundle, colour="red")


def test_one_turn_equals_eager_generation(runner, onnx_chat):
    from mobilemllm.inference import answer

    pieces: list[str] = []
    got = runner.generate(onnx_chat.image, Q1, max_new_tokens=12, on_text=pieces.append)
    want = answer(onnx_chat.model, onnx_chat.tokenizer, onnx_chat.image, Q1, max_new_tokens=12)
    assert len(set(want.tokens)) > 1, "the test model must produce varied tokens for this check to mean something"
    assert got.tokens == want.tokens and got.text == want.text and "".join(pieces) == got.text
    assert got.prompt_tokens == want.prompt_tokens == got.prefilled_tokens and got.reused_tokens == 0
    assert got.generated_tokens == len(got.tokens) and got.finish_reason in ("stop", "length")
    assert got.ttft_s > 0 and got.prefill_tokens_per_s > 0 and got.decode_tokens_per_s > 0
    assert got.context_tokens == got.prompt_tokens + got.generated_tokens - 1


def test_preprocessing_reads_the_manifest_as_the_apps_do(onnx_chat):
    from PIL import Image

    from mobilemllm.bundle import load_manifest
    from mobilemllm.bundle.app_inputs import image_views, pixels_of
    from mobilemllm.runtime import bundle_views

    manifest = load_manifest(onnx_chat.bundle)
    img = Image.open(onnx_chat.wide_image).convert("RGB")
    assert np.array_equal(bundle_views(manifest, img), image_views(pixels_of(img), manifest["preprocessing"]))
    tiles = json.loads(json.dumps(manifest))
    tiles["preprocessing"].update(hires="tiles", tile_grid=[1, 2])
    assert np.array_equal(bundle_views(tiles, img), image_views(pixels_of(img), tiles["preprocessing"]))
    other = json.loads(json.dumps(manifest))
    other["preprocessing"]["pad_color"] = [0, 255, 0]  # only the manifest decides (not the model config)
    assert not np.array_equal(bundle_views(other, img), bundle_views(manifest, img))
    assert np.array_equal(bundle_views(other, img), image_views(pixels_of(img), other["preprocessing"]))


def test_a_resized_image_is_noted(onnx_chat):
    from mobilemllm.runtime import open_runner

    notes: list[str] = []
    open_runner(onnx_chat.bundle, warn=notes.append).conversation(onnx_chat.wide_image)
    assert len(notes) == 1 and "48x40; padded to square and resized to 32x32" in notes[0]


# ---- multi-turn ----------------------------------------------------------------------------------------
def test_follow_up_continues_the_cache_and_equals_eager_two_turn_generation(runner, onnx_chat, tmp_path):
    """A follow-up equals eager generation of the two-turn prompt, and prefills only what the cache lacks when
    the first answer re-tokenizes to its own tokens (a random model's stray byte tokens may not: then the
    whole prompt is prefilled, and the answer is still eager's)."""
    seen = {}
    for q in FIRST_QUESTIONS:
        runner.reset()
        conv = runner.conversation(onnx_chat.image)
        first = conv.ask(q, max_new_tokens=8)
        second = conv.ask(Q2, max_new_tokens=10)
        ids = eager_conversation_ids(onnx_chat.model, onnx_chat.tokenizer, tmp_path, onnx_chat.image,
                                     [(q, first.text)], Q2)
        tokens, text = eager_greedy(onnx_chat.model, onnx_chat.tokenizer, onnx_chat.image, ids, 10)
        assert second.tokens == tokens and second.text == text
        # the runner's two-turn prompt is the training record's, token for token
        assert runner.conversation(onnx_chat.image, history=[(q, first.text)]).prompt_ids(Q2) == ids
        assert second.prompt_tokens == len(ids)
        assert conv.turns == [(q, first.text), (Q2, second.text)]
        if continues_cache(runner, onnx_chat.image, q, first):
            # the follow-up prefilled only what the cache lacked: the end of the first answer and the new turn
            assert second.reused_tokens == first.context_tokens and second.prefilled_tokens < 20
            seen["continued"] = (q, first, second)
        else:
            assert second.reused_tokens == 0 and second.prefilled_tokens == second.prompt_tokens
        if "continued" in seen:
            break
    assert "continued" in seen, "no first answer re-tokenizes to itself; add questions to FIRST_QUESTIONS"
    q, first, second = seen["continued"]
    # the same conversation from scratch (an empty cache) gives the same answer
    runner.reset()
    again = runner.conversation(onnx_chat.image, history=[(q, first.text)]).ask(Q2, max_new_tokens=10)
    assert again.tokens == second.tokens and again.prefilled_tokens == again.prompt_tokens


def test_follow_ups_come_from_the_manifest(runner, onnx_chat):
    """prompt.follow_up (what the apps read) gives the template's two-turn ids; a bundle without it falls
    back to its template; a template without chat turns refuses follow-ups."""
    from mobilemllm.runtime.conversation import conversation_ids

    manifest, tok = runner.manifest, runner.tokenizer
    assert manifest["prompt"]["follow_up"]["segments"]
    turns = [(Q1, "a red square")]
    ids = conversation_ids(manifest, tok, turns, Q2)
    old = json.loads(json.dumps(manifest))
    del old["prompt"]["follow_up"]
    assert conversation_ids(old, tok, turns, Q2) == ids
    edited = json.loads(json.dumps(manifest))
    edited["prompt"]["follow_up"]["segments"][0]["text"] += " Briefly:"
    assert conversation_ids(edited, tok, turns, Q2) != ids
    edited["prompt"]["follow_up"] = None
    with pytest.raises(UserError, match="has no chat turns"):
        conversation_ids(edited, tok, turns, Q2)
    assert conversation_ids(edited, tok, [], Q2) == conversation_ids(manifest, tok, [], Q2)


def test_a_third_turn_equals_eager(runner, onnx_chat, tmp_path):
    conv = runner.conversation(onnx_chat.image)
    turns = []
    for q in (Q1, Q2):
        turns.append((q, conv.ask(q, max_new_tokens=6).text))
    third = conv.ask(Q3, max_new_tokens=8)
    ids = eager_conversation_ids(onnx_chat.model, onnx_chat.tokenizer, tmp_path, onnx_chat.image, turns, Q3)
    assert (third.tokens, third.text) == eager_greedy(onnx_chat.model, onnx_chat.tokenizer, onnx_chat.image, ids, 8)


def test_conversations_about_other_images_do_not_mix(runner, onnx_chat):
    a = runner.conversation(onnx_chat.image)
    b = runner.conversation(onnx_chat.wide_image)
    a1 = a.ask(Q1, max_new_tokens=6)
    b1 = b.ask(Q1, max_new_tokens=6)  # a new image: a new cache
    assert b1.reused_tokens == 0
    a2 = a.ask(Q2, max_new_tokens=6)  # back to the first image: its whole conversation again
    assert a2.reused_tokens == 0
    alone = runner.conversation(onnx_chat.image)
    assert alone.ask(Q1, max_new_tokens=6).tokens == a1.tokens
    assert alone.ask(Q2, max_new_tokens=6).tokens == a2.tokens


def test_a_full_context_is_one_clear_error(runner, onnx_chat):
    from mobilemllm.runtime import ContextFull

    conv = runner.conversation(onnx_chat.image)
    first = conv.ask(Q1, max_new_tokens=4)
    with pytest.raises(ContextFull, match=r"conversation is \d+ tokens .* context is 256; start a new conversation"):
        conv.ask("describe the shapes " * 80, max_new_tokens=4)
    assert conv.turns == [(Q1, first.text)]  # the refused turn left the conversation as it was
    # an answer that would run past the context stops at it: finish_reason "length", never garbage
    long_q = next(q for q in ("describe the shapes " * k for k in range(1, 80)) if len(conv.prompt_ids(q)) > 230)
    n = len(conv.prompt_ids(long_q))
    assert n < 256
    res = conv.ask(long_q, max_new_tokens=500)
    assert res.prompt_tokens == n and res.generated_tokens <= 256 - n
    assert res.finish_reason == "stop" or res.context_tokens == 255
    conv.reset()
    assert conv.ask(Q1, max_new_tokens=4).tokens == first.tokens


# ---- sampling -----------------------------------------------------------------------------------------
def test_sampling_parameters_are_honoured(runner, onnx_chat):
    greedy = runner.generate(onnx_chat.image, Q1, max_new_tokens=12)
    short = runner.generate(onnx_chat.image, Q1, max_new_tokens=3)
    assert short.tokens == greedy.tokens[:3] and short.finish_reason == "length"
    a = runner.generate(onnx_chat.image, Q1, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
    b = runner.generate(onnx_chat.image, Q1, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
    c = runner.generate(onnx_chat.image, Q1, max_new_tokens=12, temperature=1.5, top_p=0.95, seed=4)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    cut = greedy.text[4:7]
    pieces: list[str] = []
    stopped = runner.generate(onnx_chat.image, Q1, max_new_tokens=12, stop=[cut], on_text=pieces.append)
    assert stopped.text == greedy.text[:greedy.text.index(cut)].strip() and stopped.finish_reason == "stop"
    assert "".join(pieces) == stopped.text and cut not in stopped.text


@pytest.mark.parametrize("kw, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"temperature": -1}, "temperature must be a number"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"stop": [""]}, "stop must be up to 8 non-empty strings"),
    ({"top_k": 5}, "unknown sampling parameter"),
])
def test_bad_sampling_parameters(runner, onnx_chat, kw, message):
    with pytest.raises(UserError, match=message):
        runner.generate(onnx_chat.image, Q1, **kw)


def test_executorch_refuses_what_its_sampler_cannot_do():
    from mobilemllm.runtime import Sampling
    from mobilemllm.runtime.executorch_runner import ExecuTorchRunner

    et = object.__new__(ExecuTorchRunner)  # check_sampling reads nothing of the bundle
    et.check_sampling(Sampling.of(temperature=0.0, seed=1, top_p=0.5))  # greedy: nothing to refuse
    et.check_sampling(Sampling.of(temperature=0.8, top_p=0.9))
    with pytest.raises(UserError, match="cannot take a seed"):
        et.check_sampling(Sampling.of(temperature=0.8, seed=1))
    with pytest.raises(UserError, match="samples with top_p 0.9 and cannot use top_p 0.5"):
        et.check_sampling(Sampling.of(temperature=0.8, top_p=0.5))


def test_text_stream_holds_back_what_may_change():
    from mobilemllm.runtime import TextStream

    out: list[str] = []
    s = TextStream(out.append, stop=["END"])
    steps = [" The", " The red ", " The red E", " The red \ufffd", " The red é", " The red é EN", " The red é ENDx"]
    for decoded in steps:
        if s.update(decoded):
            break
    assert "".join(out) == s.finish(" The red é ENDx") == "The red é"
    assert all(piece and "\ufffd" not in piece for piece in out)
    plain = TextStream(out.clear() or out.append)
    plain.update(" a ")
    assert plain.finish(" a b ") == "a b" == "".join(out)


# ---- the CLI -------------------------------------------------------------------------------------------
def test_generate_cli_passes_every_sampling_option_to_the_bundle(onnx_chat, capsys, runner):
    from mobilemllm.cli import main

    args = ["generate", "--bundle", str(onnx_chat.bundle), "--image", str(onnx_chat.image), "--prompt", Q1,
            "--max-new-tokens", "10", "--temperature", "1.5", "--top-p", "0.9"]
    outs = []
    for seed in ("5", "6"):
        assert main(args + ["--seed", seed]) == 0
        captured = capsys.readouterr()
        outs.append(captured.out.strip())
        assert "prompt tokens" in captured.err and "ONNX Runtime" in captured.err
    want = runner.generate(onnx_chat.image, Q1, max_new_tokens=10, temperature=1.5, top_p=0.9, seed=5).text
    assert outs[0] == want and outs[0] != outs[1]  # the seed and top_p reach the runner
    greedy = runner.generate(onnx_chat.image, Q1, max_new_tokens=10).text
    cut = greedy[3:6]
    assert main(["generate", "--bundle", str(onnx_chat.bundle), "--image", str(onnx_chat.image), "--prompt", Q1,
                 "--max-new-tokens", "10", "--stop", cut]) == 0
    assert capsys.readouterr().out.strip() == greedy[:greedy.index(cut)].strip()


def test_generate_cli_refuses_bundle_options_for_eager(tiny_checkpoint, shapes_image, capsys):
    from mobilemllm.cli import main

    code = main(["generate", "--model", str(tiny_checkpoint), "--image", str(shapes_image), "--prompt", "hi",
                 "--stop", "x"])
    assert code == 2 and "--stop applies to bundles" in capsys.readouterr().err


def test_a_damaged_bundle_is_refused_before_running(onnx_chat, tmp_path):
    from mobilemllm.bundle import BundleError
    from mobilemllm.runtime import open_runner

    broken = tmp_path / "b"
    shutil.copytree(onnx_chat.bundle, broken)
    (broken / "decoder.onnx").write_bytes(b"junk")
    with pytest.raises(BundleError, match="decoder.onnx is .* bytes"):
        open_runner(broken)


def test_evaluate_bundle_equals_eager_evaluation(onnx_chat, tmp_path, capsys):
    """`mobilemllm eval --bundle` answers through the runner: the same report as eager evaluation of the model
    the fp32 bundle came from."""
    from mobilemllm.cli import main
    from mobilemllm.data.shapes import write_synthetic
    from mobilemllm.evaluation import evaluate, evaluate_bundle

    data = tmp_path / "eval"
    write_synthetic(data, num_images=4, seed=1)
    eager = evaluate(onnx_chat.model, onnx_chat.tokenizer, data, limit=4, caption_tokens=12)
    got = evaluate_bundle(onnx_chat.bundle, data, limit=4, caption_tokens=12)
    for report in (eager, got):
        report.pop("eval_s")
    assert got == eager and got["vqa"]["n"] == 4 and got["captions"]["examples"]
    assert main(["eval", "--bundle", str(onnx_chat.bundle), "--data", str(data), "--limit", "2"]) == 0
    assert '"vqa"' in capsys.readouterr().out
    assert main(["eval", "--data", str(data)]) == 2
    assert "give at least one --model" in capsys.readouterr().err


# ---- ExecuTorch's MultimodalRunner (slow: an exported .pte) ------------------------------------------------
@pytest.mark.slow
def test_executorch_follow_up_equals_eager_two_turn_generation(app_bundle, tiny_checkpoint, shapes_image, tmp_path):
    from mobilemllm.api import load
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.executorch_runner import ExecuTorchRunner

    model, tok = load(tiny_checkpoint)
    runner = open_runner(app_bundle)
    assert isinstance(runner, ExecuTorchRunner)
    conv = runner.conversation(shapes_image)
    first = conv.ask(Q1, max_new_tokens=8)
    second = conv.ask(Q2, max_new_tokens=10)
    ids = eager_conversation_ids(model, tok, tmp_path, shapes_image, [(Q1, first.text)], Q2)
    assert (second.tokens, second.text) == eager_greedy(model, tok, shapes_image, ids, 10)
    assert second.prompt_tokens == len(ids)
    runner.reset()  # and from an empty cache (the image prefilled again through the C++ runner)
    again = runner.conversation(shapes_image, history=[(Q1, first.text)]).ask(Q2, max_new_tokens=10)
    assert again.tokens == second.tokens and again.prefilled_tokens == again.prompt_tokens


@pytest.mark.slow
def test_executorch_full_context_and_refused_seed(app_bundle, shapes_image, capsys):
    from mobilemllm.cli import main
    from mobilemllm.runtime import ContextFull, open_runner

    conv = open_runner(app_bundle).conversation(shapes_image)
    conv.ask(Q1, max_new_tokens=4)
    with pytest.raises(ContextFull, match="start a new conversation"):
        conv.ask("describe the shapes " * 80, max_new_tokens=4)
    assert len(conv.ask(Q2, max_new_tokens=4).tokens) >= 1  # the runner is still usable
    code = main(["generate", "--bundle", str(app_bundle), "--image", str(shapes_image), "--prompt", Q1,
                 "--temperature", "0.7", "--seed", "3"])
    assert code == 2 and "cannot take a seed" in capsys.readouterr().err
