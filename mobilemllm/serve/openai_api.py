"""OpenAI's chat-completions format: a request -> a conversation to run, a result -> a response or chunks.

Pure functions, no sockets: :func:`parse_chat_request` checks every field and raises :class:`ApiError`
(an OpenAI-style error object) for anything it cannot honour; :func:`completion` and :func:`chunk` write
the answers in the shapes OpenAI's clients read.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from mobilemllm.data.images import load_image
from mobilemllm.errors import UserError
from mobilemllm.httpd import HttpError, decode_image

MAX_STOP = 4  # as OpenAI
# Parameters that change nothing here and are accepted as sent.
HARMLESS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
            "parallel_tool_calls", "stream_options", "n", "modalities"}
# Parameters with a neutral value; anything else is refused (never silently ignored).
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "logprobs": False,
           "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
           "response_format": None, "audio": None, "prediction": None, "reasoning_effort": None,
           "verbosity": None, "web_search_options": None, "prompt_cache_retention": None, "moderation": None,
           "prompt_cache_options": None}
SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"}
KNOWN = {"model", "messages", "stream"} | SAMPLING | HARMLESS | set(NEUTRAL)


class ApiError(HttpError):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message, status, type=type, param=param, code=code)


def error_body(error: HttpError) -> dict[str, Any]:
    d = error.detail
    return {"error": {"message": str(error), "type": d.get("type") or "invalid_request_error",
                      "param": d.get("param"), "code": d.get("code")}}


@dataclass
class ChatRequest:
    image: Any  # PIL image
    history: list[tuple[str, str]]  # earlier (question, answer) turns
    question: str
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parts(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's content -> (its text, its image URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    texts, images = [], []
    for i, part in enumerate(content):
        here = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(f"{here}.image_url.url must be a string (a data: URL or a file path)",
                               param=f"{here}.image_url")
            images.append(url)
        else:
            raise ApiError(f"{here} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                           f"'image_url': {{'url': ...}}}}; got type {kind!r}", param=here)
    return "\n".join(t.strip() for t in texts if t.strip()), images


def parse_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]], str]:
    """messages -> (the image URL, earlier (question, answer) turns, the last question)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    turns: list[tuple[str, str]] = []
    image: str | None = None
    question: str | None = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(f"{where} must be an object with a role and content", param=where)
        role = msg["role"]
        if role in ("system", "developer"):
            raise ApiError(f"{where}: this model's prompt template has its own fixed system prompt; remove the "
                           f"{role} message", param=f"{where}.role", code="unsupported_role")
        if role not in ("user", "assistant"):
            raise ApiError(f"{where}.role {role!r} is not supported; use user and assistant messages",
                           param=f"{where}.role", code="unsupported_role")
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise ApiError(f"{where} is a {role} message; messages must alternate user, assistant, user, ... "
                           "and end with a user message", param="messages")
        text, images = _parts(msg.get("content"), where)
        if images and (role != "user" or i != 0 or len(images) > 1 or image is not None):
            raise ApiError(f"{where} has an image; a conversation takes one image, in its first user message "
                           "(a new image starts a new conversation: send a new request)", param=where,
                           code="too_many_images")
        if images:
            image = images[0]
        if role == "user":
            if not text:
                raise ApiError(f"{where} has no text; ask a question about the image", param=f"{where}.content")
            question = text
        else:
            turns.append((question, text))
    if messages[-1]["role"] != "user":
        raise ApiError("the last message must be a user message (the question to answer)", param="messages")
    return image, turns, question


