#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh), the final defaults (engine process, 4096-token steps in the
# server): start to first served token cold then three times warm (bench_startup), then two servers one after the
# other on that warm cache, each with the 320-prompt burst from 4 client processes.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs19; mkdir -p $L
t0=$SECONDS
timeout 230 python3 scripts/bench_startup.py --runs 4 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$? $((SECONDS - t0)) s"; grep -E "^ *[1-4] |warm start" $L/startup.log | tail -5
source scripts/gpu_serve_lib.sh
serve final1 "" "" "--client-processes 4"
serve final2 "" "" "--client-processes 4"
tar czf $OUT/logs19.tgz -C /tmp logs19
