"""`bench --compare`: bundles of one checkpoint for several runtimes, measured side by side, interleaved.

A comparison names runtimes with their export options, comma-separated::

    executorch:group=128,onnx:decoder=genai,gguf:q4_0,gguf:q4_k_m

Each item is ``RUNTIME[:OPTION[:OPTION...]]``; an option is ``key=value``, or a bare value meaning
``quant=value``. Runtimes, their export target and benchmark backend, and the keys each takes are in
:data:`RUNTIMES`. The command line exports every item's bundle into a cache folder (or reuses one exported
before from the same checkpoint with the same recipe), then :func:`run_interleaved` measures them in one
run: every case in its own worker process (so each has its own threads and its own peak memory), loaded
one after another, then the requests go round-robin -- warm-ups, then repetition 1 of every case,
repetition 2 of every case... -- so a slow spell of a shared machine hits every runtime alike.

This module does not import ``mobilemllm.export`` (the bench layer reads bundles only): the command line
loads the recipe and runs the export; :func:`apply_options` writes an item's options into that recipe.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mobilemllm import quantization as Q
from mobilemllm.bench.harness import CaseResult, CaseRun
from mobilemllm.bench.plan import Case
from mobilemllm.bench.run import Settings, add_roofline, bandwidth, make
from mobilemllm.bundle import load_manifest
from mobilemllm.errors import ConfigError, UserError


@dataclass(frozen=True)
class Runtime:
    target: str  # the export target (a shipped recipe name)
    backend: str  # the benchmark backend that runs its bundles
    keys: tuple[str, ...]  # options it takes
    about: str


RUNTIMES: dict[str, Runtime] = {
    "executorch": Runtime("android", "executorch", ("quant", "group", "kv", "target"),
                          "ExecuTorch + XNNPACK (the android bundle) through its C++ MultimodalRunner"),
    "onnx": Runtime("onnx", "onnxruntime", ("quant", "group", "decoder"),
                    "ONNX Runtime (the onnx bundle; decoder=genai: ONNX Runtime GenAI's fused decoder)"),
    "gguf": Runtime("gguf", "llamacpp", ("quant",), "llama.cpp (the gguf bundle) through llama-cpp-python"),
}
OPTION_HELP = {"quant": "the text decoder's quantization scheme (gguf: q4_0 | q4_k_m | q8_0 | f16)",
               "group": "group size of 4-bit weights (executorch; onnx: int4 block size)",
               "kv": "KV-cache precision fp32 | int8 (executorch)",
               "decoder": "torch | genai | auto (onnx)",
               "target": "android | portable (executorch)"}
TARGETS = {"executorch": ("android", "portable")}


@dataclass(frozen=True)
class Spec:
    """One comparison item: a runtime and its export options."""

    runtime: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def opts(self) -> dict[str, str]:
        return dict(self.options)

    @property
    def target(self) -> str:
        return self.opts.get("target", RUNTIMES[self.runtime].target)

    @property
    def backend(self) -> str:
        return RUNTIMES[self.runtime].backend

    @property
    def label(self) -> str:
        """What the table's case column shows, e.g. ``executorch g128``, ``gguf q4_k_m``."""
        short = {"group": "g", "quant": "", "kv": "kv-", "decoder": "", "target": ""}
        return " ".join([self.runtime] + [f"{short[k]}{v}" for k, v in self.options])

    @property
    def slug(self) -> str:
        """The item's cache folder name."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", "-".join([self.runtime] + [f"{k}-{v}" for k, v in self.options]))


def parse_compare(text: str) -> list[Spec]:
    """``executorch:group=128,gguf:q4_0`` -> specs; every mistake in one UserError naming the valid choices."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"--compare needs runtimes, e.g. --compare {','.join(RUNTIMES)}")
    specs, problems = [], []
    for item in items:
        name, *rest = item.split(":")
        name = name.strip().lower()
        if name not in RUNTIMES:
            problems.append(f"unknown runtime {name!r} (runtimes: {', '.join(RUNTIMES)})")
            continue
        options: dict[str, str] = {}
        for opt in rest:
            key, value = opt.split("=", 1) if "=" in opt else ("quant", opt)
            key, value = key.strip().lower(), value.strip()
            if key not in RUNTIMES[name].keys:
                problems.append(f"{name} takes no option {key!r} (it takes: {', '.join(RUNTIMES[name].keys)})")
            elif not value:
                problems.append(f"{name}: option {key} has no value")
            elif key == "group" and not value.isdigit():
                problems.append(f"{name}: group={value} is not a number")
            elif key == "target" and value not in TARGETS.get(name, ()):
                problems.append(f"{name}: target={value} (targets: {', '.join(TARGETS.get(name, ()))})")
            else:
                options[key] = value
        spec = Spec(name, tuple(sorted(options.items())))
        if spec in specs:
            problems.append(f"{item!r} is named twice")
        specs.append(spec)
    if problems:
        raise UserError("--compare: " + "; ".join(dict.fromkeys(problems)))
    return specs


