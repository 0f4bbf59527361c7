"""A whole benchmark: every case through the harness, then the roofline of each (what the CLI calls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mobilemllm.bench.adb import parse_device
from mobilemllm.bench.backends import make_backend
from mobilemllm.bench.backends.adb_runner import AdbRunnerBackend
from mobilemllm.bench.harness import CaseResult, run_case
from mobilemllm.bench.plan import Case
from mobilemllm.bench.roofline import measure_bandwidth, roofline
from mobilemllm.errors import UserError


@dataclass
class Settings:
    prompt_tokens: int = 128
    new_tokens: int = 128
    warmup: int = 1
    repeat: int = 5
    threads: int | None = None
    device: str = "host"
    bandwidth_gbps: float | None = None  # given for a phone (or to override the host's measurement)
    runner: str | None = None  # the phone's runner binary (adb)

    def check(self) -> None:
        problems = []
        if self.prompt_tokens < 1:
            problems.append("--prompt-tokens must be at least 1")
        if self.new_tokens < 1:
            problems.append("--new-tokens must be at least 1")
        if self.warmup < 0:
            problems.append("--warmup must be 0 or more")
        if self.repeat < 1:
            problems.append("--repeat must be at least 1 (a median needs runs)")
        if self.threads is not None and self.threads < 1:
            problems.append("--threads must be at least 1")
        if self.bandwidth_gbps is not None and self.bandwidth_gbps <= 0:
            problems.append("--bandwidth must be a positive number of GB/s")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make(case: Case, settings: Settings):
    kind, serial = parse_device(settings.device)
    if kind == "adb":
        return AdbRunnerBackend(case.target, settings.threads, serial=serial, runner=settings.runner)
    return make_backend(case.backend, case.target, settings.threads)


def bandwidth(settings: Settings) -> tuple[float, str] | None:
    """(bytes/s, where it came from): --bandwidth, else a copy on this host; None for a phone without it."""
    if settings.bandwidth_gbps:
        return settings.bandwidth_gbps * 1e9, "given (--bandwidth)"
    if settings.device == "host":
        return measure_bandwidth(threads=settings.threads), "measured on this host (large copy)"
    return None


def add_roofline(result: CaseResult, settings: Settings) -> None:
    bpt = result.info.decode_bytes_per_token
    bw = bandwidth(settings)
    if not bpt or bw is None:
        return
    bw, src = bw
    s = result.summary("decode_tok_s")
    result.roofline = roofline(bpt, bw, s.median if s else None, src).to_dict()


def run_benchmark(cases: Sequence[Case], settings: Settings,
                  on_step: Callable[[Case, str], None] | None = None) -> list[CaseResult]:
    settings.check()
    bandwidth(settings)  # measured once, before any model occupies memory or the caches
    results = []
    for case in cases:
        backend = make(case, settings)
        res = run_case(backend, label=case.label, prompt_tokens=settings.prompt_tokens,
                       new_tokens=settings.new_tokens, warmup=settings.warmup, repeat=settings.repeat,
                       on_step=(lambda msg, c=case: on_step(c, msg)) if on_step else None)
        add_roofline(res, settings)
        results.append(res)
    return results
