#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh):
#   1. warm start to the first served token with the engine in its own process (bench_startup, cold then warm);
#   2. bench_gemm.py: the decode step's GEMMs at M=256 and 128, XLA against jax's Mosaic GPU Hopper matmul.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs16; mkdir -p $L
t0=$SECONDS
timeout 200 python3 scripts/bench_startup.py --runs 2 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$? $((SECONDS - t0)) s"; grep -E "^ *[12] |warm start" $L/startup.log | tail -3
grep -hE "compiled [0-9]+ step shapes|engine ready" $L/st/*.log 2>/dev/null | cut -c1-200
t0=$SECONDS
timeout 330 python3 scripts/bench_gemm.py --out $OUT/gemm > $L/gemm.log 2>&1
echo "== gemm rc=$? $((SECONDS - t0)) s"; grep -E "^M=" $L/gemm.log | cut -c1-300
tar czf $OUT/logs16.tgz -C /tmp logs16
