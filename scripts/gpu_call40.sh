#!/usr/bin/env bash
# Session 10, one H100 (after scripts/gpu_setup.sh): warm start with the defaults after compile_ahead learned to
# take two threads once its first shape loads from the persistent cache (commit 5748700): one cold, two warm.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs40; mkdir -p $L
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
timeout 200 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  > $L/startup.log 2>&1; echo "== startup rc=$? $SECONDS s"; grep -E "^ *[1-3] |warm start" $L/startup.log | tail -4
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "profile run|ahead of time|step shapes in|engine ready" $f | cut -c12-23,60-200 | tr '\n' '|')"; done
tar czf $OUT/logs40.tgz -C /tmp logs40
