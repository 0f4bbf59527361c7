"""`mobilemllm serve`: a bundle behind OpenAI's chat-completions API, on 127.0.0.1 by default.

- ``POST /v1/chat/completions``: one image (a data URL, or a file under ``--image-dir``) in the first user
  message, then alternating user/assistant messages; ``stream`` sends server-sent events in OpenAI's chunk
  format ending with ``data: [DONE]``. A follow-up request that repeats the conversation so far reuses the
  runner's KV cache for the part it already holds.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model (the bundle).
- ``GET /health``: ``{"status": "ok"}``.

One answer is generated at a time; up to ``max_queue`` more requests wait (each at most ``queue_timeout``
seconds, then 503) and further ones get 429 at once. An answer still running ``request_timeout`` seconds
after its request arrived stops with ``finish_reason: "length"``. Errors are OpenAI error objects; request
handling (timeouts, body limits, Host and Origin checks) is :mod:`mobilemllm.httpd`'s.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mobilemllm.errors import UserError
from mobilemllm.httpd import IDLE_TIMEOUT_S, HttpError, SafeHandler, bind, parse_json
from mobilemllm.runtime import ContextFull, open_runner
from mobilemllm.serve.openai_api import (ApiError, chunk, completion, error_body, image_loader, model_card, models_list,
                                         new_id, parse_chat_request, timings, usage_chunk)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
CHAT_PATH = "/v1/chat/completions"


class Gate:
    """One generation at a time; at most ``max_queue`` more requests wait, each up to ``wait_s`` seconds."""

    def __init__(self, max_queue: int, wait_s: float):
        self.max_queue = int(max_queue)
        self.wait_s = float(wait_s)
        self._run = threading.Lock()
        self._count = threading.Lock()
        self.admitted = 0  # running + waiting

    @contextmanager
    def turn(self):
        with self._count:
            if self.admitted >= 1 + self.max_queue:
                raise ApiError(f"the server is busy: one answer is running and {self.max_queue} request(s) are "
                               "waiting; try again shortly", 429, type="rate_limit_error", code="queue_full")
            self.admitted += 1
        try:
            if not self._run.acquire(timeout=self.wait_s):
                raise ApiError(f"the server is busy: this request waited {self.wait_s:.0f} s for its turn", 503,
                               type="server_error", code="queue_timeout")
            try:
                yield
            finally:
                self._run.release()
        finally:
            with self._count:
                self.admitted -= 1


class ServeState:
    """The runner and the server's limits."""

    def __init__(self, bundle: str | Path, *, model_name: str | None, max_tokens: int, max_queue: int,
                 queue_timeout: float, request_timeout: float, max_body_bytes: int, image_dir: str | Path | None,
                 **runner_opts: Any):
        self.bundle = Path(bundle)
        if image_dir is not None and not Path(image_dir).is_dir():
            raise UserError(f"--image-dir {image_dir} is not a folder")
        self.runner = open_runner(self.bundle, **runner_opts)
        self.model = model_name or self.bundle.resolve().name
        self.created = int(time.time())
        self.max_tokens = int(max_tokens)
        self.gate = Gate(max_queue, queue_timeout)
        self.request_timeout = float(request_timeout)
        self.max_body_bytes = int(max_body_bytes)
        self.load_image = image_loader(image_dir, self.max_body_bytes)
        self.runner.load()


