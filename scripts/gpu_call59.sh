#!/usr/bin/env bash
# Session 14, one 2-GPU call (after scripts/gpu_setup.sh): the host cost of a launch by argument count
# (bench_dispatch.py: a trivial program over N arrays, D donated, on 1 and 2 devices; our Llama-3-8B step takes
# 195 weight arrays and 64 KV arrays), next to the engine's own TP=2 enqueue per forward (profile_decode.py --replay).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/logs59; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 scripts/bench_dispatch.py --buffers 8 64 195 --donated 0 2 64 --devices 1 2 --calls 500 \
  --output-json $OUT/dispatch.json > $L/dispatch.log 2>&1; echo "== dispatch rc=$?"; cat $L/dispatch.log | cut -c1-150
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
for tp in 2 1; do
  timeout 150 python3 scripts/profile_decode.py $M --max-model-len 2048 --compile-cache-dir /tmp/jc --enforce-eager \
    --batch-size 64 --input-len 128 --steps 20 --replay 10 --tensor-parallel-size $tp > $L/prof_tp$tp.log 2>&1
  echo "== prof tp$tp rc=$?"; grep -E "replayed forward|without the profiler" $L/prof_tp$tp.log | cut -c1-200
done
tar czf $OUT/logs59.tgz -C /tmp logs59
