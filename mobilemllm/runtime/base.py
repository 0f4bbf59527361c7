"""One interface for every bundle runner: open, ask about an image, follow up, reset, read the numbers.

    runner = open_runner("bundles/tiny-android")        # dispatches on manifest["format"] (RUNNERS)
    chat = runner.conversation(image)                   # the image, preprocessed as the manifest says
    first = chat.ask("What colour is the shape?", on_text=print)
    second = chat.ask("Where is it?")                   # continues from the runner's KV cache
    runner.generate(image, "What shape is it?")         # one turn on a fresh conversation

A runner holds one KV cache. Every turn is built as token ids of the whole conversation, exactly as
training builds it (:mod:`.conversation`); the runner prefills only what its cache does not already hold
(the ids in the cache are a prefix of the conversation's) and otherwise starts the cache again. So a
follow-up costs only its own tokens, a different image or an edited history re-prefills, and either way
the answer is the one eager generation gives for the same conversation.

Subclasses implement :meth:`Runner._load`, :meth:`Runner._reset_cache` and :meth:`Runner._run` (prefill
some ids after the cache, then sample). Sampling parameters a runner cannot honour are refused with a
:class:`~mobilemllm.errors.UserError` (:meth:`Runner.check_sampling`), never dropped.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from PIL import Image

from mobilemllm.bundle import load_manifest
from mobilemllm.bundle.app_inputs import check_preprocessing
from mobilemllm.data.images import load_image, to_rgb
from mobilemllm.data.tokenizer import load_tokenizer
from mobilemllm.errors import BackendUnavailable, UserError
from mobilemllm.inference import TextStream
from mobilemllm.runtime.conversation import conversation_ids
from mobilemllm.runtime.rates import wall_rates

# manifest["format"] -> "module:Class" of its runner (imported on first use).
RUNNERS: dict[str, str] = {
    "executorch": "mobilemllm.runtime.executorch_runner:ExecuTorchRunner",
    "onnx": "mobilemllm.runtime.onnx_runner:OnnxBundleRunner",
    "coreml": "mobilemllm.runtime.base:CoreMLUnavailable",
    "gguf": "mobilemllm.runtime.llamacpp_runner:LlamaCppRunner",
}
MAX_STOP_STRINGS = 8


class ContextFull(UserError):
    """The conversation no longer fits the bundle's context: start a new one."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``top_p=None``: the runner's own rule (1.0, or ExecuTorch's fixed 0.9)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def of(cls, **kw: Any) -> "Sampling":
        """Sampling from keyword arguments, every value checked (a UserError names each bad one)."""
        unknown = sorted(set(kw) - {"max_new_tokens", "temperature", "top_p", "seed", "stop"})
        if unknown:
            raise UserError(f"unknown sampling parameter(s) {', '.join(unknown)}; valid: max_new_tokens, "
                            "temperature, top_p, seed, stop")
        kw = {k: v for k, v in kw.items() if v is not None or k in ("top_p", "seed")}
        if isinstance(kw.get("stop"), str):
            kw["stop"] = (kw["stop"],)
        s = cls(**{k: (tuple(v) if k == "stop" else v) for k, v in kw.items()})
        s.check()
        return s

    def check(self) -> None:
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or \
                not 0.0 <= self.temperature <= 100.0:
            problems.append(f"temperature must be a number from 0 to 100 (got {self.temperature!r})")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be a number in (0, 1] (got {self.top_p!r})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            problems.append(f"seed must be an integer (got {self.seed!r})")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be up to {MAX_STOP_STRINGS} non-empty strings (got {list(self.stop)!r})")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class RunResult:
    """One answer and its numbers; the same for every runner (rates from :mod:`.rates`)."""

    text: str
    prompt_tokens: int  # the whole conversation's prompt (what an OpenAI "usage" calls prompt tokens)
    generated_tokens: int  # tokens sampled for this answer (an end-of-turn token included)
    ttft_s: float  # start of the turn -> first answer token (image encoding and prefill included)
    prefill_tokens_per_s: float | None  # tokens prefilled this turn / their time (None: no rate)
    decode_tokens_per_s: float | None
    stats: dict[str, Any] = field(default_factory=dict)  # the runner's own stats, as it reports them
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop": end of turn or a stop string; "length": max_new_tokens or the context
    prefilled_tokens: int = 0  # tokens this turn computed (prompt_tokens minus those reused from the cache)
    context_tokens: int = 0  # positions the conversation fills after this answer

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens


def bundle_views(manifest: dict[str, Any], image) -> np.ndarray:
    """An image (PIL or path) -> uint8 views (V, 3, S, S) by ``manifest["preprocessing"]`` alone, as the apps
    make them (:mod:`mobilemllm.bundle.app_inputs`, whose integer resampler equals Pillow's; Pillow is faster)."""
    pre = manifest["preprocessing"]
    check_preprocessing(pre)
    img = to_rgb(load_image(image) if isinstance(image, (str, Path)) else image)
    if pre["aspect"] == "pad" and img.width != img.height:
        side = max(img.width, img.height)
        canvas = Image.new("RGB", (side, side), tuple(int(c) for c in pre["pad_color"]))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    s = int(pre["image_size"])

    def resized(size):
        return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)

    views = []
    if pre.get("hires", "direct") == "tiles":
        rows, cols = pre["tile_grid"]
        big = resized((cols * s, rows * s))
        views += [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    views.append(resized((s, s)))
    return np.stack([np.asarray(v, dtype=np.uint8).transpose(2, 0, 1) for v in views])


def resize_note(manifest: dict[str, Any], image, image_path=None) -> str | None:
    """What the runner does to an image of another size, in one line (None when it is used as is)."""
    pre = manifest["preprocessing"]
    s = pre["image_size"]
    if image.size == (s, s):
        return None
    name = f" {image_path}" if image_path else ""
    how = "padded to square and " if pre.get("aspect") == "pad" and image.width != image.height else ""
    return f"note: image{name} is {image.width}x{image.height}; {how}resized to {s}x{s} as the bundle expects"


@dataclass
class _Cache:
    """What the runner's KV cache holds: the image it encoded and the ids at its positions."""

    image: str
    ids: list[int]


class Conversation:
    """One image and the turns about it. :meth:`ask` answers the next question, continuing the cache."""

    def __init__(self, runner: "Runner", views: np.ndarray, history: Sequence[tuple[str, str]] = ()):
        self.runner = runner
        self.views = views
        self.image_key = hashlib.sha256(views.tobytes() + str(views.shape).encode()).hexdigest()
        self.turns: list[tuple[str, str]] = [(q, a) for q, a in history]

    def prompt_ids(self, question: str) -> list[int]:
        """The conversation's token ids up to the next answer (IMAGE_TOKEN_ID at the visual tokens)."""
        return conversation_ids(self.runner.manifest, self.runner.tokenizer, self.turns, question)

    def ask(self, question: str, *, on_text: Callable[[str], None] | None = None, deadline: float | None = None,
            **sampling: Any) -> RunResult:
        """Answer ``question`` after the turns so far; stream text to ``on_text``. Sampling keywords:
        max_new_tokens, temperature, top_p, seed, stop. At ``deadline`` (``time.monotonic()``) the answer
        stops as if it had reached max_new_tokens."""
        result = self.runner.answer(self, question, Sampling.of(**sampling), on_text, deadline)
        self.turns.append((question.strip(), result.text))
        return result

    def reset(self) -> None:
        """Forget the turns (the image stays): the next question starts a new conversation."""
        self.turns.clear()


class Runner:
    """A bundle's runner. Use :func:`open_runner`; subclasses implement the three ``_`` methods below."""

    format: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # keyword options this runner takes besides warn

    def __init__(self, bundle_dir: str | Path, manifest: dict[str, Any], *,
                 warn: Callable[[str], None] | None = None, **opts: Any):
        extra = sorted(k for k, v in opts.items() if v is not None and k not in self.options)
        if extra:
            raise UserError(f"option(s) {', '.join(extra)} do not apply to {manifest['format']} bundles"
                            + (f" (this runner takes: {', '.join(self.options)})" if self.options else ""))
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.warn = warn
        self.opts = opts
        self.tokenizer = load_tokenizer(self.bundle_dir / manifest["tokenizer"]["dir"])
        self.eos = set(int(e) for e in manifest["tokenizer"].get("eos_ids") or [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(int(self.tokenizer.eos_token_id))
        self.max_context = int(manifest["context"]["max_context_len"])
        self.loaded = False
        self._cache: _Cache | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ---- public --------------------------------------------------------------------------------------
    def load(self) -> "Runner":
        """Load the model now (otherwise the first question does); returns the runner."""
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def conversation(self, image, *, image_path=None, history: Sequence[tuple[str, str]] = ()) -> Conversation:
        """A conversation about ``image`` (PIL image or path); ``history``: earlier (question, answer) turns."""
        if isinstance(image, (str, Path)):
            image_path = image_path or image
            image = load_image(image)
        note = resize_note(self.manifest, image, image_path)
        if note and self.warn is not None:
            self.warn(note)
        return Conversation(self, bundle_views(self.manifest, image), history)

    def generate(self, image, text: str, *, on_text: Callable[[str], None] | None = None, image_path=None,
                 **sampling: Any) -> RunResult:
        """One answer about ``image`` on a new conversation."""
        return self.conversation(image, image_path=image_path).ask(text, on_text=on_text, **sampling)

    def reset(self) -> None:
        """Empty the KV cache: the next turn prefills its whole conversation."""
        with self._lock:
            self._cache = None
            if self.loaded:
                self._reset_cache()

    def stop(self) -> None:
        """Ask the running generation to stop after its next token (from any thread)."""
        self._stop.set()

    def describe(self) -> str:
        return f"{self.format} bundle"

    def check_sampling(self, sampling: Sampling) -> None:
        """Refuse sampling parameters this runner cannot honour (a UserError that says why)."""

    def close(self) -> None:
        self.loaded = False
        self._cache = None

    # ---- one turn ------------------------------------------------------------------------------------
    def answer(self, conv: Conversation, question: str, sampling: Sampling,
               on_text: Callable[[str], None] | None = None, deadline: float | None = None) -> RunResult:
        """The next answer of ``conv``: prefill what the cache lacks, sample, stream, time."""
        if not isinstance(question, str) or not question.strip():
            raise UserError("the question is empty; ask something about the image")
        self.check_sampling(sampling)
        want = conv.prompt_ids(question)
        if len(want) >= self.max_context:
            raise ContextFull(f"the conversation is {len(want)} tokens (with the image's "
                              f"{self.manifest['prompt']['num_visual_tokens']} visual tokens) but the bundle's "
                              f"context is {self.max_context}; "
                              + ("start a new conversation (a new image, or reset)" if conv.turns
                                 else "shorten the prompt"))
        max_new = min(sampling.max_new_tokens, self.max_context - len(want))
        with self._lock:
            self.load()
            cache = self._cache
            if cache is not None and cache.image == conv.image_key and len(cache.ids) < len(want) \
                    and want[:len(cache.ids)] == cache.ids:
                new = want[len(cache.ids):]
            else:
                self._cache = None
                self._reset_cache()
                new = want
            return self._turn(conv, want, new, max_new, sampling, on_text, deadline)

    def _turn(self, conv: Conversation, want: list[int], new: list[int], max_new: int, sampling: Sampling,
              on_text, deadline: float | None) -> RunResult:
        stream = TextStream(on_text, sampling.stop)
        sampled: list[int] = []  # every token the runner sampled (it feeds all but the last to its cache)
        answer: list[int] = []
        finish = ["length"]
        stamps: list[float] = []

        failed: list[BaseException] = []

        def on_token(token: int) -> bool:
            stamps.append(time.perf_counter())
            sampled.append(token)
            if finish[0] != "length" or failed:
                return True  # already decided (ExecuTorch ignores a stop asked during its first token)
            if token in self.eos:
                finish[0] = "stop"
                return True
            answer.append(token)
            try:
                if stream.update(self.tokenizer.decode(answer, skip_special_tokens=True)):
                    finish[0] = "stop"
                    return True
            except BaseException as e:  # on_text failed (a closed socket...): stop cleanly, raise it afterwards
                failed.append(e)
                return True
            return self._stop.is_set() or len(answer) >= max_new or (deadline is not None
                                                                      and time.monotonic() > deadline)

        self._stop.clear()
        self._cache = None  # unknown until the run completes
        t0 = time.perf_counter()
        stats = self._run(new, conv.views, max_new, sampling, on_token)
        t1 = time.perf_counter()
        self._cache = _Cache(conv.image_key, want + sampled[:-1])
        if failed:
            raise failed[0]
        text = stream.finish(self.tokenizer.decode(answer, skip_special_tokens=True))
        rates = wall_rates({**stats, "prompt_tokens": len(new)}, t0, stamps, t1)
        tokens = answer + ([sampled[len(answer)]] if finish[0] == "stop" and len(sampled) > len(answer)
                           and sampled[len(answer)] in self.eos else [])
        return RunResult(text=text, prompt_tokens=len(want), generated_tokens=len(tokens), ttft_s=rates["ttft_s"],
                         prefill_tokens_per_s=rates["prefill_tokens_per_s"],
                         decode_tokens_per_s=rates["decode_tokens_per_s"], stats=stats, tokens=tokens,
                         finish_reason=finish[0], prefilled_tokens=len(new),
                         context_tokens=len(self._cache.ids))

    # ---- for subclasses ------------------------------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _reset_cache(self) -> None:
        raise NotImplementedError

    def _run(self, ids: list[int], views: np.ndarray, max_new: int, sampling: Sampling,
             on_token: Callable[[int], bool]) -> dict[str, Any]:
        """Prefill ``ids`` (IMAGE_TOKEN_ID runs stand for ``views``' embeddings) after the cache, then sample up
        to ``max_new`` tokens, calling ``on_token(id)`` for each; stop as soon as it returns True. The cache
        must end up holding ``ids`` and every sampled token but the last. Returns the runner's stats."""
        raise NotImplementedError


class CoreMLUnavailable(Runner):
    format = "coreml"

    def __init__(self, bundle_dir, manifest, **opts):
        raise BackendUnavailable("Core ML bundles run only on Apple hardware (macOS/iOS); open it in the iOS demo app")


def open_runner(bundle_dir: str | Path, *, warn: Callable[[str], None] | None = None, **opts: Any) -> Runner:
    """The runner for the bundle at ``bundle_dir`` (manifest checked, files verified), not yet loaded.

    Options: ``providers`` (ONNX Runtime execution providers, in order) and ``threads`` where the runner
    takes them; ``warn`` receives one-line notes (an image that gets resized).
    """
    manifest = load_manifest(bundle_dir)
    fmt = manifest["format"]
    if fmt not in RUNNERS:
        raise UserError(f"bundle format {fmt!r} is not supported; this mobilemllm runs {', '.join(sorted(RUNNERS))}")
    module, name = RUNNERS[fmt].split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise BackendUnavailable(f"this mobilemllm cannot run {fmt} bundles ({e})") from None
    return cls(bundle_dir, manifest, warn=warn, **opts)
