"""The apps' calls into ExecuTorch, made by the apps' own code and replayed through the real runtime.

android_demo: ``ChatSession.kt`` (with Manifest.kt, BundleStore.kt, BundleInputs.kt) is compiled with kotlinc
and run on a JVM over ``PipeLlm``, a stand-in for ``LlmModule`` that hands every call, with its exact
arguments, to this test. The test applies the rules ExecuTorch's Android layer applies (quoted below from
its source) and runs each call on ExecuTorch's C++ ``MultimodalRunner`` through its Python bindings, the
way ``jni_layer_llama.cpp`` does. The answers must equal ``mobilemllm generate --bundle`` (first turn) and
mobilemllm's Python runner (follow-ups), and the follow-up text must tokenize to the ids training builds
for a two-turn conversation.

ios_demo: no Swift toolchain here. Its conversation logic follows ``mobilemllm.bundle.app_inputs.AppChat``
(as ChatSession.kt does; the Kotlin is checked against it below), so the iOS calls are generated from that
spec, checked by the rules of ExecuTorch's Objective-C ``ExecuTorchLLMMultimodalRunner`` and replayed the way
it calls the C++ runner; the Swift sources are checked for the same calls with tree-sitter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest_apps import export_tiny_bundle, kotlin_app_jar, kotlin_classpath, need_tool  # noqa: F401

from mobilemllm.bundle import app_inputs as ai

ROOT = Path(__file__).resolve().parents[1]
KOTLIN_DIR = ROOT / "android_demo/app/src/main/java/org/mobilemllm/demo"
KOTLIN_TEST_DIR = ROOT / "android_demo/app/src/test/java/org/mobilemllm/demo"
SWIFT_DIR = ROOT / "ios_demo/MobileMLLMDemo"

# ---- ExecuTorch's rules, quoted from its source (executorch 1.5: github.com/pytorch/executorch) ----------
# extension/android/executorch_android/src/main/java/org/pytorch/executorch/extension/llm/LlmModule.kt:
LLM_MODULE_INIT = '''
  init {
    ExecuTorchRuntime.getRuntime()
    ExecuTorchRuntime.validateFilePath(modulePath, "model path")
    ExecuTorchRuntime.validateFilePath(tokenizerPath, "tokenizer path")
'''
# extension/android/executorch_android/src/main/java/org/pytorch/executorch/ExecuTorchRuntime.kt:
VALIDATE_FILE_PATH = '''
      val file = File(path)
      if (!file.exists()) {
        throw IllegalArgumentException("Cannot load $description: path does not exist: $path")
      }
      if (!file.isFile) {
        throw IllegalArgumentException("Cannot load $description: path is not a file: $path")
      }
      if (!file.canRead()) {
        throw IllegalArgumentException("Cannot load $description: path is not readable: $path")
      }
'''
# extension/android/jni/jni_layer_llama.cpp, ExecuTorchLlmJni::generate (LlmModule.generate(prompt, seqLen,
# callback, echo) passes temperature -1 (the module's) and numBos/numEos 0, and JNI uses its own num_bos_):
JNI_GENERATE = '''
    float effective_temperature = temperature >= 0 ? temperature : temperature_;
    std::string token_buffer;
    auto token_callback = [callback, &token_buffer](const std::string& token) {
      token_buffer += token;
      if (!utf8_check_validity(token_buffer.c_str(), token_buffer.size())) {
        ET_LOG(
            Info, "Current token buffer is not valid UTF-8. Waiting for more.");
        return;
      }
      std::string result = token_buffer;
      token_buffer.clear();
      if (callback) {
        callback->onResult(result);
      }
    };
      executorch::extension::llm::GenerationConfig config{
          .echo = static_cast<bool>(echo),
          .seq_len = seq_len,
          .temperature = effective_temperature,
          .num_bos = needs_bos_ ? num_bos_ : 0,
          .num_eos = num_eos,
      };
'''
# jni_layer_llama.cpp, prefill_text_input / prefill_images_input / reset_context:
JNI_PREFILL = '''
    int32_t bos = needs_bos_ ? num_bos_ : 0;
    auto result = runner_->prefill(inputs, bos, /*num_eos=*/0);
    if (!result.ok()) {
      return static_cast<jint>(result.error());
    }
    needs_bos_ = false;
  void reset_context() {
    if (runner_) {
      runner_->reset();
    }
    needs_bos_ = true;
  }
'''
# extension/llm/apple/ExecuTorchLLM/Exported/ExecuTorchLLMMultimodalRunner.h / .mm (the Swift API):
IOS_RUNNER = '''
 @param tokenizerPath  File system path to the tokenizer data.
- (instancetype)initWithModelPath:(NSString *)modelPath
                    tokenizerPath:(NSString *)tokenizerPath
    _runner = llm::create_multimodal_runner(
      _modelPath.UTF8String ?: "",
      llm::load_tokenizer(_tokenizerPath.UTF8String ?: "")
  auto status = _runner->generate(
    std::move(nativeInputs),
    config.nativeConfig,
    [callback](const std::string& token) {
      if (callback) {
        callback(@(token.c_str()));
'''


class PlatformError(Exception):
    """What the platform API would throw (IllegalArgumentException, ExecutorchRuntimeException, NSError)."""


def validate_file_path(path: str | None, description: str) -> None:
    """ExecuTorchRuntime.validateFilePath (quoted in VALIDATE_FILE_PATH), applied by LlmModule's init."""
    if path is None:
        raise PlatformError(f"Cannot load {description}: path is null")
    p = Path(path)
    if not p.exists():
        raise PlatformError(f"Cannot load {description}: path does not exist: {path}")
    if not p.is_file():
        raise PlatformError(f"Cannot load {description}: path is not a file: {path}")
    if not os.access(p, os.R_OK):
        raise PlatformError(f"Cannot load {description}: path is not readable: {path}")


