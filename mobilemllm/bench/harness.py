"""Warm-up runs, then N timed repetitions of one case (a backend + a bundle or checkpoint).

A backend implements :class:`Backend`: ``load()`` (timed here), ``prepare()`` (build the request, check it
fits) and ``run_once()`` (one request: image encode, prefill, ``new_tokens`` decode steps with EOS
ignored) returning a :class:`Repetition`. The harness owns what is common: timing the load, resetting
and reading peak memory, warm-ups, repeats, checking every run decoded the requested count, and the
roofline figures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from mobilemllm.bench import timing
from mobilemllm.bench.prompt import BenchPrompt


@dataclass
class Repetition:
    """One timed request. Times in seconds; ``image_encode_s`` None where the runtime times it inside prefill."""

    prefill_tokens: int  # text + visual tokens the LLM consumed before the first generated token
    decode_tokens: int  # tokens produced by decode steps (after the first token, which prefill produces)
    ttft_s: float  # request start -> first generated token (image encode + prefill + first sampling)
    prefill_s: float  # LLM prefill; includes the image encode when image_encode_s is None
    decode_s: float  # the decode steps
    total_s: float
    image_encode_s: float | None = None
    methods: dict[str, dict[str, float]] | None = None  # per method: {"calls": n, "seconds": s}
    runner_stats: dict[str, Any] | None = None  # the C++ runner's own stats (PyTorchObserver JSON)
    index: int = 0

    @property
    def prefill_tok_s(self) -> float | None:
        return timing.tokens_per_second(self.prefill_tokens, self.prefill_s)

    @property
    def decode_tok_s(self) -> float | None:
        return timing.tokens_per_second(self.decode_tokens, self.decode_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        d["decode_tok_s"] = self.decode_tok_s
        return d


@dataclass
class CaseInfo:
    """What a backend knows about the model it runs (filled by ``load``)."""

    model_name: str = "?"
    format: str = "?"  # executorch | onnx | pytorch
    quantization: str = "fp32"
    size_bytes: int | None = None  # the bundle (or checkpoint) on disk
    decode_bytes_per_token: int | None = None  # weights + KV cache read per decode step (roofline)
    max_context: int | None = None
    num_visual_tokens: int = 0
    notes: list[str] = field(default_factory=list)


class Backend(ABC):
    """One runtime running one bundle or checkpoint."""

    name: str = "?"

    def __init__(self, target: str, threads: int | None = None):
        self.target = str(target)
        self.threads = threads
        self.info = CaseInfo()
        self.extra_load_s = 0.0  # load work a runtime defers to its first request (added to load time)
        self.load_s_override: float | None = None  # a load time the runtime reports itself (phone runs)
        self.planned_requests = 1  # warm-up + timed requests this case will run (set by the harness)

    def open(self) -> None:
        """Untimed set-up before the load: imports, manifest and checksum checks, the tokenizer."""

    @abstractmethod
    def load(self) -> None:
        """Timed: what an app does at start-up (read the weights, build the runtime's program/sessions)."""

    @abstractmethod
    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        """Build the request (and check it fits the context) before any timed run."""

    @abstractmethod
    def run_once(self) -> Repetition: ...

    def on_warmup_done(self, reps: list[Repetition]) -> None:
        """Hook after warm-up (e.g. the ExecuTorch runner re-picks its filler when EOS cut a run short)."""

    def close(self) -> None:
        pass


@dataclass
class CaseResult:
    label: str
    backend: str
    target: str
    info: CaseInfo
    load_s: float
    peak_rss_bytes: int
    prompt_tokens: int
    new_tokens: int
    threads: int
    repetitions: list[Repetition]
    warmup: int
    roofline: dict[str, Any] | None = None

    def summary(self, metric: str) -> timing.Summary | None:
        return timing.summarize(getattr(r, metric) for r in self.repetitions)

    @property
    def prefill_tokens(self) -> int:
        return self.repetitions[0].prefill_tokens if self.repetitions else 0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "label": self.label, "backend": self.backend, "target": self.target, "info": asdict(self.info),
            "load_s": self.load_s, "peak_rss_bytes": self.peak_rss_bytes, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "threads": self.threads, "warmup": self.warmup,
            "prefill_tokens": self.prefill_tokens, "roofline": self.roofline,
            "summary": {}, "repetitions": [r.to_dict() for r in self.repetitions],
        }
        for m in SUMMARY_METRICS:
            s = self.summary(m)
            out["summary"][m] = s.to_dict() if s else None
        return out


SUMMARY_METRICS = ("image_encode_s", "prefill_s", "prefill_tok_s", "ttft_s", "decode_s", "decode_tok_s", "total_s")


class CaseRun:
    """One case in steps -- :meth:`start` (timed load), :meth:`step` (one warm-up or timed request),
    :meth:`finish` -- so that a comparison can interleave the requests of several cases round-robin."""

    def __init__(self, backend: Backend, *, label: str, prompt_tokens: int, new_tokens: int, warmup: int,
                 repeat: int):
        if repeat < 1:
            raise ValueError("repeat must be at least 1")
        self.backend, self.label = backend, label
        self.prompt_tokens, self.new_tokens, self.warmup, self.repeat = prompt_tokens, new_tokens, warmup, repeat
        self.warm: list[Repetition] = []
        self.reps: list[Repetition] = []
        backend.planned_requests = warmup + repeat

    @property
    def steps(self) -> int:
        return self.warmup + self.repeat

    def start(self) -> None:
        """Fresh peak-memory mark, untimed open, timed load, the request built."""
        timing.release_memory()
        timing.reset_peak_rss()
        self.backend.open()
        t0 = timing.now()
        self.backend.load()
        self.load_s = timing.now() - t0
        self.backend.prepare(self.prompt_tokens, self.new_tokens)

    def step(self) -> str:
        """The next request: a warm-up while any is left, then a timed one. Returns which it was."""
        if len(self.warm) < self.warmup:
            self.warm.append(self.backend.run_once())
            if len(self.warm) == self.warmup:
                self.backend.on_warmup_done(self.warm)
            return "warmup"
        if not self.warm and self.warmup == 0 and not self.reps:
            self.backend.on_warmup_done([])
        rep = self.backend.run_once()
        rep.index = len(self.reps)
        self.reps.append(rep)
        return "repeat"

    def finish(self) -> CaseResult:
        backend, reps = self.backend, self.reps
        short = [r.decode_tokens for r in reps if r.decode_tokens != self.new_tokens]
        if short:
            backend.info.notes.append(f"decoded {sorted(set(short))} tokens instead of {self.new_tokens} in "
                                      f"{len(short)} run(s) (the runtime stopped at EOS)")
        result = CaseResult(label=self.label, backend=backend.name, target=backend.target, info=backend.info,
                            load_s=backend.load_s_override if backend.load_s_override is not None
                            else self.load_s + backend.extra_load_s, peak_rss_bytes=timing.peak_rss_bytes(),
                            prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens,
                            threads=backend.threads or timing.cpu_threads_default(), repetitions=reps,
                            warmup=self.warmup)
        backend.close()
        return result


def run_case(backend: Backend, *, label: str, prompt_tokens: int, new_tokens: int, warmup: int, repeat: int,
             on_step: Callable[[str], None] | None = None) -> CaseResult:
    """Load ``backend``, run ``warmup`` untimed + ``repeat`` timed requests, and collect the numbers."""
    run = CaseRun(backend, label=label, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup,
                  repeat=repeat)
    step = on_step or (lambda _msg: None)
    run.start()
    step("loaded")
    for _ in range(run.steps):
        step(run.step())
    return run.finish()
