#!/usr/bin/env bash
# Session 8, one H100 call (after scripts/gpu_setup.sh): the default prefill now takes FA3's layout only for steps of
# >= 2048 tokens (one warpgroup below). Warm start (cold, then twice warm), then the 320-prompt burst on that cache.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs27; mkdir -p $L
timeout 200 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$? $SECONDS s"; grep -E "^ *[1-3] |warm start" $L/startup.log | tail -4
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "profile run|ahead of time|engine ready" $f | cut -c12-23,60-125 | tr '\n' '|')"; done
source scripts/gpu_serve_lib.sh
if [ $SECONDS -lt 400 ]; then serve default "" ""; fi
tar czf $OUT/logs27.tgz -C /tmp logs27
