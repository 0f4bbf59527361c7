"""The local web demo: a small page on 127.0.0.1 to chat with a bundle about an image, without a phone.

Upload an image, ask about it, ask follow-ups, and read the answers as the runner streams them, with the
numbers the phone apps show (time to first token, decode tokens/s). The answers come from the bundle's
:class:`~mobilemllm.runtime.base.Runner` (ExecuTorch's C++ MultimodalRunner, as the apps use, or ONNX
Runtime): each uploaded image is a conversation, and a follow-up continues from the runner's KV cache.

Endpoints (JSON unless said otherwise):

- ``GET /`` ``/app.js`` ``/style.css``: the page (``mobilemllm/web/``).
- ``GET /api/info``: the bundle's model, target, image size, template, limits.
- ``POST /api/image``: the raw image file as the body (any type Pillow reads). Answers
  ``{"id", "width", "height", "model_view"}`` (``model_view``: a PNG data URL of what the vision encoder
  gets, preprocessed from the manifest like the apps do) or ``{"error": ...}`` with 400 (not an image, a
  bad Content-Length), 411 (no Content-Length), 413 (too large). The image starts a new conversation.
- ``POST /api/ask`` ``{"image": id, "question": str, "max_new_tokens"?: int, "temperature"?: float}``:
  the next turn of that image's conversation, as a ``text/event-stream`` of ``data: {"type": "text",
  "text": ...}`` pieces, then one ``stats`` event (``ttft_ms``, ``decode_tokens_per_s``,
  ``prefill_tokens_per_s``, ``prompt_tokens``, ``generated_tokens``, ``reused_tokens``) and ``done``
  (``text``, ``turn``); or ``{"type": "error", "message": ...}`` (a full context says to start again).
- ``POST /api/reset`` ``{"image": id}``: forget that image's turns (the next question starts afresh).

Only one answer is generated at a time (the runner holds the whole model); others wait their turn. The
last ``KEEP_IMAGES`` conversations are kept. The server binds to loopback unless ``--host`` says otherwise;
request handling (timeouts, body limits, Host and Origin checks) is :mod:`mobilemllm.httpd`'s.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from mobilemllm.errors import UserError
from mobilemllm.httpd import IDLE_TIMEOUT_S, HttpError, SafeHandler, bind, decode_image, is_loopback, parse_json, url_of
from mobilemllm.runtime import open_runner

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DemoState", "UploadError", "decode_upload", "is_loopback",
           "make_server", "url_of"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 8.0
MAX_QUESTION_CHARS = 2000
MAX_ASK_BYTES = 64 * 1024
KEEP_IMAGES = 16  # conversations kept in memory (oldest dropped first)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}

UploadError = HttpError  # the name the demo's callers know


def decode_upload(data: bytes, max_bytes: int):
    """Bytes of an uploaded file -> RGB PIL image, or an UploadError that says what is wrong."""
    return decode_image(data, max_bytes, "the file" if data else "the upload")


class DemoState:
    """The bundle's runner, the conversations by image id, and the lock that serialises generation."""

    def __init__(self, bundle: str | Path, *, max_upload_bytes: int, max_new_tokens: int, **runner_opts: Any):
        self.bundle = Path(bundle)
        self.runner = open_runner(self.bundle, **runner_opts)
        self.manifest = self.runner.manifest
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_new_tokens = int(max_new_tokens)
        self.conversations: OrderedDict[str, Any] = OrderedDict()
        self.conversations_lock = threading.Lock()
        self.run_lock = threading.Lock()
        self.runner.load()  # the first question should not wait for the model to load

    def info(self) -> dict[str, Any]:
        m = self.manifest
        pre = m["preprocessing"]
        return {
            "bundle": self.bundle.name,
            "model": m["model"]["name"],
            "format": m["format"],
            "target": m["target"],
            "runner": self.runner.describe(),
            "image_size": pre["image_size"],
            "views": pre.get("views", 1),
            "template": m["prompt"]["template"],
            "visual_tokens": m["prompt"]["num_visual_tokens"],
            "max_context_len": m["context"]["max_context_len"],
            "quantization": {k: v.get("scheme") for k, v in m.get("quantization", {}).items()},
            "max_upload_bytes": self.max_upload_bytes,
            "max_new_tokens": self.max_new_tokens,
            "keep_images": KEEP_IMAGES,
        }

    def add_image(self, data: bytes) -> dict[str, Any]:
        img = decode_upload(data, self.max_upload_bytes)
        conv = self.runner.conversation(img)
        buf = io.BytesIO()
        Image.fromarray(conv.views[-1].transpose(1, 2, 0)).save(buf, format="PNG")
        image_id = uuid.uuid4().hex
        with self.conversations_lock:
            self.conversations[image_id] = conv
            while len(self.conversations) > KEEP_IMAGES:
                self.conversations.popitem(last=False)
        return {"id": image_id, "width": img.width, "height": img.height,
                "model_view": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}

    def conversation(self, image_id: str):
        with self.conversations_lock:
            conv = self.conversations.get(image_id)
            if conv is not None:
                self.conversations.move_to_end(image_id)
        if conv is None:
            raise HttpError(f"that image is no longer on the server (it keeps the last {KEEP_IMAGES}); "
                            "upload it again", 404)
        return conv


