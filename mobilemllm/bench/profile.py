"""Where an ExecuTorch bundle's time goes, op by op: ETDump through ExecuTorch's devtools Inspector.

    python -m mobilemllm.bench.profile bundles/mobilellama-android --threads 2 --prompt-tokens 128 \\
        --json docs/results/bench_compare_1.4b/profile.json

Loads the bundle's ``model.pte`` with ETDump enabled (ExecuTorch's event tracer; the XNNPACK delegate
reports each of its operators), runs the three phases of a request -- ``vision_encoder`` on a benchmark
image, one ``text_decoder`` prefill call of the prompt's length, ``steps`` single-token decode calls --
and groups the events by operator kind (XNNPACK's "Fully Connected (NC, QDU8, F32, QB4W) GEMM" ->
"Fully Connected (QDU8, F32, QB4W)", portable kernels by name). The first call of each method is left
out (XNNPACK packs its weights then). For decode it adds the bandwidth bound: bytes the step reads
(:func:`mobilemllm.bench.backends.executorch.decode_bytes_per_token`) ÷ the host's copy bandwidth, so
the report says whether a step is near the memory bound or spends its time computing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from mobilemllm.bench import timing
from mobilemllm.bench.backends.bundle_common import bundle_config, read_bundle
from mobilemllm.bench.backends.executorch import _program_path, decode_bytes_per_token, image_input_tensor
from mobilemllm.bench.roofline import measure_bandwidth
from mobilemllm.runtime.executorch_runner import load_kernels, set_threads

SKIP = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL", "Method::init", "Program::load_method"}


def op_kind(name: str) -> str:
    """An event name without its instance number and XNNPACK's layout tag: one row per kind of operator."""
    name = re.sub(r"\s*#\d+$", "", name)
    name = name.replace("native_call_", "").replace(" GEMM", "").replace(" GEMV", "")
    return re.sub(r"\((NC|ND|NHWC|NCHW), ?", "(", name).replace(" ()", "").strip()


def _events(etdump: Path) -> list[tuple[str, list[float]]]:
    """(event name, ms of each execution) for every event of the dump."""
    from executorch.devtools import Inspector  # heavy optional backend: ExecuTorch's devtools

    out = []
    for block in Inspector(etdump_path=str(etdump)).event_blocks:
        for event in block.events:
            if event.name and event.perf_data is not None:
                out.append((event.name, list(event.perf_data.raw)))
    return out


def _run(pte: Path, method: str, make_inputs, calls: int, threads: int | None) -> tuple[dict[str, float], float]:
    """Per-op-kind ms per call (median over ``calls`` after one untimed call) and the method's own ms per call."""
    from executorch.extension.pybindings import portable_lib  # heavy optional backend: ExecuTorch

    load_kernels()
    set_threads(threads)
    module = portable_lib._load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    walls = []
    for i in range(calls + 1):
        inputs = make_inputs(i)
        t = timing.now()
        module.run_method(method, inputs)
        walls.append(timing.now() - t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(path))
        events = _events(path)
    kinds: dict[str, float] = {}
    for name, raw in events:
        if name in SKIP or len(raw) < 2:
            continue
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + statistics.median(raw[1:])
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])), statistics.median(walls[1:]) * 1e3


def profile_bundle(bundle: str | Path, prompt_tokens: int = 128, steps: int = 8,
                   threads: int | None = None) -> dict[str, Any]:
    """The three phases of a request, op kind by op kind, with the decode step's bandwidth bound."""
    bundle = Path(bundle)
    manifest = read_bundle(bundle, "executorch")
    pte, cfg = _program_path(bundle, manifest), bundle_config(manifest)
    hidden, visual = cfg.llm.hidden_size, manifest["prompt"]["num_visual_tokens"]
    prefill = min(prompt_tokens + visual, manifest["context"]["max_seq_len"])
    image = image_input_tensor(manifest)
    phases = {
        "image encode": _run(pte, "vision_encoder", lambda i: (image,), 2, threads),
        f"prefill ({prefill} tokens, one call)": _run(
            pte, "text_decoder", lambda i: (torch.randn(1, prefill, hidden), torch.tensor([0])), 2, threads),
        "decode (one token)": _run(
            pte, "text_decoder", lambda i: (torch.randn(1, 1, hidden), torch.tensor([prefill + i])), steps, threads),
    }
    bandwidth = measure_bandwidth(threads=threads)
    step_bytes = decode_bytes_per_token(manifest, prefill + steps // 2)
    decode_ms = phases["decode (one token)"][1]
    return {
        "bundle": bundle.name, "model": manifest["model"]["name"], "threads": threads,
        "quantization": manifest.get("quantization"),
        "phases": {name: {"wall_ms": wall, "ops_ms": ops} for name, (ops, wall) in phases.items()},
        "decode_bytes_per_token": step_bytes, "bandwidth_bytes_s": bandwidth,
        "decode_bandwidth_bound_ms": step_bytes / bandwidth * 1e3,
        "decode_fraction_of_bandwidth_bound": (step_bytes / bandwidth * 1e3) / decode_ms if decode_ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="an executorch bundle folder")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="text tokens of the prefill (+ the image's)")
    ap.add_argument("--steps", type=int, default=8, help="decode calls to time")
    ap.add_argument("--threads", type=int, default=None, help="ExecuTorch threadpool size")
    ap.add_argument("--json", type=Path, default=None, help="write the profile here")
    args = ap.parse_args(argv)
    prof = profile_bundle(args.bundle, args.prompt_tokens, args.steps, args.threads)
    for name, phase in prof["phases"].items():
        print(f"{name}: {phase['wall_ms']:.1f} ms")
        for op, ms in list(phase["ops_ms"].items())[:8]:
            print(f"   {ms:9.2f} ms  {op}")
    print(f"decode bandwidth bound {prof['decode_bandwidth_bound_ms']:.1f} ms "
          f"({prof['decode_bytes_per_token'] / 2**20:.0f} MiB at {prof['bandwidth_bytes_s'] / 1e9:.1f} GB/s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(prof, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
