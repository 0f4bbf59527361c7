"""Phone runs over adb, and the parser of the ExecuTorch runner's stats lines.

``--device adb[:SERIAL]`` pushes an ExecuTorch bundle (``model.pte``, ``tokenizer.json``), a benchmark
image and ExecuTorch's multimodal runner binary to ``/data/local/tmp/mobilemllm/<bundle>/``, runs the
binary once per warm-up/repetition with its output sent to a log file on the phone, pulls the logs, and
parses the ``PyTorchObserver {...}`` line the C++ runner prints after every generation (the same line
the Python bindings print here, see ``tests/data/``).

The runner binary is not built by this project: build ExecuTorch's multimodal runner for arm64-v8a
(the LLaVA example's ``llava_main``, see ExecuTorch ``examples/models/llava``, with the XNNPACK and
``custom_ops`` kernels linked) and give its path with ``--runner``, or the environment variable
``MOBILEMLLM_ET_RUNNER``, or put it at ``~/.cache/mobilemllm/android/llava_main``. The binary takes
gflags: ``--model_path --tokenizer_path --image_path --prompt --temperature --seq_len --cpu_threads``.

No phone or adb exists on the machine this project is tested on: command lines are built and tested
here, the parser runs on real output captured from the runner, the device run itself is untested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobilemllm.bundle.layout import DEVICE_ROOT
from mobilemllm.errors import BackendUnavailable, ConfigError, UserError

RUNNER_ENV = "MOBILEMLLM_ET_RUNNER"
DEFAULT_RUNNER = Path("~/.cache/mobilemllm/android/llava_main")
STATS_KEYS = ("prompt_tokens", "generated_tokens", "model_load_start_ms", "model_load_end_ms", "inference_start_ms",
              "inference_end_ms", "prompt_eval_end_ms", "first_token_ms")
_OBSERVER = re.compile(r"PyTorchObserver\s+(\{.*?\})\s*$")


# ---- the stats line ------------------------------------------------------------------------------
def parse_observer_lines(text: str) -> list[dict[str, Any]]:
    """Every ``PyTorchObserver {...}`` JSON object in ``text`` (runner output), in order.

    The runner prints generated text without newlines before it, so the marker is searched anywhere in
    a line. A line with the marker whose JSON is broken or lacks the timing keys is an error: a silently
    skipped stats line would make a run look like it produced no numbers.
    """
    out = []
    for line in text.splitlines():
        if "PyTorchObserver" not in line:
            continue
        m = _OBSERVER.search(line.rstrip("\r"))
        if not m:
            raise UserError(f"malformed runner stats line: {line.strip()[:200]!r}")
        try:
            stats = json.loads(m.group(1))
        except json.JSONDecodeError as e:
            raise UserError(f"runner stats line is not valid JSON ({e}): {m.group(1)[:200]!r}") from None
        missing = [k for k in STATS_KEYS if k not in stats]
        if missing:
            raise UserError(f"runner stats line lacks {', '.join(missing)}: {m.group(1)[:200]!r}")
        out.append(stats)
    return out


def stats_to_repetition(stats: dict[str, Any]):
    """A runner stats object -> a :class:`Repetition` (times in seconds; image encode is inside prefill)."""
    from mobilemllm.bench.harness import Repetition  # lazy: cli startup (push loads this module)

    unit = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    start, first = stats["inference_start_ms"], stats["first_token_ms"]
    prefill_end, end = stats["prompt_eval_end_ms"], stats["inference_end_ms"]
    return Repetition(prefill_tokens=int(stats["prompt_tokens"]), decode_tokens=int(stats["generated_tokens"]),
                      ttft_s=(first - start) / unit, prefill_s=(prefill_end - start) / unit,
                      decode_s=(end - prefill_end) / unit, total_s=(end - start) / unit, image_encode_s=None,
                      runner_stats=dict(stats))


def load_seconds(stats: dict[str, Any]) -> float:
    unit = float(stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000))
    return max(0, stats["model_load_end_ms"] - stats["model_load_start_ms"]) / unit


# ---- device selection ----------------------------------------------------------------------------
def parse_device(spec: str) -> tuple[str, str | None]:
    """``host`` -> ("host", None); ``adb`` -> ("adb", None); ``adb:SERIAL`` -> ("adb", SERIAL)."""
    spec = (spec or "host").strip()
    if spec == "host":
        return "host", None
    if spec == "adb":
        return "adb", None
    if spec.startswith("adb:") and len(spec) > 4:
        return "adb", spec[4:]
    raise ConfigError(f"unknown --device {spec!r}; use host, adb or adb:SERIAL")


def find_adb() -> str:
    adb = shutil.which("adb")
    if adb is None:
        raise BackendUnavailable("--device adb needs Android's `adb` on PATH, and it is not there: install the "
                                 "Android SDK platform-tools (https://developer.android.com/tools/releases/platform-tools) "
                                 "and connect a phone with USB debugging on")
    return adb


def parse_adb_devices(output: str) -> list[tuple[str, str]]:
    """``adb devices`` output -> [(serial, state)] (state: device, unauthorized, offline, ...)."""
    out = []
    for line in output.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("*"):
            out.append((parts[0], parts[1]))
    return out


def pick_serial(devices: list[tuple[str, str]], serial: str | None, choose: str = "--device adb:{serial}") -> str:
    """The serial to use: ``serial`` if it is connected and ready, else the only ready device.

    ``choose`` is how the calling command names a device (``--serial {serial}`` for push).
    """
    ready = [s for s, state in devices if state == "device"]
    listed = ", ".join(f"{s} ({st})" for s, st in devices) or "none"
    if serial is not None:
        state = dict(devices).get(serial)
        if state is None:
            raise BackendUnavailable(f"no device with serial {serial!r} is connected (adb devices lists: {listed})")
        if state != "device":
            raise BackendUnavailable(f"Android device {serial} is {state}, not ready: unlock it and accept the USB "
                                     "debugging prompt on the phone, then run again")
        return serial
    if not ready:
        why = f"adb devices lists {listed}" if devices else "no Android device is connected"
        raise BackendUnavailable(f"no Android device is ready ({why}); plug a phone in with USB debugging on "
                                 "(check with `adb devices`)")
    if len(ready) > 1:
        raise UserError(f"several Android devices are connected ({', '.join(ready)}); choose one with "
                        + choose.format(serial=ready[0]))
    return ready[0]


def shell(*args: str) -> list[str]:
    """``adb shell`` arguments for one remote command, each quoted for the phone's shell.

    adb joins its arguments with spaces and the phone's ``sh -c`` parses the result, so an unquoted file
    name such as ``x;rm -rf /sdcard;#`` would run on the phone. Plain names come out unchanged.
    """
    return ["shell", *(shlex.quote(a) for a in args)]


def find_runner(path: str | None) -> Path:
    """The arm64 runner binary: ``--runner``, else $MOBILEMLLM_ET_RUNNER, else ~/.cache/mobilemllm/android/llava_main."""
    candidates = [("--runner", path), (RUNNER_ENV, os.environ.get(RUNNER_ENV)), ("default", str(DEFAULT_RUNNER))]
    for source, value in candidates:
        if not value:
            continue
        p = Path(value).expanduser()
        if p.is_file():
            return p
        if source != "default":
            raise UserError(f"the runner binary {p} (from {source}) does not exist")
    raise BackendUnavailable(f"--device adb needs ExecuTorch's multimodal runner built for Android (arm64-v8a): "
                             f"pass --runner PATH, set {RUNNER_ENV}, or put it at {DEFAULT_RUNNER} "
                             "(see docs/benchmarking.md)")


# ---- the run plan ------------------------------------------------------------------------------
@dataclass
class AdbPlan:
    """Every adb command a phone benchmark of one bundle runs, in order (testable without a phone)."""

    adb: str
    serial: str
    bundle: Path
    runner: Path
    image: Path  # a local PNG of the benchmark image
    prompt: str
    seq_len: int
    threads: int | None
    runs: int  # warm-up + repetitions
    device_dir: str = ""

    def __post_init__(self):
        if not self.device_dir:
            self.device_dir = f"{DEVICE_ROOT}/{_safe(self.bundle.name)}"

    def _adb(self, *args: str) -> list[str]:
        return [self.adb, "-s", self.serial, *args]

    def setup_commands(self, manifest: dict[str, Any]) -> list[list[str]]:
        d = self.device_dir
        program = next(rel for rel, e in manifest["files"].items() if rel.endswith(".pte"))
        tok = f"{manifest['tokenizer']['dir']}/tokenizer.json"
        return [
            self._adb("shell", f"mkdir -p {shlex.quote(d)}"),
            self._adb("push", str(self.bundle / program), f"{d}/model.pte"),
            self._adb("push", str(self.bundle / tok), f"{d}/tokenizer.json"),
            self._adb("push", str(self.image), f"{d}/image.png"),
            self._adb("push", str(self.runner), f"{d}/runner"),
            self._adb("shell", f"chmod 755 {shlex.quote(d + '/runner')}"),
        ]

    def run_command(self, i: int) -> list[str]:
        d = shlex.quote(self.device_dir)
        args = ["./runner", "--model_path", "model.pte", "--tokenizer_path", "tokenizer.json", "--image_path",
                "image.png", "--prompt", self.prompt, "--temperature", "0", "--seq_len", str(self.seq_len)]
        if self.threads:
            args += ["--cpu_threads", str(self.threads)]
        inner = " ".join(shlex.quote(a) for a in args)
        return self._adb("shell", f"cd {d} && {inner} > run_{i}.log 2>&1")

    def pull_command(self, i: int, local_dir: Path) -> list[str]:
        return self._adb("pull", f"{self.device_dir}/run_{i}.log", str(local_dir / f"run_{i}.log"))

    def cleanup_command(self) -> list[str]:
        return self._adb("shell", f"rm -rf {shlex.quote(self.device_dir)}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "bundle"


def _check(cmd: list[str], timeout: float = 600) -> str:
    """Run one adb command; its stdout, or a one-line BackendUnavailable naming the command."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}") from None
    except OSError as e:
        raise BackendUnavailable(f"`{shlex.join(cmd)}` failed: {e}") from None
    if res.returncode != 0:
        raise BackendUnavailable(f"`{shlex.join(cmd)}` failed (exit {res.returncode}): "
                                 f"{(res.stderr or res.stdout).strip()[:300]}")
    return res.stdout


def list_devices(adb: str) -> list[tuple[str, str]]:
    """[(serial, state)] from ``adb devices``."""
    return parse_adb_devices(_check([adb, "devices"], timeout=60))


def connect(serial: str | None, choose: str = "--device adb:{serial}") -> tuple[str, str]:
    """(adb path, serial of the ready device) or a clear BackendUnavailable."""
    adb = find_adb()
    return adb, pick_serial(list_devices(adb), serial, choose)
