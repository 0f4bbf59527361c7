"""What the local HTTP servers (`mobilemllm demo`, `mobilemllm serve`) share: careful request handling.

- Bodies need a plain ``Content-Length`` (digits only): a missing one is 411, a negative or malformed one
  400, one over the limit 413 (small refused bodies are drained so the client reads the answer), and
  the body must arrive within :attr:`SafeHandler.body_deadline_s`.
- Every connection has a socket timeout (:attr:`SafeHandler.timeout`): an idle or stalled client is
  dropped, and each connection has its own thread, so it never holds up the others. At most
  ``max_connections`` are open at once; more are answered 503 and closed.
- On loopback, requests must name a loopback host (no DNS rebinding), and a POST from a browser must come
  from the server's own origin (``http://127.0.0.1:PORT``, ``http://localhost:PORT``); requests without an
  ``Origin`` header (curl, SDKs) are accepted.
- Strings with unpaired UTF-16 surrogates are refused with one message (:func:`check_text`).
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, UnidentifiedImageError

from mobilemllm.data.images import to_rgb
from mobilemllm.errors import UserError

IDLE_TIMEOUT_S = 30.0
BODY_DEADLINE_S = 60.0
MAX_CONNECTIONS = 32
DRAIN_LIMIT = 256 * 1024 * 1024  # a refused body up to this size is read and dropped before answering
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them whole
_DIGITS = re.compile(r"[0-9]{1,15}")


class HttpError(UserError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, **detail: Any):
        super().__init__(message)
        self.status = int(status)
        self.detail = detail  # extra fields for the server's error object (OpenAI: type, param, code)


def human_size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def decode_image(data: bytes, max_bytes: int, what: str = "the upload"):
    """Bytes of an image file -> RGB PIL image, or an HttpError that says what is wrong."""
    if not data:
        raise HttpError(f"{what} is empty; send an image file (PNG, JPEG, WebP, ...)", code="invalid_image")
    if len(data) > max_bytes:
        raise HttpError(f"the image is {human_size(len(data))}; this server accepts up to {human_size(max_bytes)} "
                        "(start it with a larger --max-upload-mb, or shrink the image)",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise HttpError(f"the image is {im.width}x{im.height} pixels; this server accepts up to "
                                f"{MAX_PIXELS // 1_000_000} megapixels", HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                code="image_too_large")
            im.load()
            return to_rgb(im).copy()
    except HttpError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        kind = "not an image" if isinstance(e, UnidentifiedImageError) else f"a damaged image ({e})"
        raise HttpError(f"{what} is {kind}: send a PNG, JPEG, WebP, BMP or GIF picture", code="invalid_image") from None


def check_text(value: Any, where: str = "the request") -> None:
    """Refuse strings (anywhere in a JSON value) that cannot be UTF-8: unpaired surrogates such as \\ud800."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(f"{where} has text with an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not "
                            "valid Unicode; send UTF-8 text", code="invalid_text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, where)
    elif isinstance(value, list):
        for v in value:
            check_text(v, where)


def parse_json(body: bytes) -> Any:
    """A request body -> a JSON value with valid text, or an HttpError."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    check_text(value)
    return value


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


class SafeHandler(BaseHTTPRequestHandler):
    """A request handler with the checks above; subclasses answer errors in their own format (:meth:`fail`)."""

    timeout = IDLE_TIMEOUT_S  # socket timeout per connection (StreamRequestHandler applies it)
    body_deadline_s = BODY_DEADLINE_S

    def setup(self) -> None:
        self.timeout = getattr(self.server, "idle_timeout", self.timeout)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # ---- answers -------------------------------------------------------------------------------------
    def send_body(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_body(status, json.dumps(obj).encode(), "application/json", headers)

    def fail(self, error: HttpError) -> None:
        """Answer a refused request (the demo: ``{"error": message}``)."""
        self.send_json(error.status, {"error": str(error)})

    # ---- checks --------------------------------------------------------------------------------------
    def host_ok(self) -> bool:
        """On loopback, answer only requests addressed to a loopback name: a web page elsewhere cannot reach
        the server through a DNS name that resolves to 127.0.0.1 (DNS rebinding)."""
        if not getattr(self.server, "loopback_only", False):
            return True
        host = self._host_name()
        if is_loopback(host):
            return True
        self.close_connection = True
        self.fail(HttpError(f"this server answers only on 127.0.0.1/localhost, not {host!r}", 403,
                            type="permission_error", code="bad_host"))
        return False

    def _host_name(self) -> str:
        host = (self.headers.get("Host") or "").strip()
        if host.startswith("["):
            return host[1:host.find("]")] if "]" in host else host
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def origin_ok(self) -> bool:
        """A state-changing request from a browser must come from this server's own page."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True  # not a browser (curl, SDKs): nothing to forge
        port = self.server.server_address[1]
        allowed = {f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"}
        if not getattr(self.server, "loopback_only", False):
            allowed.add(f"http://{(self.headers.get('Host') or '').strip().lower()}")
        if origin.strip().lower().rstrip("/") in allowed:
            return True
        self.close_connection = True
        self.fail(HttpError(f"requests from the web page at {origin!r} are refused; only this server's own page "
                            f"(http://127.0.0.1:{port}) may send them", 403, type="permission_error",
                            code="bad_origin"))
        return False

    def read_body(self, limit: int, what: str = "the request body", hint: str = "") -> bytes:
        """The body, at most ``limit`` bytes, arriving within ``body_deadline_s``; HttpError otherwise
        (``hint``: what to do about a body that is too large)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError("send the body with a Content-Length (chunked transfer is not accepted)", 411,
                            code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HttpError("the request has no Content-Length", 411, code="length_required")
        if not _DIGITS.fullmatch(length.strip()):
            self.close_connection = True
            raise HttpError(f"bad Content-Length {length[:40]!r}: it must be a non-negative whole number", 400,
                            code="bad_length")
        n = int(length)
        if n > limit:
            self._drain(n)
            raise HttpError(f"{what} is {human_size(n)}; this server accepts up to {human_size(limit)}"
                            + (f" ({hint})" if hint else ""), HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="too_large")
        return self._read_exactly(n)

    def _read_exactly(self, n: int) -> bytes:
        deadline = time.monotonic() + self.body_deadline_s
        parts, got = [], 0
        try:
            while got < n:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(n - got, 1 << 16))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise HttpError(f"the request body did not arrive within {self.body_deadline_s:.0f} s", 408,
                            code="timeout") from None
        if got < n:
            self.close_connection = True
            raise HttpError(f"the request body ended after {got} of {n} bytes", 400, code="bad_length")
        return b"".join(parts)

    def _drain(self, n: int) -> None:
        """Read and drop a refused body, so the browser gets to read our answer (up to a bound)."""
        if n > DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            self._read_exactly(n)
        except HttpError:
            pass


class LocalServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads and at most ``max_connections`` connections at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, handler, *, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT_S, verbose: bool = False):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.verbose = verbose
        self.loopback_only = is_loopback(str(address[0]))
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            body = b'{"error": "too many connections; try again later"}'
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def bind(handler, host: str, port: int, **kw: Any) -> LocalServer:
    """A bound (not yet serving) server, or a UserError naming the fix."""
    try:
        return LocalServer((host, port), handler, **kw)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                        "(0 chooses a free one)") from None
