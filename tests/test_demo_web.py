"""The local web demo (`mobilemllm demo`), end to end: a real exported bundle served on a free loopback
port, driven by Debian's headless Chromium through Selenium: upload an image, ask, read the streamed
answer and the runner's stats, take a screenshot, and check that bad uploads get a clear message.

The HTTP API and its defences run in the fast tier on an ONNX bundle: follow-up questions continue the
image's conversation; bad Content-Lengths, foreign origins, slow clients and invalid text are refused
without holding up other clients or buffering memory.

In CI (CI=true) a missing chromium/chromedriver/selenium fails the test; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest_apps import app_bundle, need_tool  # noqa: F401  (fixture)
from conftest_runner import onnx_chat  # noqa: F401  (fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUESTION = "What colour is the shape?"
FOLLOW_UP = "Where is it?"
MAX_UPLOAD_MB = 0.05  # small, so a "too large" file is cheap to make


@pytest.fixture(scope="module")
def server(app_bundle):
    from mobilemllm.demo_server import make_server, url_of

    srv = make_server(app_bundle, "127.0.0.1", 0, max_upload_mb=MAX_UPLOAD_MB, max_new_tokens=12)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield url_of(srv)
    srv.shutdown()
    srv.server_close()


IDLE_TIMEOUT_S = 1.0  # the fast-tier server's per-connection timeout


@pytest.fixture(scope="module")
def onnx_server(onnx_chat):
    """The demo on an ONNX bundle (fast tier), with a short idle timeout for the slow-client tests."""
    from mobilemllm.demo_server import make_server, url_of

    srv = make_server(onnx_chat.bundle, "127.0.0.1", 0, max_upload_mb=MAX_UPLOAD_MB, max_new_tokens=8,
                      idle_timeout=IDLE_TIMEOUT_S)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield url_of(srv)
    srv.shutdown()
    srv.server_close()


def post(url: str, data: bytes, content_type: str = "application/octet-stream",
         headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type,
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def shape_png(path: Path, size=(48, 40)) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(img).ellipse((8, 6, 36, 32), fill=(220, 30, 30))
    img.save(path)
    return path


def test_server_binds_to_loopback_by_default():
    import inspect

    from mobilemllm.demo_server import DEFAULT_HOST, is_loopback, make_server

    assert inspect.signature(make_server).parameters["host"].default == DEFAULT_HOST == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_upload_checks_without_a_browser():
    from mobilemllm.demo_server import UploadError, decode_upload

    with pytest.raises(UploadError, match="not an image") as e:
        decode_upload(b"hello, not a picture", 1000)
    assert e.value.status == 400
    with pytest.raises(UploadError, match="accepts up to") as e:
        decode_upload(b"x" * 2000, 1000)
    assert e.value.status == 413
    with pytest.raises(UploadError, match="empty"):
        decode_upload(b"", 1000)


@pytest.mark.slow
def test_demo_http_api(server, tmp_path):
    from mobilemllm.runtime import run_bundle  # noqa: F401  (the same runner the page uses)

    info = json.loads(urllib.request.urlopen(server + "api/info", timeout=30).read())
    foreign = urllib.request.Request(server + "api/info", headers={"Host": "evil.example:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(foreign, timeout=30)
    assert refused.value.code == 403
    assert info["format"] == "executorch" and info["image_size"] == 32 and info["visual_tokens"] == 16
    code, body = post(server + "api/image", b"GIF89a not really")
    assert code == 400 and "not an image" in json.loads(body)["error"]
    code, body = post(server + "api/image", b"\x89PNG" + b"\0" * int(MAX_UPLOAD_MB * 1e6 + 10))
    assert code == 413 and "accepts up to 50 kB" in json.loads(body)["error"]
    code, body = post(server + "api/image", shape_png(tmp_path / "s.png").read_bytes(), "image/png")
    assert code == 200, body
    up = json.loads(body)
    assert (up["width"], up["height"]) == (48, 40) and up["model_view"].startswith("data:image/png;base64,")
    code, body = post(server + "api/ask", json.dumps({"image": up["id"], "question": "  "}).encode(),
                      "application/json")
    assert code == 400 and "type a question" in json.loads(body)["error"]
    code, body = post(server + "api/ask", json.dumps({"image": up["id"], "question": QUESTION,
                                                      "max_new_tokens": 6}).encode(), "application/json")
    assert code == 200
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["stats", "done"] and "error" not in kinds
    text = "".join(e["text"] for e in events if e["type"] == "text")
    assert text == events[-1]["text"]
    stats = events[-2]
    assert stats["ttft_ms"] > 0 and stats["prompt_tokens"] == 35 and 1 <= stats["generated_tokens"] <= 6


def chromium_driver(tmp_path: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    need_tool("selenium", webdriver is not None, "pip install -e '.[dev]' (selenium is in the dev extra)")
    need_tool("chromium", Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
              f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.mark.slow
def test_web_demo_in_headless_chromium(server, app_bundle, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mobilemllm.runtime import run_bundle

    image = shape_png(tmp_path / "shape.png")
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text with a .png name\n")
    too_large = tmp_path / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(too_large)
    assert too_large.stat().st_size > MAX_UPLOAD_MB * 1e6

    driver = chromium_driver(tmp_path)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server)
        wait.until(lambda d: "tiny" in d.find_element(By.ID, "model-info").text)
        assert "16 visual tokens" in driver.find_element(By.ID, "model-info").text

        # a good image, then a question: the answer streams in and the runner's stats appear
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: "uploaded" in d.find_element(By.ID, "upload-status").text)
        assert driver.find_element(By.ID, "model-view").is_displayed()
        driver.find_element(By.ID, "question").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "log").get_attribute("data-state") in ("done", "error"))
        error = driver.find_element(By.ID, "error")
        assert driver.find_element(By.ID, "log").get_attribute("data-state") == "done", error.text
        answer = driver.execute_script("const a = document.querySelectorAll('#log .a'); "
                                       "return a[a.length - 1].textContent;")
        stats = driver.find_element(By.ID, "stats")
        assert "time to first token" in stats.text and "decode" in stats.text
        assert float(stats.get_attribute("data-ttft-ms")) > 0
        assert float(stats.get_attribute("data-decode-tokens-per-s")) > 0
        shot = tmp_path / "web_demo.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        with Image.open(shot) as im:
            assert im.size[0] >= 800

        # the page shows exactly what ExecuTorch's runner generates for this image and question (greedy)
        direct = run_bundle(app_bundle, Image.open(image).convert("RGB"), QUESTION, max_new_tokens=12,
                            temperature=0.0, report=False)
        assert answer == direct.text and answer.strip(), (answer, direct.text)

        # a follow-up continues the conversation: the page keeps both turns, the answer is the runner's
        # second turn; "New conversation" clears the history
        from mobilemllm.runtime import open_runner

        conv = open_runner(app_bundle).conversation(image)
        conv.ask(QUESTION, max_new_tokens=12)
        follow_up = conv.ask(FOLLOW_UP, max_new_tokens=12).text
        driver.find_element(By.ID, "question").clear()
        driver.find_element(By.ID, "question").send_keys(FOLLOW_UP)
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .turn")) == 2
                   and d.find_element(By.ID, "log").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.ID, "log").get_attribute("data-state") == "done", error.text
        answers = driver.execute_script("return [...document.querySelectorAll('#log .a')].map(a => a.textContent);")
        assert answers == [direct.text, follow_up]
        assert "generated tokens" in driver.find_element(By.ID, "stats").text
        driver.find_element(By.ID, "new-chat").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#log .turn"))

        # bad uploads: a clear message on the page, nothing uploaded
        driver.find_element(By.ID, "file").send_keys(str(not_image))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not an image" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "file").send_keys(str(too_large))
        wait.until(lambda d: "accepts up to" in d.find_element(By.ID, "error").text)
        assert not driver.find_element(By.ID, "model-view").is_displayed()
        driver.save_screenshot(str(tmp_path / "web_demo_bad_upload.png"))
    finally:
        driver.quit()


def test_demo_command_rejects_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    from mobilemllm.cli import main

    code = main(["demo", "--bundle", str(tmp_path), "--port", "0"])
    _, err = capsys.readouterr()
    assert code == 2 and "no manifest.json" in err


def test_demo_static_files_ship_with_the_package():
    from importlib.resources import files

    web = files("mobilemllm").joinpath("web")
    for name in ("index.html", "app.js", "style.css"):
        assert web.joinpath(name).is_file(), name
    html = web.joinpath("index.html").read_text()
    for element in ('id="file"', 'id="question"', 'id="ask"', 'id="stats"', 'id="error"'):
        assert element in html


@pytest.mark.slow
def test_demo_command_serves_on_loopback(app_bundle):
    """`mobilemllm demo` as a user runs it: prints its URL (127.0.0.1, a free port) and answers /api/info."""
    import selectors
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mobilemllm", "demo", "--bundle", str(app_bundle), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 180
        line = ""
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1):
                line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line[line.index("http://"):].split()[0]
        info = json.loads(urllib.request.urlopen(url + "api/info", timeout=30).read())
        assert info["bundle"] == app_bundle.name and info["max_upload_bytes"] == 8_000_000
        page = urllib.request.urlopen(url, timeout=30).read().decode()
        assert "<title>mobilemllm demo</title>" in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- the HTTP API on an ONNX bundle (fast tier) --------------------------------------------------------
def events_of(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


def ask(url: str, image_id: str, question: str, **extra) -> list[dict]:
    code, body = post(url + "api/ask", json.dumps({"image": image_id, "question": question, **extra}).encode(),
                      "application/json")
    assert code == 200, body
    return events_of(body)


def upload(url: str, path: Path) -> str:
    code, body = post(url + "api/image", path.read_bytes(), "image/png")
    assert code == 200, body
    return json.loads(body)["id"]


def test_demo_follow_up_questions_continue_the_conversation(onnx_server, onnx_chat):
    from mobilemllm.runtime import open_runner

    conv = open_runner(onnx_chat.bundle).conversation(onnx_chat.image)
    want = [conv.ask(q, max_new_tokens=8).text for q in ("Is there a red square?", "What colour is it?")]
    image_id = upload(onnx_server, onnx_chat.image)
    first = ask(onnx_server, image_id, "Is there a red square?")
    second = ask(onnx_server, image_id, "What colour is it?")
    assert [first[0]["turn"], second[0]["turn"], second[-1]["turn"]] == [1, 2, 2]
    assert [first[-1]["text"], second[-1]["text"]] == want
    assert "".join(e["text"] for e in second if e["type"] == "text") == want[1]
    stats = second[-2]
    assert stats["type"] == "stats" and stats["reused_tokens"] > 0
    assert stats["prompt_tokens"] > first[-2]["prompt_tokens"]
    # another image is its own conversation; the first one continues where it was
    other = upload(onnx_server, onnx_chat.wide_image)
    assert ask(onnx_server, other, "Is there a red square?")[0]["turn"] == 1
    third = ask(onnx_server, image_id, "Where is the circle?")
    assert third[0]["turn"] == 3 and third[-1]["text"] == conv.ask("Where is the circle?", max_new_tokens=8).text
    # reset: the next question starts a new conversation about the same image
    code, body = post(onnx_server + "api/reset", json.dumps({"image": image_id}).encode(), "application/json")
    assert code == 200 and json.loads(body)["turns"] == 0
    again = ask(onnx_server, image_id, "Is there a red square?")
    assert again[0]["turn"] == 1 and again[-1]["text"] == want[0]
    # a conversation past the context: one error event that says what to do
    full = ask(onnx_server, image_id, "describe the shapes " * 80)
    assert [e["type"] for e in full][-1] == "error" and "start a new conversation" in full[-1]["message"]


def test_demo_keeps_a_bounded_number_of_conversations(onnx_server, onnx_chat):
    from mobilemllm.demo_server import KEEP_IMAGES

    ids = [upload(onnx_server, onnx_chat.image) for _ in range(KEEP_IMAGES + 1)]
    code, body = post(onnx_server + "api/ask", json.dumps({"image": ids[0], "question": "Hi?"}).encode(),
                      "application/json")
    assert code == 404 and "no longer on the server" in json.loads(body)["error"]
    assert ask(onnx_server, ids[-1], "Hi?")[-1]["type"] == "done"


def raw_request(url: str, head: bytes, body: bytes = b"", read_timeout: float = 10.0) -> bytes:
    """Send bytes as they are (no client-side checks) and read the answer until the server closes."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


