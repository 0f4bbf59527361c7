#!/usr/bin/env bash
# Sweep of the tiny recipe (docs/training.md, "What more training buys"): each variant runs foundations ->
# pretrain -> instruct in fp32 (on a GPU if there is one, else the CPU), all variants in parallel, then
# held-out VQA accuracy by question type and by number of shapes in the image.
#   OUT=/tmp/sweep bash benchmarks/tiny_sweep.sh            # variants from benchmarks/tiny_sweep_variants.sh
#   VARIANTS=my_variants.sh LIMIT=900 bash benchmarks/tiny_sweep.sh
set -u
OUT=${OUT:-/tmp/sweep}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
W=${W:-/tmp/sweepruns}; mkdir -p "$W"
FP="foundations.text.precision=fp32 foundations.vision.precision=fp32 pretrain.precision=fp32 instruct.precision=fp32"
COMMON="stages=[foundations,pretrain,instruct] num_threads=1 $FP"
LIMIT=${LIMIT:-400}
variant() {  # name overrides...
  local name=$1; shift
  ( t0=$(date +%s)
    timeout $LIMIT python3 -m mobilemllm train --recipe tiny --out "$W/$name" --no-progress $COMMON "$@" > "$OUT/$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - t0 )) s" >> "$OUT/$name.log"
    [ -f "$W/$name/instruct/eval.json" ] && python3 benchmarks/tiny_vqa_by_shapes.py "$W/$name/instruct" "$W/$name/data/eval" 2>/dev/null | grep -v "^W\|Failed" >> "$OUT/$name.log"
  ) &
}
source "${VARIANTS:-benchmarks/tiny_sweep_variants.sh}"
wait
for f in "$OUT"/*.log; do n=$(basename $f .log); echo "=== $n $(tail -1 $W/$n/logs/instruct/metrics.jsonl 2>/dev/null | cut -c1-60)"; grep -E "^(colour|kind|count|position|existence|overall|exit)" "$f"; done
cat "$OUT"/*.log > "$OUT/all.txt"; rm -f "$OUT"/*.log
