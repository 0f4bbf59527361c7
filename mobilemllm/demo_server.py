"""The local web demo: a small page on 127.0.0.1 to try a bundle without a phone.

Upload an image, ask about it, and read the answer as ExecuTorch's runner streams it, with the same
numbers the phone apps show (time to first token, decode tokens/s, from the runner's own stats). The
answers come from :func:`mobilemllm.runtime.run_bundle`, the C++ MultimodalRunner the apps use.

Endpoints (JSON unless said otherwise):

- ``GET /`` ``/app.js`` ``/style.css``: the page (``mobilemllm/web/``).
- ``GET /api/info``: the bundle's model, target, image size, template, limits.
- ``POST /api/image``: the raw image file as the body (any type Pillow reads). Answers
  ``{"id", "width", "height", "model_view"}`` (``model_view``: a PNG data URL of what the vision encoder
  gets, made by :mod:`mobilemllm.bundle.app_inputs` like the apps make it) or ``{"error": ...}`` with 400
  (not an image), 411 (no length), 413 (too large).
- ``POST /api/ask`` ``{"image": id, "question": str, "max_new_tokens"?: int, "temperature"?: float}``:
  a ``text/event-stream`` of ``data: {"type": "text", "text": ...}`` pieces, then one ``stats`` event
  (``ttft_ms``, ``decode_tokens_per_s``, ``prefill_tokens_per_s``, ``prompt_tokens``,
  ``generated_tokens``) and ``done``; or ``{"type": "error", "message": ...}``.

Only one answer is generated at a time (the runner holds the whole model); others wait their turn.
The server binds to loopback unless ``--host`` says otherwise.
"""

from __future__ import annotations

import base64
import inspect
import io
import ipaddress
import json
import threading
import uuid
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mobilemllm.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 8.0
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them whole
MAX_QUESTION_CHARS = 2000
KEEP_IMAGES = 16  # uploaded images kept in memory (oldest dropped first)
DRAIN_LIMIT = 256 * 1024 * 1024  # a refused upload up to this size is read and dropped before answering
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


class UploadError(UserError):
    """An uploaded file the demo cannot use; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def human_size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def decode_upload(data: bytes, max_bytes: int):
    """Bytes of an uploaded file -> RGB PIL image, or an UploadError that says what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError("the upload is empty; choose an image file (PNG, JPEG, WebP, ...)")
    if len(data) > max_bytes:
        raise UploadError(f"the image is {human_size(len(data))}; this demo accepts up to {human_size(max_bytes)} "
                          "(start it with a larger --max-upload-mb, or shrink the image)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UploadError(f"the image is {im.width}x{im.height} pixels; this demo accepts up to "
                                  f"{MAX_PIXELS // 1_000_000} megapixels", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            im.load()
            return im.convert("RGB")
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        kind = "not an image" if isinstance(e, UnidentifiedImageError) else f"a damaged image ({e})"
        raise UploadError(f"the file is {kind}: upload a PNG, JPEG, WebP, BMP or GIF picture") from None


class DemoState:
    """The bundle, its manifest, the uploaded images, and the lock that serialises generation."""

    def __init__(self, bundle: str | Path, *, max_upload_bytes: int, max_new_tokens: int):
        from mobilemllm.bundle import load_manifest

        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle)
        if self.manifest["format"] != "executorch":
            raise UserError(f"{bundle} is a {self.manifest['format']} bundle; the web demo runs ExecuTorch bundles "
                            "(export one with `mobilemllm export --target android --model CKPT --out DIR`)")
        if self.manifest["export"].get("backend") == "coreml":
            raise UserError(f"{bundle} uses ExecuTorch's Core ML delegate, which runs only on Apple hardware; for the "
                            "web demo export --target android (XNNPACK) or --target portable")
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_new_tokens = int(max_new_tokens)
        self.images: OrderedDict[str, Any] = OrderedDict()
        self.images_lock = threading.Lock()
        self.run_lock = threading.Lock()
        from mobilemllm.runtime import run_bundle

        self.run = run_bundle
        warm_up()
        # run_bundle prints its own summary for the CLI unless told not to
        self.run_kwargs = {"report": False} if "report" in inspect.signature(run_bundle).parameters else {}

    def info(self) -> dict[str, Any]:
        m = self.manifest
        pre = m["preprocessing"]
        return {
            "bundle": self.bundle.name,
            "model": m["model"]["name"],
            "format": m["format"],
            "target": m["target"],
            "image_size": pre["image_size"],
            "views": pre.get("views", 1),
            "template": m["prompt"]["template"],
            "visual_tokens": m["prompt"]["num_visual_tokens"],
            "max_context_len": m["context"]["max_context_len"],
            "quantization": {k: v.get("scheme") for k, v in m.get("quantization", {}).items()},
            "max_upload_bytes": self.max_upload_bytes,
            "max_new_tokens": self.max_new_tokens,
        }

    def add_image(self, data: bytes) -> dict[str, Any]:
        from PIL import Image

        from mobilemllm.bundle.app_inputs import image_views, pixels_of

        img = decode_upload(data, self.max_upload_bytes)
        views = image_views(pixels_of(img), self.manifest["preprocessing"])
        buf = io.BytesIO()
        Image.fromarray(views[-1].transpose(1, 2, 0)).save(buf, format="PNG")
        image_id = uuid.uuid4().hex
        with self.images_lock:
            self.images[image_id] = img
            while len(self.images) > KEEP_IMAGES:
                self.images.popitem(last=False)
        return {"id": image_id, "width": img.width, "height": img.height,
                "model_view": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}

    def image(self, image_id: str):
        with self.images_lock:
            img = self.images.get(image_id)
        if img is None:
            raise UploadError("that image is no longer on the server (it keeps the last "
                              f"{KEEP_IMAGES}); upload it again")
        return img


