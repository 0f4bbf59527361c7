"""`mobilemllm chat`: a terminal conversation driven through piped stdin, as a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest_runner import onnx_chat  # noqa: F401  (fixture)

pytest.importorskip("onnxruntime")

Q1, Q2 = "Is there a red square?", "What colour is it?"


def run_chat(bundle, image, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mobilemllm", "chat", "--bundle", str(bundle), "--image", str(image),
                           *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


def test_two_turns_give_the_python_api_answers(onnx_chat):
    """Piped questions are answered one line each, as the Runner's conversation answers them; /image starts
    a new conversation, /reset forgets the turns, a bad path or a full context is one error line."""
    from mobilemllm.runtime import open_runner

    runner = open_runner(onnx_chat.bundle)
    conv = runner.conversation(onnx_chat.image)
    want = [conv.ask(Q1, max_new_tokens=8).text, conv.ask(Q2, max_new_tokens=8).text]
    other = runner.conversation(onnx_chat.wide_image).ask(Q2, max_new_tokens=8).text
    fresh = runner.conversation(onnx_chat.wide_image).ask(Q1, max_new_tokens=8).text
    stdin = "\n".join([Q1, Q2, "/image /no/such/file.png", "what " * 300, f"/image {onnx_chat.wide_image}", Q2,
                       "/reset", Q1, "/quit", "never asked"]) + "\n"
    proc = run_chat(onnx_chat.bundle, onnx_chat.image, stdin, "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n") == want + [other, fresh, ""]  # answers may hold \x1c etc.
    err = proc.stderr
    assert "error: image not found: /no/such/file.png" in err
    assert "start a new conversation" in err and "Traceback" not in err
    assert err.count("prompt tokens") == 4 and "from the cache" in err  # the second turn continued the cache


def test_bad_settings_fail_before_the_conversation(onnx_chat):
    proc = run_chat(onnx_chat.bundle, onnx_chat.image, f"{Q1}\n", "--top-p", "0")
    assert proc.returncode == 2 and "top_p must be a number in (0, 1]" in proc.stderr and not proc.stdout
    proc = run_chat(onnx_chat.bundle, onnx_chat.image.with_name("missing.png"), f"{Q1}\n")
    assert proc.returncode == 2 and "image not found" in proc.stderr
