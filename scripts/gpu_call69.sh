#!/usr/bin/env bash
# Session 16, one H100 (after scripts/gpu_setup.sh): call 68 again with a TMA-load control (each block copies its box into shared memory and waits: the weight has passed
# through L2 when the kernel ends) beside the prefetch and the plain-read control; 32 and 16 MiB weights.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for n in 4096 2048; do
  timeout 120 python3 scripts/bench_gemv.py --only --layers 1 --iters 50 --check-prefetch --spin-iters 300 \
    --check-n $n --output-json $OUT/check_n$n.json 2>&1 | grep -E "prefetch check|Error|error" | cut -c1-220
done