def test_quoted_rules_are_the_ones_applied(tmp_path):
    """The quotes above are what the checks here implement (a folder is refused as the tokenizer path)."""
    assert 'validateFilePath(tokenizerPath, "tokenizer path")' in LLM_MODULE_INIT
    assert "!file.isFile" in VALIDATE_FILE_PATH and "path is not a file" in VALIDATE_FILE_PATH
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer/tokenizer.json").write_text("{}")
    with pytest.raises(PlatformError, match="Cannot load tokenizer path: path is not a file"):
        validate_file_path(str(tmp_path / "tokenizer"), "tokenizer path")
    with pytest.raises(PlatformError, match="does not exist"):
        validate_file_path(str(tmp_path / "nope.json"), "tokenizer path")
    validate_file_path(str(tmp_path / "tokenizer/tokenizer.json"), "tokenizer path")
    assert ".num_bos = needs_bos_ ? num_bos_ : 0" in JNI_GENERATE and "needs_bos_ = true;" in JNI_PREFILL
    assert "utf8_check_validity" in JNI_GENERATE and "callback(@(token.c_str()))" in IOS_RUNNER


# ---- the manifest's follow-up is training's two-turn layout -----------------------------------------------
@pytest.mark.parametrize("template", ["vicuna_short", "vicuna_v1", "vicuna_short_qfirst"])
def test_follow_up_texts_tokenize_to_training_two_turn_ids(template, tiny_tokenizer):
    from conftest import make_tiny_config

    from mobilemllm.export.manifest_sections import prompt_section
    from mobilemllm.runtime.conversation import template_follow_up_ids

    cfg = make_tiny_config(template=template)
    manifest = {"prompt": prompt_section(cfg, tiny_tokenizer), "tokenizer": {"bos_id": tiny_tokenizer.bos_token_id}}
    fu = manifest["prompt"]["follow_up"]
    assert fu["end_of_turn"] == tiny_tokenizer.eos_token
    for answer, q in [("It is red.", "Where is it?"), ("  two  ", "é ü ✓ 形 🙂"), ("a\nb", "<s>odd</s>")]:
        want = template_follow_up_ids(template, tiny_tokenizer, answer, q)
        answer_ids = tiny_tokenizer.encode(fu["answer"].replace("{answer}", answer.strip()), add_special_tokens=False)
        assert want[:len(answer_ids)] == answer_ids
        # continuing the cache (it holds the answer tokens): the end-of-turn text and the next turn
        got = [i for kind, text in ai.follow_up_calls(manifest, q)
               for i in tiny_tokenizer.encode(text, add_special_tokens=False)]
        assert got == want[len(answer_ids):], (answer, q)
    assert prompt_section(make_tiny_config(template="plain"), tiny_tokenizer)["follow_up"] is None


