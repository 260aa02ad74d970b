#!/usr/bin/env bash
# Session 7, one 2 x H100 call (after scripts/gpu_setup.sh): issue 6's batch-1 and batch-64 decode latency at TP=1 and
# TP=2 on the same machine (bench_latency.py, 128 in / 128 out).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
LAT="--enforce-eager --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
L=/tmp/logs21; mkdir -p $L
for tp in 2 1; do
  t0=$SECONDS
  timeout 200 python3 scripts/bench_latency.py $M $LAT --tensor-parallel-size $tp --output-json $OUT/lat_tp$tp.json \
    > $L/lat_tp$tp.log 2>&1
  echo "== lat_tp$tp rc=$? $((SECONDS - t0)) s"; grep -E "^batch|Error" $L/lat_tp$tp.log | cut -c1-200 | tail -3
done
tar czf $OUT/logs21.tgz -C /tmp logs21
