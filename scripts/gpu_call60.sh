#!/usr/bin/env bash
# Session 14, one H100 (after scripts/gpu_setup.sh): the 320-prompt burst with 4, 1, then 4 client processes on one
# machine, now with the server's per-request TPOT histogram (engine_mean_request_tpot_ms: the client's statistic,
# seen by the engine), the per-process CPU and the engine loop's busy-period line.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs60; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
SERVE_CACHE=/tmp/jc; source scripts/gpu_serve_lib.sh
for c in 4 1 4; do
  n=c${c}_$SECONDS
  serve $n "" "" "--client-processes $c"
  grep -E "engine_mean|p99_itl|mean_tpot" $L/serving_$n.log | tr -s ' ' | tr '\n' ' '; echo
done
tar czf $OUT/logs60.tgz -C /tmp logs60