def test_app_chat_continues_resets_and_refuses_a_full_context(tiny_tokenizer):
    from conftest import make_tiny_config

    from mobilemllm.errors import UserError
    from mobilemllm.export.manifest_sections import prompt_section

    cfg = make_tiny_config()
    m = {"prompt": prompt_section(cfg, tiny_tokenizer), "tokenizer": {"bos_id": 1},
         "context": {"max_context_len": 256}}
    chat = ai.AppChat(m)
    first = chat.calls("What colour?")
    assert first == [("reset", None)] + ai.runner_calls(m, "What colour?")
    chat.finish("What colour?", " red ", True, used=40)
    assert chat.calls("Where?") == ai.follow_up_calls(m, "Where?")  # no reset: the cache continues
    chat.finish("Where?", "top", False, used=50)  # cut short: its last token is not in the cache
    again = chat.calls("Why?")
    assert again[0] == ("reset", None) and again[1:] == ai.conversation_calls(m, [("What colour?", "red"), ("Where?", "top")], "Why?")
    assert ("text", " red") in again and ("text", "</s>") in again
    with pytest.raises(ai.ContextFullError, match=r"filled the model's context \(256 tokens\): pick a new image"):
        chat.calls("describe it " * 20)
    chat.new_image()
    assert chat.calls("What?")[0] == ("reset", None)
    with pytest.raises(ai.ContextFullError, match="too long"):
        chat.calls("x" * 300)
    with pytest.raises(UserError, match="no chat turns"):
        ai.follow_up_calls({"prompt": {"template": "plain", "follow_up": None}}, "q")