def parse_ask(req: Any, state: DemoState) -> tuple[str, str, int, float]:
    if not isinstance(req, dict):
        raise HttpError("the request must be a JSON object")
    question = req.get("question")
    question = question.strip() if isinstance(question, str) else ""
    if not question:
        raise HttpError("type a question about the image first")
    if len(question) > MAX_QUESTION_CHARS:
        raise HttpError(f"the question is {len(question)} characters; keep it under {MAX_QUESTION_CHARS}")
    image_id = req.get("image")
    if not isinstance(image_id, str) or not image_id:
        raise HttpError("upload an image first")
    max_new, temperature = req.get("max_new_tokens", state.max_new_tokens), req.get("temperature", 0.0)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 4096:
        raise HttpError("max_new_tokens must be a whole number from 1 to 4096")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 5.0:
        raise HttpError("temperature must be a number from 0 to 5")
    return image_id, question, max_new, float(temperature)


def stats_event(result: Any) -> dict[str, Any]:
    """The runner's numbers (a RunResult) as the page shows them."""
    return {"type": "stats",
            "ttft_ms": round(result.ttft_s * 1000.0, 1),
            "decode_tokens_per_s": result.decode_tokens_per_s,  # None (JSON null): no rate
            "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "prompt_tokens": result.prompt_tokens,
            "reused_tokens": result.reused_tokens,
            "generated_tokens": result.generated_tokens,
            "finish_reason": result.finish_reason}


class DemoHandler(SafeHandler):
    server_version = "mobilemllm-demo"
    state: DemoState  # set on the subclass made by make_server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/info":
            self.send_json(200, self.state.info())
            return
        if path in STATIC:
            name, ctype = STATIC[path]
            self.send_body(200, resources.files("mobilemllm").joinpath("web", name).read_bytes(), ctype)
            return
        self.send_json(404, {"error": f"no page {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not (self.host_ok() and self.origin_ok()):
            return
        path = self.path.split("?", 1)[0]
        try:
            if path == "/api/image":
                data = self.read_body(self.state.max_upload_bytes, "the image",
                                      "start the demo with a larger --max-upload-mb, or shrink the image")
                self.send_json(200, self.state.add_image(data))
            elif path == "/api/ask":
                self._ask(*parse_ask(parse_json(self.read_body(MAX_ASK_BYTES)), self.state))
            elif path == "/api/reset":
                req = parse_json(self.read_body(MAX_ASK_BYTES))
                conv = self.state.conversation(req.get("image") if isinstance(req, dict) else None)
                conv.reset()
                self.send_json(200, {"image": req["image"], "turns": 0})
            else:
                self.close_connection = True
                self.send_json(404, {"error": f"no endpoint {path}"})
        except HttpError as e:
            self.fail(e)

    def _ask(self, image_id: str, question: str, max_new_tokens: int, temperature: float) -> None:
        conv = self.state.conversation(image_id)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection closes

        def event(obj: dict[str, Any]) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            with self.state.run_lock:
                event({"type": "start", "turn": len(conv.turns) + 1})
                result = conv.ask(question, max_new_tokens=max_new_tokens, temperature=temperature,
                                  on_text=lambda t: event({"type": "text", "text": t}))
            event(stats_event(result))
            event({"type": "done", "text": result.text, "turn": len(conv.turns)})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return  # the page went away; nothing to tell it
        except UserError as e:
            event({"type": "error", "message": str(e)})
        except Exception as e:  # a runner failure: show it on the page, keep the server up
            event({"type": "error", "message": f"the runner failed: {e.__class__.__name__}: {e}"})
            raise


def make_server(bundle: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_new_tokens: int = 64, verbose: bool = False,
                idle_timeout: float | None = None, **runner_opts: Any):
    """A ready (bound, not yet serving) demo server; ``port=0`` picks a free port (see ``server_address``).

    ``runner_opts`` go to :func:`~mobilemllm.runtime.open_runner` (``providers``, ``threads``)."""
    if max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    state = DemoState(bundle, max_upload_bytes=int(max_upload_mb * 1e6), max_new_tokens=max_new_tokens,
                      **runner_opts)
    handler = type("BoundDemoHandler", (DemoHandler,), {"state": state})
    return bind(handler, host, port, verbose=verbose,
                idle_timeout=IDLE_TIMEOUT_S if idle_timeout is None else idle_timeout)