def warm_up() -> None:
    """Import the runner's libraries now, so the first question does not wait for torch + ExecuTorch."""
    try:
        import executorch.extension.llm.runner  # noqa: F401

        from mobilemllm.runtime.executorch_runner import load_kernels

        load_kernels()
    except ImportError:
        pass  # run_bundle reports a missing backend clearly when a question comes


def parse_ask(body: bytes, state: DemoState) -> tuple[str, str, int, float]:
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UploadError("the request is not JSON") from None
    if not isinstance(req, dict):
        raise UploadError("the request must be a JSON object")
    question = str(req.get("question") or "").strip()
    if not question:
        raise UploadError("type a question about the image first")
    if len(question) > MAX_QUESTION_CHARS:
        raise UploadError(f"the question is {len(question)} characters; keep it under {MAX_QUESTION_CHARS}")
    image_id = str(req.get("image") or "")
    if not image_id:
        raise UploadError("upload an image first")
    try:
        max_new = int(req.get("max_new_tokens") or state.max_new_tokens)
        temperature = float(req.get("temperature") or 0.0)
    except (TypeError, ValueError):
        raise UploadError("max_new_tokens must be an integer and temperature a number") from None
    if not 1 <= max_new <= 4096:
        raise UploadError("max_new_tokens must be between 1 and 4096")
    if not 0.0 <= temperature <= 5.0:
        raise UploadError("temperature must be between 0 and 5")
    return image_id, question, max_new, temperature


def stats_event(result: Any) -> dict[str, Any]:
    """The runner's numbers (RunResult from run_bundle) as the page shows them."""
    def num(name: str) -> float | None:
        v = getattr(result, name, None)
        return None if v is None else float(v)

    ttft = num("ttft_s")
    return {"type": "stats",
            "ttft_ms": None if ttft is None else round(ttft * 1000.0, 1),
            "decode_tokens_per_s": num("decode_tokens_per_s"),
            "prefill_tokens_per_s": num("prefill_tokens_per_s"),
            "prompt_tokens": getattr(result, "prompt_tokens", None),
            "generated_tokens": getattr(result, "generated_tokens", None)}


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "mobilemllm-demo"
    state: DemoState  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ---- helpers -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise UploadError("the request has no Content-Length", HTTPStatus.LENGTH_REQUIRED)
        try:
            n = int(length)
        except ValueError:
            raise UploadError("bad Content-Length") from None
        if n > limit:
            self._drain(n)
            raise UploadError(f"the image is {human_size(n)}; this demo accepts up to {human_size(limit)} "
                              "(start it with a larger --max-upload-mb, or shrink the image)",
                              HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(n)

    def _drain(self, n: int) -> None:
        """Read and drop a refused body, so the browser gets to read our answer (up to a bound)."""
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def _host_ok(self) -> bool:
        """On loopback, answer only requests addressed to a loopback name: a web page elsewhere cannot
        reach the demo through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""
        if not getattr(self.server, "loopback_only", False):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if is_loopback(host):
            return True
        self._json(403, {"error": f"this demo answers only on 127.0.0.1/localhost, not {host!r}"})
        return False

    # ---- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/info":
            self._json(200, self.state.info())
            return
        if path in STATIC:
            from importlib.resources import files

            name, ctype = STATIC[path]
            self._send(200, files("mobilemllm").joinpath("web", name).read_bytes(), ctype)
            return
        self._json(404, {"error": f"no page {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        try:
            if path == "/api/image":
                self._json(200, self.state.add_image(self._body(self.state.max_upload_bytes)))
            elif path == "/api/ask":
                self._ask(*parse_ask(self._body(64 * 1024), self.state))
            else:
                self._json(404, {"error": f"no endpoint {path}"})
        except UploadError as e:
            self._json(e.status, {"error": str(e)})

    def _ask(self, image_id: str, question: str, max_new_tokens: int, temperature: float) -> None:
        img = self.state.image(image_id)
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
                event({"type": "start"})
                result = self.state.run(self.state.bundle, img, question, max_new_tokens=max_new_tokens,
                                        temperature=temperature, on_text=lambda t: event({"type": "text", "text": t}),
                                        **self.state.run_kwargs)
            event(stats_event(result))
            event({"type": "done", "text": getattr(result, "text", None)})
        except (BrokenPipeError, ConnectionResetError):
            return  # the page went away; nothing to tell it
        except UserError as e:
            event({"type": "error", "message": str(e)})
        except Exception as e:  # a runner failure: show it on the page, keep the server up
            event({"type": "error", "message": f"the runner failed: {e.__class__.__name__}: {e}"})
            raise


def make_server(bundle: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_new_tokens: int = 64,
                verbose: bool = False) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) demo server; ``port=0`` picks a free port (see ``server_address``)."""
    if max_upload_mb <= 0:
        raise UserError("--max-upload-mb must be positive")
    state = DemoState(bundle, max_upload_bytes=int(max_upload_mb * 1e6), max_new_tokens=max_new_tokens)
    handler = type("BoundDemoHandler", (DemoHandler,), {"state": state})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                        "(0 chooses a free one)") from None
    server.daemon_threads = True
    server.verbose = verbose  # type: ignore[attr-defined]
    server.loopback_only = is_loopback(host)  # type: ignore[attr-defined]
    return server


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    if ":" in str(host):
        host = f"[{host}]"
    return f"http://{host}:{port}/"