class ApiHandler(SafeHandler):
    server_version = "mobilemllm-serve"
    state: ServeState  # set on the subclass made by make_server

    def fail(self, error: HttpError) -> None:
        headers = {"Retry-After": "1"} if error.status in (429, 503) else None
        self.send_json(error.status, error_body(error), headers)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self.host_ok():
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        s = self.state
        if path == "/v1/models":
            self.send_json(200, models_list(s.model, s.created))
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name == s.model:
                self.send_json(200, model_card(s.model, s.created))
            else:
                self.fail(ApiError(f"the model {name!r} does not exist; this server serves {s.model!r}", 404,
                                   param="model", code="model_not_found"))
        elif path == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.fail(ApiError(f"no endpoint GET {path}; see GET /v1/models and POST {CHAT_PATH}", 404,
                               code="unknown_url"))

    def do_POST(self) -> None:  # noqa: N802
        if not (self.host_ok() and self.origin_ok()):
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path != CHAT_PATH:
                self.close_connection = True
                raise ApiError(f"no endpoint POST {path}; this server has POST {CHAT_PATH}", 404, code="unknown_url")
            self._chat()
        except HttpError as e:
            if not getattr(self, "_streaming", False):
                self.fail(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stopped reading
        except Exception as e:  # a bug or a runner failure: an error object, and the traceback on stderr
            if not getattr(self, "_streaming", False):
                self.fail(ApiError(f"the runner failed: {e.__class__.__name__}: {e}", 500, type="server_error"))
            raise

    def do_PUT(self) -> None:  # noqa: N802
        self.fail(ApiError("method not allowed", 405, code="method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    # ---- one chat completion -----------------------------------------------------------------------------
    def _chat(self) -> None:
        s = self.state
        deadline = time.monotonic() + s.request_timeout
        req = parse_json(self.read_body(s.max_body_bytes))
        chat = parse_chat_request(req, model=s.model, default_max_tokens=s.max_tokens, load_image=s.load_image)
        conv = s.runner.conversation(chat.image, history=chat.history)
        cid = new_id()
        self._streaming = False
        with s.gate.turn():
            if chat.stream:
                self._stream(cid, conv, chat, deadline)
            else:
                self.send_json(200, completion(cid, s.model, self._ask(conv, chat, deadline)))

    def _ask(self, conv, chat, deadline: float, on_text=None):
        try:
            return conv.ask(chat.question, on_text=on_text, deadline=deadline, **chat.sampling)
        except ContextFull as e:
            raise ApiError(str(e), param="messages", code="context_length_exceeded") from None
        except ApiError:
            raise
        except UserError as e:  # sampling this runner cannot honour, an empty question ...
            raise ApiError(str(e), code="unsupported_parameter") from None

    def _stream(self, cid: str, conv, chat, deadline: float) -> None:
        model = self.state.model

        def send(obj: Any) -> None:
            if not self._streaming:  # headers go out with the first piece: errors before it are plain answers
                self._streaming = True
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Accel-Buffering", "no")
                self.send_header("Connection", "close")
                self.end_headers()
                send(chunk(cid, model, {"role": "assistant", "content": ""}))
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            result = self._ask(conv, chat, deadline, on_text=lambda piece: send(chunk(cid, model, {"content": piece})))
        except HttpError as e:
            if not self._streaming:
                raise
            send(error_body(e))  # OpenAI's clients raise an APIError on an error event
            return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception as e:
            if not self._streaming:
                raise
            send({"error": {"message": f"the runner failed: {e.__class__.__name__}: {e}", "type": "server_error",
                            "param": None, "code": None}})
            raise

        send(chunk(cid, model, {}, result.finish_reason, timings=timings(result)))
        if chat.include_usage:
            send(usage_chunk(cid, model, result))
        send("[DONE]")


def make_server(bundle: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                model_name: str | None = None, max_tokens: int = 256, max_queue: int = 4,
                queue_timeout: float = 60.0, request_timeout: float = 300.0, idle_timeout: float = IDLE_TIMEOUT_S,
                max_body_mb: float = 20.0, image_dir: str | Path | None = None, verbose: bool = False,
                **runner_opts: Any):
    """A bound (not yet serving) OpenAI-compatible server for ``bundle``; ``port=0`` picks a free port."""
    for name, value in (("--max-body-mb", max_body_mb), ("--request-timeout", request_timeout),
                        ("--idle-timeout", idle_timeout), ("--queue-timeout", queue_timeout)):
        if value <= 0:
            raise UserError(f"{name} must be positive")
    if max_queue < 0:
        raise UserError("--max-queue must be 0 or more")
    state = ServeState(bundle, model_name=model_name, max_tokens=max_tokens, max_queue=max_queue,
                       queue_timeout=queue_timeout, request_timeout=request_timeout,
                       max_body_bytes=int(max_body_mb * 1e6), image_dir=image_dir, **runner_opts)
    handler = type("BoundApiHandler", (ApiHandler,), {"state": state})
    return bind(handler, host, port, verbose=verbose, idle_timeout=idle_timeout)