# ---- Android: ChatSession.kt on a JVM, each LlmModule call run on the C++ runner ---------------------------
@pytest.fixture(scope="module")
def chatty_bundle(tmp_path_factory, tiny_tokenizer, shapes_data) -> Path:
    """The tiny model trained for a few seconds on one two-turn conversation about one shapes image, so its
    answers end with the end-of-turn token (the random-weight model never stops), exported fp32 (slow)."""
    import torch
    from conftest import make_tiny_model

    from mobilemllm.data.dataset import ConversationDataset, collate
    from mobilemllm.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("chatty")
    image = sorted((shapes_data / "images").glob("*.png"))[0]
    record = [{"image": image.name, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]}]
    (root / "chat.json").write_text(json.dumps(record))
    model = make_tiny_model(seed=0).train()
    batch = collate([ConversationDataset(root / "chat.json", shapes_data / "images", tiny_tokenizer, model.config)[0]],
                    tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = save_checkpoint(model.eval(), tiny_tokenizer, root / "ckpt")
    return export_tiny_bundle(ckpt, root / "store" / "chatty")


@pytest.fixture(scope="module")
def kotlin_chat_jar(kotlin_app_jar) -> Path:
    return kotlin_app_jar


class JniRunner:
    """LlmModule's multimodal model type as jni_layer_llama.cpp runs it (JNI_GENERATE, JNI_PREFILL quoted
    above), on ExecuTorch's C++ MultimodalRunner through its Python bindings."""

    def __init__(self, call: dict, manifest: dict):
        from mobilemllm.runtime.executorch_runner import load_kernels

        validate_file_path(call["modulePath"], "model path")  # LlmModule's init, before any native code
        validate_file_path(call["tokenizerPath"], "tokenizer path")
        assert call["modelType"] == 2, "MODEL_TYPE_MULTIMODAL"
        load_kernels()
        from executorch.extension.llm.runner import MultimodalRunner

        self.runner = MultimodalRunner(call["modulePath"], call["tokenizerPath"])
        self.temperature, self.num_bos, self.num_eos = call["temperature"], call["numBos"], call["numEos"]
        self.bos_id = manifest["tokenizer"]["bos_id"]
        self.needs_bos, self.pos0 = True, True
        self.calls: list[tuple] = []

    def reset_context(self):
        self.runner.reset()
        self.needs_bos, self.pos0 = True, True

    def prefill(self, inp, is_text: bool):
        from executorch.extension.llm.runner import make_token_input

        bos = self.num_bos if self.needs_bos else 0
        if bos and self.pos0:
            # MultimodalRunner::prefill: a text first input gets bos through the tokenizer (never the case
            # here: num_bos is 1 only when the prompt starts with the image), an image gets BOS token inputs.
            assert not is_text, "num_bos with a text first input"
            self.runner.prefill([make_token_input([self.bos_id] * bos)])
        self.runner.prefill([inp])
        self.needs_bos, self.pos0 = False, False

    def generate(self, call: dict, send, receive):
        from executorch.extension.llm.runner import GenerationConfig, MultimodalInput

        temperature = call.get("temperature", -1.0)
        config = GenerationConfig(echo=call["echo"], seq_len=call["seqLen"],
                                  temperature=float(temperature if temperature >= 0 else self.temperature),
                                  num_bos=self.num_bos if self.needs_bos else 0, num_eos=0)
        inputs = [MultimodalInput(call["prompt"])] if call["prompt"] else []
        stats: dict = {}

        def on_piece(piece: str) -> None:
            # the bindings hand pieces over as str; a piece ending inside a character would raise here,
            # where the JNI buffer (quoted above) holds it back: this model's answers are ASCII.
            send({"piece": piece})
            if receive()["stop"]:
                self.runner.stop()

        try:
            self.runner.generate(inputs, config, on_piece, lambda s: stats.update(json.loads(s.to_json_string())))
        except RuntimeError as e:
            send({"error": str(e), "code": 1})
            return
        self.needs_bos, self.pos0 = False, False
        send({"stats": json.dumps(stats)})
        send({"done": True})


class KotlinApp:
    """ParityMain --chat: ChatSession.kt and BundleStore.kt on a JVM; LlmModule calls served by JniRunner."""

    def __init__(self, jar: Path, store: Path, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["java", "-cp", kotlin_classpath(jar), "org.mobilemllm.demo.ParityMainKt",
                                      "--chat", str(store), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, encoding="utf-8", bufsize=1)
        self.store, self.work = store, work
        self.llm: JniRunner | None = None
        self.calls: list = []  # every LlmModule call the app made, in order

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the Kotlin app exited ({self.proc.poll()})"
        return json.loads(line)

    def command(self, obj: dict) -> dict:
        """Send one app command; serve its LlmModule calls until the app reports an event."""
        self.send(obj)
        return self.next_event()

    def next_event(self) -> dict:
        """Serve LlmModule calls until the app reports its next event."""
        while "event" not in (msg := self.receive()):
            self.calls.append(msg)
            self.serve(msg)
        return msg

    def serve(self, call: dict) -> None:
        from executorch.extension.llm.runner import Image, MultimodalInput

        try:
            kind = call["call"]
            if kind == "LlmModule":
                manifest = json.loads((Path(call["modulePath"]).parent / "manifest.json").read_text())
                self.llm = JniRunner(call, manifest)
            elif kind == "resetContext":
                self.llm.reset_context()
            elif kind == "prefillPrompt":
                self.llm.prefill(MultimodalInput(call["prompt"]), is_text=True)
            elif kind == "prefillImages":
                data = np.fromfile(call["file"], dtype=np.uint8)
                assert data.size == call["length"] == call["width"] * call["height"] * call["channels"]
                self.llm.prefill(MultimodalInput(Image(data.tolist(), call["width"], call["height"], call["channels"])),
                                 is_text=False)
            elif kind == "generate":
                self.llm.generate(call, self.send, self.receive)
                return
            else:
                raise AssertionError(f"unexpected call {call}")
        except PlatformError as e:
            self.send({"error": str(e)})
            return
        self.send({"ok": True})

    def image(self, path: Path) -> None:
        from mobilemllm.data.images import load_image

        px = ai.pixels_of(load_image(path))
        rgb = self.work / (path.stem + ".rgb")
        rgb.write_bytes(struct.pack(">ii", px.shape[1], px.shape[0]) + px.tobytes())
        assert self.command({"image": str(rgb)})["event"] == "image"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def cli_answer(capsys, bundle: Path, image: Path, question: str, max_new_tokens: int) -> str:
    """`mobilemllm generate --bundle` on the same bundle, image and question: its printed answer."""
    from mobilemllm.cli import main

    capsys.readouterr()
    code = main(["generate", "--bundle", str(bundle), "--image", str(image), "--prompt", question,
                 "--max-new-tokens", str(max_new_tokens)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip()


def plan_calls(event: dict) -> list[tuple]:
    return [(k, None if k in ("reset", "image") else (int(t) if k == "bos" else t)) for k, t in event["calls"]]


Q1, Q2, N = "What colour is the shape?", "Where is it?", 16


@pytest.mark.slow
def test_android_passes_llm_module_a_tokenizer_file(chatty_bundle, kotlin_chat_jar, tmp_path):
    """LlmModule's constructor refuses the tokenizer folder: the app must hand it tokenizer.json."""
    app = KotlinApp(kotlin_chat_jar, chatty_bundle.parent, tmp_path / "work")
    try:
        opened = app.command({"open": chatty_bundle.name, "max_new_tokens": N})
        assert opened["event"] == "opened", opened
        init = app.calls[0]
        assert init["call"] == "LlmModule" and init["modelType"] == 2 and init["numEos"] == 0
        assert init["modulePath"] == str(chatty_bundle / "model.pte")
        assert init["tokenizerPath"] == str(chatty_bundle / "tokenizer" / "tokenizer.json")
        assert init["temperature"] == 0.0 and init["numBos"] == ai.bos_tokens(json.loads(
            (chatty_bundle / "manifest.json").read_text())["prompt"])
    finally:
        app.close()


@pytest.mark.slow
def test_android_conversation_replayed_through_multimodal_runner(chatty_bundle, kotlin_chat_jar, shapes_data,
                                                                 tmp_path, capsys):
    from mobilemllm.data.tokenizer import load_tokenizer
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.conversation import template_follow_up_ids

    manifest = json.loads((chatty_bundle / "manifest.json").read_text())
    images = sorted((shapes_data / "images").glob("*.png"))
    image, other = images[0], images[1]
    spec = ai.AppChat(manifest)
    app = KotlinApp(kotlin_chat_jar, chatty_bundle.parent, tmp_path / "work")
    try:
        app.image(image)
        assert app.command({"open": chatty_bundle.name, "max_new_tokens": N})["event"] == "opened"

        # turn 1: a new conversation, the manifest's segments; the answer is `mobilemllm generate --bundle`'s
        plan = app.command({"ask": Q1})
        assert plan["event"] == "plan" and plan_calls(plan) == spec.calls(Q1)
        first = app.next_event()
        assert first["event"] == "answer", first
        assert first["text"] == cli_answer(capsys, chatty_bundle, image, Q1, N) != ""
        assert first["shown"] == first["text"] and first["endedAtEndOfTurn"]
        made = [c["call"] for c in app.calls[1:]]
        assert made == ["resetContext", "prefillPrompt", "prefillImages", "generate"]
        img_call = app.calls[3]
        s = manifest["preprocessing"]["image_size"]
        assert (img_call["width"], img_call["height"], img_call["channels"]) == (s, manifest["preprocessing"]["views"] * s, 3)
        from mobilemllm.data.images import load_image

        want_image = ai.runner_image(ai.image_views(ai.pixels_of(load_image(image)), manifest["preprocessing"]))
        assert np.array_equal(np.fromfile(img_call["file"], dtype=np.uint8), want_image.reshape(-1))
        spec.finish(Q1, first["text"], True, first["used"])

        # turn 2: no reset; the end-of-turn text and the next turn, as training writes two turns
        n_calls = len(app.calls)
        plan = app.command({"ask": Q2})
        assert plan_calls(plan) == spec.calls(Q2) == ai.follow_up_calls(manifest, Q2)
        second = app.next_event()
        follow = app.calls[n_calls:]
        assert [c["call"] for c in follow] == ["prefillPrompt", "generate"]
        tok = load_tokenizer(chatty_bundle / "tokenizer")
        texts = [follow[0]["prompt"], follow[1]["prompt"]]
        sent = [i for t in texts for i in tok.encode(t, add_special_tokens=False)]
        training = template_follow_up_ids(manifest["prompt"]["template"], tok, first["text"], Q2)
        answer_ids = tok.encode(" " + first["text"], add_special_tokens=False)
        assert training == answer_ids + sent  # the cache holds the answer's tokens; the rest is what the app sends
        runner = open_runner(chatty_bundle)
        conv = runner.conversation(image)
        py_first = conv.ask(Q1, max_new_tokens=N)
        py_second = conv.ask(Q2, max_new_tokens=N)
        assert py_first.text == first["text"] and py_second.reused_tokens > 0  # the Python runner continues too
        assert second["text"] == py_second.text != "" and second["endedAtEndOfTurn"]
        assert second["used"] == py_second.context_tokens
        spec.finish(Q2, second["text"], True, second["used"])

        # a full context: one clear message, nothing run
        n_calls = len(app.calls)
        full = app.command({"ask": "describe the shapes " * 20})
        assert full["event"] == "error" and full["kind"] == "ContextFullError"
        assert "filled the model's context (256 tokens): pick a new image or start a new chat" in full["message"]
        assert len(app.calls) == n_calls

        # a new image: a new conversation from an empty cache
        app.image(other)
        plan = app.command({"ask": Q1})
        assert plan_calls(plan)[0] == ("reset", None)
        third = app.next_event()
        assert third["text"] == cli_answer(capsys, chatty_bundle, other, Q1, N)

        # an answer cut short by the token limit: the next turn prefills the whole conversation again
        app.command({"new_chat": True})
        assert app.command({"open": chatty_bundle.name, "max_new_tokens": 3})["event"] == "opened"
        plan = app.command({"ask": Q1})
        cut = app.next_event()
        assert not cut["endedAtEndOfTurn"]
        plan = app.command({"ask": Q2})
        replay = app.next_event()
        assert plan_calls(plan) == [("reset", None)] + ai.conversation_calls(manifest, [(Q1, cut["text"])], Q2)
        runner.reset()
        conv = runner.conversation(other, history=[(Q1, cut["text"])])
        assert replay["text"] == conv.ask(Q2, max_new_tokens=3).text
    finally:
        app.close()


@pytest.mark.slow  # compiles the Kotlin (about a minute)
def test_kotlin_answer_text_on_pieces(kotlin_chat_jar, tmp_path):
    """AnswerText (ChatSession.kt) on the pieces LlmModule delivers: whole characters (the JNI layer holds a
    piece that ends inside one: JNI_GENERATE above), the end-of-turn piece, the space before every answer."""
    pieces = [" Il", " est", " ro", "ug", "e", " é", "形", "🙂", " ", "</s>"]
    src = tmp_path / "pieces.json"
    src.write_text(json.dumps(pieces))
    out = subprocess.run(["java", "-cp", kotlin_classpath(kotlin_chat_jar), "org.mobilemllm.demo.ParityMainKt",
                          "--pieces", str(src), "</s>"], capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["text"] == "Il est rouge é形🙂" and res["endedAtEndOfTurn"] is True
    assert "".join(res["shown"]) == res["text"] and res["shown"][0] == "Il"
    assert res["pieces"] == len(pieces)


@pytest.mark.slow
def test_kotlin_photo_sample_size_keeps_what_the_resize_needs(chatty_bundle, kotlin_chat_jar):
    """A 12-megapixel photo is decoded at a power-of-two fraction of its size that still gives the bicubic
    resize at least 4x the pixels of its largest target (BundleInputs.sampleSize)."""
    m = json.loads((chatty_bundle / "manifest.json").read_text())
    s = m["preprocessing"]["image_size"]

    def sample(w: int, h: int) -> int:
        out = subprocess.run(["java", "-cp", kotlin_classpath(kotlin_chat_jar), "org.mobilemllm.demo.ParityMainKt",
                              "--sample-size", str(chatty_bundle / "manifest.json"), str(w), str(h)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout)

    for w, h in [(4000, 3000), (3000, 4000), (640, 480), (s, s), (1, 1), (9000, 100)]:
        n = sample(w, h)
        assert n >= 1 and n & (n - 1) == 0, n
        assert max(w, h) // n >= min(4 * s, max(w, h)), (w, h, n)  # enough pixels left
        assert max(w, h) // (2 * n) < 4 * s, (w, h, n)  # and not one more halving
    assert sample(4000, 3000) > 1


# ---- iOS: the spec's calls with ExecuTorchLLM's rules, replayed as its Objective-C layer runs them ---------
def ios_inputs(manifest: dict, bundle: Path, image_path: Path, calls: list[tuple]):
    """MultimodalInput(text) / MultimodalInput(Image(data, width: S, height: V*S, channels: 3)) as
    ExecuTorchEngine.swift builds them from the calls (a ("bos", 1) becomes the BOS text before the image)."""
    from executorch.extension.llm.runner import Image, MultimodalInput

    from mobilemllm.data.images import load_image

    s = manifest["preprocessing"]["image_size"]
    chw = ai.runner_image(ai.image_views(ai.pixels_of(load_image(image_path)), manifest["preprocessing"]))
    inputs = []
    for kind, value in calls:
        if kind == "bos" and value:
            inputs.append(MultimodalInput(manifest["prompt"]["bos_text"]))
        elif kind == "image":
            inputs.append(MultimodalInput(Image(chw.reshape(-1).tolist(), s, chw.shape[1], 3)))
        elif kind == "text":
            inputs.append(MultimodalInput(value))
    return inputs


@pytest.mark.slow
def test_ios_conversation_replayed_through_multimodal_runner(chatty_bundle, shapes_data, capsys):
    from mobilemllm.runtime import open_runner
    from mobilemllm.runtime.executorch_runner import load_kernels

    load_kernels()
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner

    manifest = json.loads((chatty_bundle / "manifest.json").read_text())
    image = sorted((shapes_data / "images").glob("*.png"))[0]
    tokenizer_path = chatty_bundle / manifest["tokenizer"]["dir"] / "tokenizer.json"  # ExecuTorchEngine.swift's
    validate_file_path(str(tokenizer_path), "tokenizer path")  # "File system path to the tokenizer data"
    runner = MultimodalRunner(str(chatty_bundle / "model.pte"), str(tokenizer_path))
    chat = ai.AppChat(manifest)
    answers = []
    for q in (Q1, Q2):
        calls = chat.calls(q)
        if calls[0][0] == "reset":
            runner.reset()
        pieces: list[str] = []
        # Config { sequenceLength = max_context_len, maximumNewTokens, temperature 0, bosCount 0, eosCount 0 }
        config = GenerationConfig(echo=False, max_new_tokens=N, seq_len=manifest["context"]["max_context_len"],
                                  temperature=0.0, num_bos=0, num_eos=0)
        runner.generate(ios_inputs(manifest, chatty_bundle, image, calls), config, pieces.append)
        eot = manifest["prompt"]["follow_up"]["end_of_turn"]
        ended = bool(pieces) and pieces[-1] == eot
        text = "".join(pieces[:-1] if ended else pieces).strip()
        chat.finish(q, text, ended, used=0)
        answers.append(text)
    assert answers[0] == cli_answer(capsys, chatty_bundle, image, Q1, N)
    conv = open_runner(chatty_bundle).conversation(image)
    conv.ask(Q1, max_new_tokens=N)
    assert answers[1] == conv.ask(Q2, max_new_tokens=N).text != ""


def swift_tree(name: str):
    import importlib

    try:
        language = importlib.import_module("tree_sitter_swift").language()
    except ImportError:
        language = None
    need_tool("tree-sitter-swift", language is not None, "pip install -e '.[dev]' (tree-sitter grammars)")
    from tree_sitter import Language, Parser

    data = (SWIFT_DIR / name).read_bytes()
    return Parser(Language(language)).parse(data).root_node, data


def swift_calls(name: str, callee: str) -> list[str]:
    """Source text of every call to ``callee`` in a Swift file (tree-sitter call_expression nodes)."""
    root, data = swift_tree(name)
    found = []

    def walk(node):
        if node.type == "call_expression":
            head = data[node.start_byte:node.end_byte].decode()
            if head.startswith(callee + "(") or head.startswith(callee + " {") or head.split("(")[0].endswith("." + callee):
                found.append(head)
        for child in node.children:
            walk(child)

    walk(root)
    return found


def test_swift_engine_makes_the_spec_calls():
    """ExecuTorchEngine.swift: the tokenizer *file*, reset only when ChatSession says so, one generate per
    turn with the spec's inputs; ChatSession.swift implements AppChat's rules."""
    init = swift_calls("ExecuTorchEngine.swift", "MultimodalRunner")
    assert len(init) == 1 and "tokenizerPath: bundle.path(m.tokenizerFile)" in init[0], init
    resets = swift_calls("ExecuTorchEngine.swift", "reset")
    assert resets == ["runner.reset()"]
    engine = (SWIFT_DIR / "ExecuTorchEngine.swift").read_text()
    for setting in ("$0.sequenceLength = m.maxContextLen", "$0.maximumNewTokens = maxNewTokens", "$0.bosCount = 0",
                    "$0.eosCount = 0", "$0.echoEnabled = false"):
        assert setting in engine, setting
    chat = (SWIFT_DIR / "ChatSession.swift").read_text()
    for rule in ("func plan(", "followUpCalls(", "conversationCalls(", "tokenBound(", "ContextFullError(",
                 "filled the model's context", "cacheContinues = answer.endedAtEndOfTurn", "calls.first == .reset ? 0 : used"):
        assert rule in chat, rule


# ---- the projects build with the platform tools ---------------------------------------------------------
# Gradle 8.13's wrapper jar (gradle-wrapper.jar from npm's @react-native-community/template 0.79.7; the
# checksum Gradle publishes for 8.13's wrapper).
GRADLE_WRAPPER_SHA256 = "81a82aaea5abcc8ff68b3dfcb58b3c3c429378efd98e7433460610fecd7ae45f"


def test_gradle_wrapper_is_committed_and_consistent():
    import zipfile

    android = ROOT / "android_demo"
    jar = android / "gradle/wrapper/gradle-wrapper.jar"
    assert hashlib.sha256(jar.read_bytes()).hexdigest() == GRADLE_WRAPPER_SHA256
    with zipfile.ZipFile(jar) as z:
        assert "Implementation-Title: Gradle Wrapper" in z.read("META-INF/MANIFEST.MF").decode()
        assert "org/gradle/wrapper/GradleWrapperMain.class" in z.namelist()
    assert "org.gradle.wrapper.GradleWrapperMain" in (android / "gradlew").read_text()
    assert os.access(android / "gradlew", os.X_OK) and (android / "gradlew.bat").exists()
    assert subprocess.run(["sh", "-n", str(android / "gradlew")]).returncode == 0
    props = (android / "gradle/wrapper/gradle-wrapper.properties").read_text()
    assert "distributionUrl=https\\://services.gradle.org/distributions/gradle-8.13-bin.zip" in props
    assert "8.13" in (android / "README.md").read_text()


def test_xcodegen_spec_names_files_that_exist():
    import yaml

    spec = yaml.safe_load((ROOT / "ios_demo/project.yml").read_text())
    target = spec["targets"]["MobileMLLMDemo"]
    known = {"type", "platform", "sources", "entitlements", "info", "settings", "dependencies", "deploymentTarget"}
    assert set(target) <= known, set(target) - known
    for src in target["sources"]:
        assert (ROOT / "ios_demo" / (src if isinstance(src, str) else src["path"])).is_dir()
    assert (ROOT / "ios_demo" / target["entitlements"]["path"]).is_file()
    assert target["info"]["properties"]["UIFileSharingEnabled"] is True
    assert target["settings"]["base"]["ASSETCATALOG_COMPILER_APPICON_NAME"] == "AppIcon"
    for name, pkg in spec["packages"].items():
        assert pkg["url"].startswith("https://") and ({"branch", "from", "exactVersion", "revision"} & set(pkg)), name
    deps = {(d["package"], d["product"]) for d in target["dependencies"]}
    assert ("executorch", "executorch_llm") in deps
    icon = ROOT / "ios_demo/MobileMLLMDemo/Assets.xcassets/AppIcon.appiconset"
    contents = json.loads((icon / "Contents.json").read_text())
    png = icon / contents["images"][0]["filename"]
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1024, 1024) and im.mode == "RGB"  # App Store icons: 1024 px, no alpha
    assert png.stat().st_size < 50_000


def test_android_launcher_icon_and_photo_provider():
    import xml.etree.ElementTree as ET

    res = ROOT / "android_demo/app/src/main/res"
    ns = "{http://schemas.android.com/apk/res/android}"
    app = ET.parse(ROOT / "android_demo/app/src/main/AndroidManifest.xml").getroot().find("application")
    assert app.get(ns + "icon") == "@mipmap/ic_launcher"
    icon = ET.parse(res / "mipmap-anydpi-v26/ic_launcher.xml").getroot()
    for part in ("background", "foreground"):
        ref = icon.find(part).get(ns + "drawable")
        assert (res / "drawable" / (ref.split("/")[1] + ".xml")).is_file()
    provider = app.find("provider")
    assert provider.get(ns + "authorities") == "${applicationId}.photos"
    paths = provider.find("meta-data").get(ns + "resource").split("/")[1]
    assert ET.parse(res / "xml" / f"{paths}.xml").getroot().find("cache-path").get("path") == "photos/"
    activity = (KOTLIN_DIR / "MainActivity.kt").read_text()
    assert "ActivityResultContracts.TakePicture()" in activity and "ActivityResultContracts.TakePicturePreview" not in activity
    assert '"$packageName.photos"' in activity and 'File(cacheDir, "photos/photo.jpg")' in activity