def apply_options(recipe: dict[str, Any], spec: Spec) -> dict[str, Any]:
    """Write ``spec``'s options into ``recipe`` (a loaded shipped recipe) as `mobilemllm export`'s flags do."""
    o = spec.opts
    Q.override(recipe, {"text_decoder": o.get("quant")}, int(o["group"]) if "group" in o else None)
    if "kv" in o:
        recipe["kv_cache"] = o["kv"]
    if "decoder" in o:
        recipe["decoder"] = o["decoder"]
    return recipe


def model_key(model: str) -> str:
    """The checkpoint's cache folder: a preset's name, or a folder's name + a hash of its full path."""
    p = Path(model)
    if not p.is_dir():
        return model
    return f"{p.resolve().name}-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}"


def bundle_dir(cache: str | Path, model: str, spec: Spec) -> Path:
    return Path(cache) / model_key(model) / spec.slug


def _newest_weights_mtime(model: str) -> float:
    p = Path(model)
    if not p.is_dir():
        return 0.0  # a preset: seeded random weights, the same every time
    return max((f.stat().st_mtime for f in p.rglob("*") if f.is_file()), default=0.0)


def reusable(out: Path, recipe: dict[str, Any], model: str) -> bool:
    """True when ``out`` holds a bundle exported from ``model`` with exactly ``recipe``, newer than the
    checkpoint's files (a retrained checkpoint is exported again)."""
    if not (out / "manifest.json").is_file():
        return False
    try:
        manifest = load_manifest(out, verify=False)
    except Exception:  # noqa: BLE001 - a damaged cache entry is exported again
        return False
    source = (manifest.get("model") or {}).get("source")
    same_source = source in (None, str(model)) or (Path(model).is_dir() and source == str(Path(model)))
    fresh = (out / "manifest.json").stat().st_mtime >= _newest_weights_mtime(model)
    return manifest.get("export", {}).get("recipe") == recipe and same_source and fresh


# ---- interleaved measurement ------------------------------------------------------------------------
def _worker(conn, case: Case, settings: Settings) -> None:
    """A case in its own process: obeys "start", "step", "finish" and answers each (or the error)."""
    run = None
    while True:
        command = conn.recv()
        try:
            if command == "start":
                backend = make(case, settings)
                run = CaseRun(backend, label=case.label, prompt_tokens=settings.prompt_tokens,
                              new_tokens=settings.new_tokens, warmup=settings.warmup, repeat=settings.repeat)
                run.start()
                conn.send(("ok", None))
            elif command == "step":
                conn.send(("ok", run.step()))
            elif command == "finish":
                conn.send(("ok", run.finish()))
                return
            else:
                return
        except BaseException as e:  # noqa: BLE001 - the parent raises it in its own process
            try:
                conn.send(("error", e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
            return


class _Worker:
    def __init__(self, case: Case, settings: Settings):
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked threads or runtimes
        self.case = case
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, case, settings), daemon=True)
        self.process.start()
        child.close()

    def ask(self, command: str):
        self.conn.send(command)
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the benchmark worker of {self.case.label} ({self.case.backend}) died (exit code "
                               f"{self.process.exitcode}); run that case alone to see why") from None
        if status == "error":
            raise value
        return value

    def stop(self) -> None:
        self.conn.close()
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def run_interleaved(cases: Sequence[Case], settings: Settings,
                    on_step: Callable[[Case, str], None] | None = None) -> list[CaseResult]:
    """Every case in a worker process; loads one by one, then the requests round-robin across cases."""
    settings.check()
    if settings.device != "host":
        raise ConfigError("--compare runs on this host (--device host)")
    bandwidth(settings)  # measured once, before any model occupies memory
    step = on_step or (lambda _case, _msg: None)
    workers: list[_Worker] = []
    try:
        for case in cases:
            workers.append(_Worker(case, settings))
            workers[-1].ask("start")
            step(case, "loaded")
        for _ in range(settings.warmup + settings.repeat):
            for w in workers:
                step(w.case, w.ask("step"))
        results = []
        for w in workers:
            res = w.ask("finish")
            add_roofline(res, settings)
            results.append(res)
        return results
    finally:
        for w in workers:
            w.stop()