def parse_sampling(req: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """The sampling fields -> Runner keywords; each wrong type or value names its parameter."""
    out: dict[str, Any] = {"max_new_tokens": default_max_tokens, "temperature": 0.0}
    for name in ("max_completion_tokens", "max_tokens"):
        v = req.get(name)
        if v is not None:
            if not _is_int(v) or v < 1:
                raise ApiError(f"{name} must be an integer >= 1 (got {v!r})", param=name, code="invalid_type")
            out["max_new_tokens"] = v
            break
    v = req.get("temperature")
    if v is not None:
        if not _is_number(v) or not 0 <= v <= 2:
            raise ApiError(f"temperature must be a number from 0 to 2 (got {v!r})", param="temperature",
                           code="invalid_type")
        out["temperature"] = float(v)
    v = req.get("top_p")
    if v is not None:
        if not _is_number(v) or not 0 < v <= 1:
            raise ApiError(f"top_p must be a number in (0, 1] (got {v!r})", param="top_p", code="invalid_type")
        out["top_p"] = float(v)
    v = req.get("seed")
    if v is not None:
        if not _is_int(v):
            raise ApiError(f"seed must be an integer (got {v!r})", param="seed", code="invalid_type")
        out["seed"] = v
    v = req.get("stop")
    if v is not None:
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not 0 < len(stops) <= MAX_STOP or \
                not all(isinstance(s, str) and s for s in stops):
            raise ApiError(f"stop must be a non-empty string or a list of up to {MAX_STOP} (got {v!r})",
                           param="stop", code="invalid_type")
        out["stop"] = tuple(stops)
    return out


def check_fields(req: dict[str, Any]) -> None:
    """Refuse unknown parameters and parameters this server would otherwise have to ignore."""
    for name in req:
        if name not in KNOWN:
            raise ApiError(f"unrecognized request argument {name!r}", param=name, code="unknown_parameter")
    for name, neutral in NEUTRAL.items():
        v = req.get(name)
        if v is not None and v != neutral and v != {} and v != []:
            raise ApiError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    n = req.get("n")
    if n is not None and n != 1:
        raise ApiError("n must be 1: this server generates one answer per request", param="n",
                       code="unsupported_parameter")
    modalities = req.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ApiError("modalities must be ['text']", param="modalities", code="unsupported_parameter")
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(f"stream must be true or false (got {stream!r})", param="stream", code="invalid_type")
    opts = req.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise ApiError("stream_options must be {'include_usage': true|false}", param="stream_options",
                       code="invalid_type")


def parse_chat_request(req: Any, *, model: str, default_max_tokens: int,
                       load_image: Callable[[str], Any]) -> ChatRequest:
    """A decoded JSON body -> a ChatRequest, or an ApiError."""
    if not isinstance(req, dict):
        raise ApiError("the request body must be a JSON object")
    check_fields(req)
    if not isinstance(req.get("model"), str):
        raise ApiError("model is required (a string; GET /v1/models lists it)", param="model")
    if req["model"] != model:
        raise ApiError(f"the model {req['model']!r} does not exist; this server serves {model!r}", 404,
                       param="model", code="model_not_found")
    sampling = parse_sampling(req, default_max_tokens)
    url, history, question = parse_messages(req.get("messages"))
    if url is None:
        raise ApiError("the first user message needs an image (a content part {'type': 'image_url', "
                       "'image_url': {'url': 'data:image/png;base64,...'}})", param="messages",
                       code="image_required")
    stream = bool(req.get("stream", False))
    include_usage = bool((req.get("stream_options") or {}).get("include_usage", False))
    return ChatRequest(load_image(url), history, question, sampling, stream, include_usage)


# ---- images -----------------------------------------------------------------------------------------
def image_loader(image_dir: str | Path | None, max_bytes: int) -> Callable[[str], Any]:
    """URL -> PIL image: ``data:`` URLs always; ``file://`` URLs and paths only under ``image_dir``."""
    root = Path(image_dir).resolve() if image_dir else None

    def load(url: str):
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            if not head.endswith(";base64") or not payload:
                raise ApiError("image data URLs must be base64: data:image/png;base64,...", param="messages",
                               code="invalid_image")
            if len(payload) > max_bytes * 4 // 3 + 8:
                raise ApiError(f"the image is larger than this server's {max_bytes // 1_000_000} MB limit",
                               413, param="messages", code="image_too_large")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError("the image data URL is not valid base64", param="messages",
                               code="invalid_image") from None
            return _as_api_error(lambda: decode_image(data, max_bytes, "the image"))
        if "://" in url and not url.startswith("file://"):
            raise ApiError(f"this server does not fetch {url.split('://')[0]} URLs; send the image as a data URL "
                           "(data:image/png;base64,...)", param="messages", code="invalid_image")
        return _as_api_error(lambda: _local_image(root, _file_path(url)))

    return load


def _file_path(url: str) -> str:
    """A ``file://`` URL (or a plain path) -> the path it names."""
    if not url.startswith("file://"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ApiError(f"file URLs must name a local file (file:///path), not host {parsed.netloc!r}",
                       param="messages", code="invalid_image")
    return unquote(parsed.path)


def _local_image(root: Path | None, path: str):
    if root is None:
        raise ApiError("local image files are off; send the image as a data URL, or start the server with "
                       "--image-dir DIR to allow files under DIR", param="messages", code="invalid_image")
    p = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if not p.is_relative_to(root):
        raise ApiError(f"{path} is outside the server's --image-dir {root}", 403, type="permission_error",
                       param="messages", code="image_outside_image_dir")
    return load_image(p)


def _as_api_error(fn: Callable[[], Any]):
    try:
        return fn()
    except ApiError:
        raise
    except HttpError as e:
        raise ApiError(str(e), e.status, param="messages", code=e.detail.get("code") or "invalid_image") from None
    except UserError as e:  # load_image's messages: missing, unreadable, too many pixels
        raise ApiError(str(e), param="messages", code="invalid_image") from None


# ---- answers ----------------------------------------------------------------------------------------
def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": result.reused_tokens}}


def timings(result: Any) -> dict[str, Any]:
    """The runner's numbers (an extension field, like llama.cpp's ``timings``)."""
    return {"ttft_ms": round(result.ttft_s * 1000.0, 2), "prefill_tokens_per_s": result.prefill_tokens_per_s,
            "decode_tokens_per_s": result.decode_tokens_per_s}


def completion(cid: str, model: str, result: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result), "timings": timings(result)}


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def usage_chunk(cid: str, model: str, result: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [], "usage": usage(result)}


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "mobilemllm"}
