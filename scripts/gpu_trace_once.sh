#!/usr/bin/env bash
# Issue 7, session 4 (after scripts/gpu_setup.sh): decoder layers traced once per step shape (models/llama.py
# _layer_fn). The warm start with it, and the same step times with it and without (JAXSERVE_TRACE_LAYER_ONCE=0),
# in one call. Writes a few JSONs to $OUT; key lines to stdout.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
C="--compile-cache-dir /root/.cache/jaxserve/bench_startup"
L=/tmp/t1; mkdir -p $L
timeout 240 python3 scripts/bench_startup.py --runs 2 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup.log | tail -6
P="python3 scripts/profile_decode.py $M --max-model-len 2048 --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/tr"
timeout 100 $P $C --output-json $OUT/prof_once.json > $L/prof_once.log 2>&1
echo "== profile, layers traced once rc=$?"; grep -E "replayed|without the profiler" $L/prof_once.log
JAXSERVE_TRACE_LAYER_ONCE=0 timeout 130 $P --enforce-eager --output-json $OUT/prof_unrolled.json > $L/prof_unrolled.log 2>&1
echo "== profile, unrolled trace rc=$?"; grep -E "replayed|without the profiler" $L/prof_unrolled.log
B="python3 scripts/bench_latency.py $M --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
timeout 80 $B $C --output-json $OUT/lat_once.json > $L/lat_once.log 2>&1
echo "== latency, layers traced once rc=$?"; grep -E "^batch" $L/lat_once.log
JAXSERVE_TRACE_LAYER_ONCE=0 timeout 100 $B --enforce-eager --output-json $OUT/lat_unrolled.json > $L/lat_unrolled.log 2>&1
echo "== latency, unrolled trace rc=$?"; grep -E "^batch" $L/lat_unrolled.log
exit 0
