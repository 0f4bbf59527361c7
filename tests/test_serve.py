"""`mobilemllm serve`: the OpenAI-compatible API, driven by the official `openai` client against an ONNX
bundle: answers equal `mobilemllm generate`, streaming in OpenAI's chunk format, a follow-up turn equal to
the runner's, every error as an OpenAI error object, the queue, timeouts and slow clients."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from conftest_runner import onnx_chat  # noqa: F401  (fixture)

openai = pytest.importorskip("openai", reason="pip install -e '.[dev]' (the openai client is in the dev extra)")
pytest.importorskip("onnxruntime")

MODEL = "tiny"
Q1, Q2 = "Is there a red square?", "What colour is it?"
IDLE_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(onnx_chat):
    from mobilemllm.serve import make_server

    srv = make_server(onnx_chat.bundle, "127.0.0.1", 0, model_name=MODEL, max_tokens=8, max_queue=1,
                      queue_timeout=1.0, idle_timeout=IDLE_TIMEOUT_S, image_dir=onnx_chat.image.parent)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def url(server):
    from mobilemllm.httpd import url_of

    return url_of(server)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def first_turn(image_url: str, question: str = Q1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": question}]}]


# ---- answers -------------------------------------------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "mobilemllm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_answer_equals_mobilemllm_generate(client, onnx_chat, capsys):
    from mobilemllm.cli import main
    from mobilemllm.runtime import open_runner

    assert main(["generate", "--bundle", str(onnx_chat.bundle), "--image", str(onnx_chat.image), "--prompt", Q1,
                 "--max-new-tokens", "8"]) == 0
    want = capsys.readouterr().out.strip()
    got = client.chat.completions.create(model=MODEL, messages=first_turn(data_url(onnx_chat.image)), max_tokens=8)
    assert got.choices[0].message.content == want and want
    assert got.choices[0].message.role == "assistant" and got.choices[0].finish_reason in ("stop", "length")
    assert got.object == "chat.completion" and got.model == MODEL and got.id.startswith("chatcmpl-")
    n = len(open_runner(onnx_chat.bundle).conversation(onnx_chat.image).prompt_ids(Q1))
    assert got.usage.prompt_tokens == n and got.usage.total_tokens == n + got.usage.completion_tokens
    # a local file under --image-dir, as a path and as a file:// URL, gives the same answer
    for ref in (str(onnx_chat.image), onnx_chat.image.as_uri()):
        same = client.chat.completions.create(model=MODEL, messages=first_turn(ref), max_tokens=8)
        assert same.choices[0].message.content == want


def test_streaming_in_openai_chunks(client, url, onnx_chat):
    messages = first_turn(data_url(onnx_chat.image))
    want = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    # on the wire: server-sent events ending with data: [DONE]
    req = urllib.request.Request(url + "v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": MODEL, "messages": messages, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = [ln for ln in r.read().decode().split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_follow_up_turn_equals_the_runners(client, onnx_chat):
    from mobilemllm.runtime import open_runner

    conv = open_runner(onnx_chat.bundle).conversation(onnx_chat.image)
    a1 = conv.ask(Q1, max_new_tokens=8).text
    a2 = conv.ask(Q2, max_new_tokens=8).text
    first = client.chat.completions.create(model=MODEL, messages=first_turn(data_url(onnx_chat.image)), max_tokens=8)
    assert first.choices[0].message.content == a1
    messages = first_turn(data_url(onnx_chat.image)) + [{"role": "assistant", "content": a1},
                                                         {"role": "user", "content": Q2}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert second.choices[0].message.content == a2
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # continued from the first request's cache
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == a2


# ---- errors --------------------------------------------------------------------------------------------
def _bad_requests(image_url: str, outside: str):
    good = first_turn(image_url)
    two_images = [{"role": "user", "content": good[0]["content"] + [good[0]["content"][0]]}]
    return [
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "What is it?"}]}, 400, "messages", "image_required"),
        ({"messages": first_turn("data:image/png;base64," + base64.b64encode(b"not an image").decode())}, 400,
         "messages", "invalid_image"),
        ({"messages": first_turn("data:image/png;base64,@@@")}, 400, "messages", "invalid_image"),
        ({"messages": first_turn("https://example.com/cat.png")}, 400, "messages", "invalid_image"),
        ({"messages": first_turn(outside)}, 403, "messages", "image_outside_image_dir"),
        ({"messages": first_turn(image_url, "describe the shapes " * 80)}, 400, "messages",
         "context_length_exceeded"),
        ({"messages": two_images}, 400, "messages[0]", "too_many_images"),
        ({"messages": [{"role": "system", "content": "Be brief."}] + good}, 400, "messages[0].role",
         "unsupported_role"),
        ({"messages": good + [{"role": "assistant", "content": "x"}]}, 400, "messages", None),
        ({"max_tokens": "8"}, 400, "max_tokens", "invalid_type"),
        ({"temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({"top_p": 2}, 400, "top_p", "invalid_type"),
        ({"seed": 1.5}, 400, "seed", "invalid_type"),
        ({"stop": [1]}, 400, "stop", "invalid_type"),
        ({"n": 2}, 400, "n", "unsupported_parameter"),
        ({"logprobs": True}, 400, "logprobs", "unsupported_parameter"),
        ({"extra_body": {"top_k": 5}}, 400, "top_k", "unknown_parameter"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_requests_get_openai_error_objects(client, onnx_chat, tmp_path, case):
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(onnx_chat.image.read_bytes())
    cases = _bad_requests(data_url(onnx_chat.image), str(outside))
    assert len(cases) == 18
    change, status, param, code = cases[case]
    kw = {"model": MODEL, "messages": first_turn(data_url(onnx_chat.image)), "max_tokens": 4, **change}
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == status
    error = e.value.body  # the client unwraps {"error": {...}}
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert error["type"] == ("permission_error" if status == 403 else "invalid_request_error")


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "unpaired UTF-16 surrogate"),
])
def test_bad_json_is_an_error_object(url, body, message):
    req = urllib.request.Request(url + "v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_browser_pages_elsewhere_are_refused(url, onnx_chat):
    body = {"model": MODEL, "messages": first_turn(data_url(onnx_chat.image))}
    req = urllib.request.Request(url + "v1/chat/completions", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 403 and json.loads(e.value.read())["error"]["code"] == "bad_origin"


# ---- one at a time, timeouts, slow clients -------------------------------------------------------------
def test_a_full_queue_is_429_and_a_long_wait_503(client, server, onnx_chat):
    gate = server.RequestHandlerClass.state.gate
    messages = first_turn(data_url(onnx_chat.image))
    assert gate._run.acquire(timeout=10)  # as if an answer were running
    try:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:  # waits its turn for queue_timeout (1 s), then 503
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_timeout"
        assert 0.9 < time.monotonic() - t0 < 10
        with gate._count:
            gate.admitted += 2  # one running and one waiting: with --max-queue 1 the next is refused at once
        try:
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            assert e.value.body["code"] == "queue_full" and e.value.response.headers["Retry-After"] == "1"
        finally:
            with gate._count:
                gate.admitted -= 2
    finally:
        gate._run.release()
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).choices[0].message.content


def test_request_timeout_stops_the_answer(onnx_chat):
    from mobilemllm.httpd import url_of
    from mobilemllm.serve import make_server

    srv = make_server(onnx_chat.bundle, "127.0.0.1", 0, model_name=MODEL, request_timeout=0.001)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = openai.OpenAI(base_url=url_of(srv) + "v1", api_key="unused", max_retries=0, timeout=60)
        got = c.chat.completions.create(model=MODEL, messages=first_turn(data_url(onnx_chat.image)), max_tokens=200)
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens < 20
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_stalled_client_does_not_block_others(client, url, onnx_chat):
    """A client that stops mid-body holds its own connection until the idle timeout (then 408); other
    requests are answered meanwhile."""
    parts = urlsplit(url)
    stalled = socket.create_connection((parts.hostname, parts.port), timeout=30)
    try:
        stalled.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"model\"".encode())
        t0 = time.monotonic()
        got = client.chat.completions.create(model=MODEL, messages=first_turn(data_url(onnx_chat.image)), max_tokens=2)
        assert got.choices[0].message.content is not None and time.monotonic() - t0 < 30
        answer = b""
        while chunk := stalled.recv(65536):  # the server closes the connection after its 408
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 408") and b'"code": "timeout"' in answer
    finally:
        stalled.close()


@pytest.mark.slow
def test_serve_command_prints_its_url_and_serves(onnx_chat):
    """`mobilemllm serve` as a user runs it: prints the base URL (127.0.0.1, a free port), lists the model."""
    import selectors
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mobilemllm", "serve", "--bundle", str(onnx_chat.bundle), "--port",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline, line = time.monotonic() + 180, ""
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1):
                line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line[line.index("http://"):].split()[0]
        c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == [onnx_chat.bundle.name]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
