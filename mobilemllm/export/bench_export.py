"""Benchmark an ExecuTorch bundle on this machine: export time/peak RSS, .pte size, decoder prefill/decode
tokens/s, MultimodalRunner time to first token, and transformers eager decode for comparison.

    python -m mobilemllm.export.bench_export --model bench --target android --out /tmp/bench-android
    python -m mobilemllm.export.bench_export --model mobilellama-1.4b --target android --out /tmp/b14 --no-eager

Random-weight presets get a synthetic tokenizer. The export runs in a child process so its peak RSS is
measured alone. Numbers are for the machine it runs on (printed with the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from mobilemllm.api import load
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID
from mobilemllm.export.executorch_parity import load_program
from mobilemllm.runtime import run_bundle


def export_child(model: str, target: str, out: Path, extra: list[str]) -> dict:
    where = [] if "--recipe" in extra else ["--target", target]
    cmd = [sys.executable, "-m", "mobilemllm", "export", "--model", model, *where, "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"export failed: {' '.join(cmd)}")
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    return {"export_s": round(wall, 1), "export_peak_rss_gb": round(rss_gb, 2),
            "log": [l for l in proc.stderr.splitlines()
                    if l.startswith(("parity", "lowered", "ExecuTorch bundle", "quantization"))]}


def decoder_speed(pte: Path, hidden: int, prompt: int = 128, new: int = 128, repeats: int = 2) -> dict:
    """text_decoder alone: prefill ``prompt`` embeddings, then ``new`` single-token steps (embedding + decoder)."""
    program = load_program(pte)
    emb = program.load_method("token_embedding")
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    for _ in range(repeats):
        dec = program.load_method("text_decoder")
        x = torch.randn(1, prompt, hidden)
        t0 = time.perf_counter()
        logits = dec.execute([x, torch.tensor([0])])[0]
        t1 = time.perf_counter()
        tok = int(logits.argmax())
        for i in range(new):
            e = emb.execute([torch.tensor([[tok]])])[0]
            tok = int(dec.execute([e, torch.tensor([prompt + i])])[0].argmax())
        t2 = time.perf_counter()
        best["prefill_tokens_per_s"] = max(best["prefill_tokens_per_s"], prompt / (t1 - t0))
        best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], new / (t2 - t1))
    return {k: round(v, 1) for k, v in best.items()}


def runner_speed(bundle: Path, new: int = 128) -> dict:
    img = Image.new("RGB", (400, 300), (120, 60, 200))
    prompt = "Describe the image in detail, with every shape, its colour and where it is. " * 3
    run_bundle(bundle, img, prompt, max_new_tokens=8, report=False)  # warm-up
    r = run_bundle(bundle, img, prompt, max_new_tokens=new, report=False)
    return {"runner_prompt_tokens": r.prompt_tokens, "runner_generated": r.generated_tokens,
            "runner_ttft_s": round(r.ttft_s, 3), "runner_prefill_tokens_per_s": round(r.prefill_tokens_per_s, 1),
            "runner_decode_tokens_per_s": round(r.decode_tokens_per_s, 1)}


def eager_speed(model_name: str, new: int = 128) -> dict:
    """transformers eager (MobileVLM.generate, KV cache) on the same prompt shape: TTFT and decode tok/s."""
    model, _ = load(model_name)
    cfg = model.config

    ids = [1] + [5] * 30 + [IMAGE_TOKEN_ID] * cfg.num_visual_tokens + [7] * 60
    pix = torch.rand(1, cfg.vision.num_views, 3, cfg.vision.image_size, cfg.vision.image_size)
    times: list[float] = []
    model.generate(torch.tensor([ids]), pix, max_new_tokens=4)
    t0 = time.perf_counter()
    model.generate(torch.tensor([ids]), pix, max_new_tokens=new, on_token=lambda t: times.append(time.perf_counter()))
    ttft = times[0] - t0
    decode = (len(times) - 1) / (times[-1] - times[0])
    return {"eager_prompt_tokens": len(ids), "eager_ttft_s": round(ttft, 3), "eager_decode_tokens_per_s": round(decode, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bench")
    ap.add_argument("--target", default="android")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--export-arg", action="append", default=[], help="extra `mobilemllm export` argument")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--runner", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    res: dict = {"model": args.model, "target": args.target, "machine": f"{platform.machine()}, "
                 f"{os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), shared"}
    # random weights have nearly flat logits, so 4-bit noise can fail the cosine gate: write the bundle
    # anyway (the manifest marks it forced) -- these bundles are for timing, not for answers
    extra = [a for x in args.export_arg for a in x.split()] + ["--force"]
    if not args.skip_export:
        res.update(export_child(args.model, args.target, args.out, extra))
    manifest = json.loads((args.out / "manifest.json").read_text())
    res["pte_mb"] = round(manifest["files"]["model.pte"]["size"] / 1e6, 2)
    res["quantization"] = {k: v["scheme"] + (f"/g{v['group_size']}" if v.get("group_size") else "")
                           for k, v in manifest["quantization"].items()}
    res.update(decoder_speed(args.out / "model.pte", manifest["model"]["config"]["llm"]["hidden_size"]))
    if args.runner:
        res.update(runner_speed(args.out))
    if args.eager:
        res.update(eager_speed(args.model))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
