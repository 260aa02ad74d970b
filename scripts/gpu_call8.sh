#!/usr/bin/env bash
# Issue 8 on a 4-GPU machine (after scripts/gpu_setup.sh), in what a short budget allows: dummy Llama-3-8B decode
# step times at TP=4, then the TP=1 and TP=2 baselines on the same machine, then dummy Llama-3-70B at TP=4 (batch 1
# and 64) if time is left. Every run --enforce-eager (only the shapes used compile). JSONs to $OUT.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --enforce-eager --max-model-len 2048"
L="--max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 16"
for tp in 4 1 2; do
  timeout 70 python3 scripts/bench_latency.py --model benchmarks/configs/llama3-8b.json $E $L --tensor-parallel-size $tp \
    --output-json $OUT/lat8b_tp$tp.json > /tmp/l8_$tp.log 2>&1
  echo "== 8B TP=$tp rc=$?"; grep -E "^batch|Error" /tmp/l8_$tp.log | cut -c1-160
done
timeout 150 python3 scripts/bench_latency.py --model benchmarks/configs/llama3-70b.json $E $L --tensor-parallel-size 4 \
  --output-json $OUT/lat70b_tp4.json > /tmp/l70.log 2>&1
echo "== 70B TP=4 rc=$?"; grep -E "^batch|Error|startup" /tmp/l70.log | cut -c1-200 | tail -4