@pytest.mark.parametrize("length_header, status, message", [
    (b"Content-Length: -1\r\n", 400, b"non-negative whole number"),
    (b"Content-Length: abc\r\n", 400, b"non-negative whole number"),
    (b"Content-Length: +5\r\n", 400, b"non-negative whole number"),
    (b"Content-Length: 5_0\r\n", 400, b"non-negative whole number"),
    (b"", 411, b"no Content-Length"),
    (b"Transfer-Encoding: chunked\r\n", 411, b"chunked"),
])
def test_demo_refuses_bad_content_lengths(onnx_server, length_header, status, message):
    host = onnx_server.split("//")[1].rstrip("/")
    head = b"POST /api/image HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + length_header + b"\r\n"
    response = raw_request(onnx_server, head, b"x" * 100)
    assert status_of(response) == status and message in response, response[:300]


def test_negative_length_does_not_buffer_the_body(onnx_server):
    """`Content-Length: -1` used to pass the size check and read the body until the client closed (into
    memory): now it is refused at once and the peak RSS of this process (the server runs in a thread of it)
    grows by far less than the 64 MiB the client tries to send."""
    import socket
    from urllib.parse import urlsplit

    from mobilemllm.procmem import peak_rss_bytes, release_memory, reset_peak_rss

    release_memory()
    if not reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    before = peak_rss_bytes()
    parts = urlsplit(onnx_server)
    chunk = b"\0" * (1 << 20)
    response = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST /api/image HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: -1\r\n\r\n".encode())
        try:
            for _ in range(64):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        try:
            while data := sock.recv(65536):
                response += data
        except ConnectionResetError:
            pass
    grown = peak_rss_bytes() - before
    assert status_of(response) == 400 or not response, response[:200]
    assert grown < 16 * 2**20, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    assert urllib.request.urlopen(onnx_server + "api/info", timeout=10).status == 200


