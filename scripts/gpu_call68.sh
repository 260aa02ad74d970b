#!/usr/bin/env bash
# Session 16, one H100 (after scripts/gpu_setup.sh): call 67 again with the reuse control (the same GEMV before the
# gap: does a plain read leave the weight in L2?) and a 16 MiB weight beside the 32 MiB one; short gaps.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for n in 4096 2048; do
  timeout 120 python3 scripts/bench_gemv.py --only --layers 1 --iters 50 --check-prefetch --spin-iters 300 \
    --check-n $n --output-json $OUT/check_n$n.json 2>&1 | grep -E "prefetch check|Error|error" | cut -c1-220
done
