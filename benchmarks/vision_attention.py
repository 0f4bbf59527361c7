"""ExecuTorch image encode of a preset's vision tower + connector (8da8w, XNNPACK), traced with SDPA and with
eager attention, timed interleaved through ExecuTorch's runtime; prints and writes one JSON.

    python benchmarks/vision_attention.py --preset mobilellama-1.4b --threads 2 --repeat 5 --json OUT.json

Random weights (speed only); the LLM is cut to one layer (only its width matters to the connector).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mobilemllm.config import ModelConfig
from mobilemllm.export.executorch import _example_image
from mobilemllm.export.executorch_backends import lower_program
from mobilemllm.export.modules import VisionEncoder
from mobilemllm.export.quantize import quantize_linears
from mobilemllm.models.vlm import MobileVLM
from mobilemllm.runtime.executorch_runner import set_threads


def build(preset: str, attention: str, out: Path) -> Path:
    """The vision_encoder method alone, traced with ``attention``, lowered to XNNPACK; the .pte path."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, llm={"num_layers": 1})
    model = MobileVLM(cfg, load_weights=False).eval()
    enc = VisionEncoder(model).eval()
    quantize_linears(enc, "8da8w", None)
    with torch.no_grad(), model.vision.attention(attention):
        ep = torch.export.export(enc, (_example_image(cfg),), strict=False)
    prog = lower_program({"vision_encoder": ep}, {}, {"vision_encoder": [XnnpackPartitioner()]})
    path = out / f"vision_{attention}.pte"
    path.write_bytes(prog.buffer)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mobilellama-1.4b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    torch.set_num_threads(args.threads)
    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ptes = {a: build(args.preset, a, Path(tmp)) for a in ("sdpa", "eager")}
        image = _example_image(ModelConfig.from_preset(args.preset))
        mods = {a: _load_for_executorch(str(p)) for a, p in ptes.items()}
        times: dict[str, list[float]] = {a: [] for a in mods}
        outs = {}
        for a, m in mods.items():  # warm-up
            outs[a] = m.run_method("vision_encoder", (image,))[0]
        for _ in range(args.repeat):
            for a, m in mods.items():
                t0 = time.perf_counter()
                m.run_method("vision_encoder", (image,))
                times[a].append(time.perf_counter() - t0)
        diff = float((outs["sdpa"] - outs["eager"]).abs().max() / outs["sdpa"].abs().max())
    report = {"preset": args.preset, "threads": args.threads, "repeat": args.repeat, "quantization": "8da8w",
              "image_encode_s": {a: {"median": statistics.median(t), "all": t} for a, t in times.items()},
              "max_rel_diff_eager_vs_sdpa": diff, "load_average": os.getloadavg(),
              "executorch_threads": threads}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