def test_slow_clients_are_dropped_without_holding_up_others(onnx_server):
    """A client that stops mid-headers or mid-body holds only its own connection, and only for the idle
    timeout; other requests are answered meanwhile."""
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(onnx_server)
    stalled_headers = socket.create_connection((parts.hostname, parts.port), timeout=10)
    stalled_headers.sendall(b"POST /api/ask HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stalled_body = socket.create_connection((parts.hostname, parts.port), timeout=10)
    stalled_body.sendall(f"POST /api/ask HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 100\r\n\r\n{{".encode())
    try:
        t0 = time.monotonic()
        for _ in range(3):
            assert urllib.request.urlopen(onnx_server + "api/info", timeout=10).status == 200
        assert time.monotonic() - t0 < IDLE_TIMEOUT_S  # not queued behind the stalled clients
        answer = stalled_body.recv(65536)  # the server gives up on the body after the idle timeout
        assert status_of(answer) == 408 and time.monotonic() - t0 < 10 * IDLE_TIMEOUT_S
        assert stalled_headers.recv(65536) == b""  # dropped without an answer (no request to answer)
    finally:
        stalled_headers.close()
        stalled_body.close()


@pytest.mark.parametrize("origin, allowed", [
    (None, True), ("http://127.0.0.1:{port}", True), ("http://localhost:{port}", True),
    ("http://evil.example", False), ("http://127.0.0.1:1", False), ("null", False),
])
def test_demo_posts_only_from_its_own_page(onnx_server, origin, allowed):
    port = onnx_server.rstrip("/").rsplit(":", 1)[1]
    headers = {} if origin is None else {"Origin": origin.format(port=port)}
    code, body = post(onnx_server + "api/ask", json.dumps({"image": "x", "question": " "}).encode(),
                      "application/json", headers)
    if allowed:
        assert code == 400 and "type a question" in json.loads(body)["error"]
    else:
        assert code == 403 and "refused" in json.loads(body)["error"]


def test_demo_refuses_invalid_text_in_one_line(onnx_server):
    code, body = post(onnx_server + "api/ask", b'{"image": "x", "question": "red \\ud800 square"}',
                      "application/json")
    assert code == 400 and "unpaired UTF-16 surrogate" in json.loads(body)["error"]
    code, body = post(onnx_server + "api/ask", b"{not json", "application/json")
    assert code == 400 and "not valid JSON" in json.loads(body)["error"]
