#!/usr/bin/env bash
# Session 7, one 2 x H100 call (after scripts/gpu_setup.sh): TP=2 after unpacking the step inputs on the mesh:
# the batch-256 step (profile_decode), then batch-1/64 latency at TP=2 and TP=1 on the same machine.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs22; mkdir -p $L
t0=$SECONDS
timeout 100 python3 scripts/profile_decode.py $M --max-model-len 2048 --enforce-eager --batch-size 256 --input-len 200 \
  --steps 20 --replay 10 --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json > $L/tp2.log 2>&1
echo "== prof256_tp2 rc=$? $((SECONDS - t0)) s"; grep -E "replayed|without the profiler" $L/tp2.log
sed -n '/inside dispatch_forward/,+6p' $L/tp2.log | cut -c1-110
LAT="--enforce-eager --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
for tp in 2 1; do
  t0=$SECONDS
  timeout 100 python3 scripts/bench_latency.py $M $LAT --tensor-parallel-size $tp --output-json $OUT/lat_tp$tp.json \
    > $L/lat_tp$tp.log 2>&1
  echo "== lat_tp$tp rc=$? $((SECONDS - t0)) s"; grep -E "^batch|Error" $L/lat_tp$tp.log | cut -c1-120 | tail -3
done
tar czf $OUT/logs22.tgz -C /tmp logs22
