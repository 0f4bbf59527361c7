#!/usr/bin/env bash
# Training throughput of MobileVLM V2 1.7B shapes (random weights) on one GPU, through mobilemllm's trainer.
# Run from the repo root on a CUDA machine with torch + transformers installed (no pip install needed):
#   OUT=/tmp/tb bash benchmarks/gpu_train_bench.sh
# Each case writes $OUT/<case>.json; a failing case is reported and the next one still runs.
set -u
OUT=${OUT:-/tmp/mobilemllm-train-bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
common=(--preset mobilevlm-v2-1.7b --text-tokens 368 --answer-tokens 128 --no-progress)
run() {  # name, then train-bench options
  local name=$1; shift
  echo "== $name: mobilemllm train-bench ${common[*]} $*"
  timeout 200 python3 -m mobilemllm train-bench "${common[@]}" "$@" --json "$OUT/$name.json" || echo "== $name FAILED (exit $?)"
}
run instruct_mb8_gc   --stage instruct --steps 300 --warmup 20 --micro-batch 8
run instruct_mb16     --stage instruct --steps 100 --warmup 10 --micro-batch 16 --no-grad-checkpointing
run pretrain_mb16_gc  --stage pretrain --steps 100 --warmup 10 --micro-batch 16
