#!/usr/bin/env bash
# Session 10, one H100 (after scripts/gpu_setup.sh): warm start after profile_run's figure got a key that needs no
# tracing (commit after 8c1ae9b), with compile_ahead's split (tracing/lowering vs compiling/loading) in the logs;
# then the 320-prompt burst on that warm cache.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs38; mkdir -p $L
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
timeout 200 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$? $SECONDS s"; grep -E "^ *[1-3] |warm start" $L/startup.log | tail -4
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "weights:|profile run|ahead of time|step shapes in|engine ready|gc:" $f | cut -c12-23,60-230 | tr '\n' '|')"; done
source scripts/gpu_serve_lib.sh
if [ $SECONDS -lt 300 ]; then
  serve default "" ""
  grep -E "p99_itl|p99_tpot|p99_ttft" $L/serving_default.log | tr -s ' ' | tr '\n' ' '; echo
fi
tar czf $OUT/logs38.tgz -C /tmp logs38
