#!/usr/bin/env bash
# The `bench` preset (CLIP 224 px / 6 layers, LDPv2, LLaMA 8 x 512, vocab 32000; random weights, seed 0)
# through every runtime that runs on this host, side by side in one `mobilemllm bench` run:
#   OUT=/tmp/bench-preset bash benchmarks/bench_preset.sh
# writes $OUT/ckpt (the checkpoint), $OUT/bundles/* and $OUT/bench.json (+ .csv, .png).
# docs/results/bench_preset/bench.json is this script's report; docs/render_results.py renders it.
set -euo pipefail
OUT=${OUT:-/tmp/bench-preset}
THREADS=${THREADS:-2}
mkdir -p "$OUT/bundles"
mm() { python3 -m mobilemllm "$@"; }
# One checkpoint, so eager and every bundle share the same random weights.
[ -f "$OUT/ckpt/model.safetensors" ] || python3 - "$OUT/ckpt" <<'PY'
import sys, torch
from mobilemllm.config import ModelConfig
from mobilemllm.export.synthetic_tokenizer import synthetic_tokenizer
from mobilemllm.models.checkpoint import save_checkpoint
from mobilemllm.models.vlm import MobileVLM
torch.manual_seed(0)
save_checkpoint(MobileVLM(ModelConfig.from_preset("bench"), load_weights=False).eval(), synthetic_tokenizer(32000), sys.argv[1])
PY
# --force: random weights have nearly flat logits, so quantized bundles fail the greedy-agreement gate;
# the manifest records it.
F32=(--decoder-quant fp32 --embedding-quant fp32 --vision-quant fp32)
[ -d "$OUT/bundles/et-fp32" ]   || mm export -m "$OUT/ckpt" -t android "${F32[@]}" --force -o "$OUT/bundles/et-fp32"
[ -d "$OUT/bundles/android" ]   || mm export -m "$OUT/ckpt" -t android --force -o "$OUT/bundles/android"
[ -d "$OUT/bundles/onnx-fp32" ] || mm export -m "$OUT/ckpt" -t onnx "${F32[@]}" --force -o "$OUT/bundles/onnx-fp32"
[ -d "$OUT/bundles/onnx" ]      || mm export -m "$OUT/ckpt" -t onnx --force -o "$OUT/bundles/onnx"
mm bench --model "$OUT/ckpt" --bundle "$OUT/bundles/et-fp32" --bundle "$OUT/bundles/android" \
    --bundle "$OUT/bundles/onnx-fp32" --bundle "$OUT/bundles/onnx" \
    --prompt-tokens 192 --new-tokens 128 --warmup 1 --repeat 5 --threads "$THREADS" \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/bench.png"
