#!/usr/bin/env bash
# Session 16, one H100 (after scripts/gpu_setup.sh): does the Mosaic TMA prefetch reach L2 at all? (call 66 found no
# gain from it.) bench_gemv --check-prefetch: 8 o-projection GEMVs on distinct 32 MiB weights, each after a ~40 us
# idle gap, with the weight prefetched before the gap or not; two gap lengths.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for n in 20000 5000; do
  timeout 120 python3 scripts/bench_gemv.py --only --layers 1 --iters 50 --check-prefetch --spin-iters $n \
    --output-json $OUT/check_$n.json 2>&1 | grep -E "prefetch check|Error|error" | cut -c1-200
done
