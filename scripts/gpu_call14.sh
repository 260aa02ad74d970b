#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh): the server's engine in its own process (jaxserve/mp_engine.py,
# the default now) against the engine thread in the server's process (--disable-frontend-multiprocessing), on one
# machine and one warm compile cache, 320 ShareGPT-like prompts at once; then the same 320 prompts offline
# (bench_throughput: no HTTP), the figure serving would reach with no front-end cost.
# Order: mp (cold cache) -> inproc -> mp -> inproc, the last two with 4 client processes.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs14; mkdir -p $L
source scripts/gpu_serve_lib.sh
serve mp1 ""
serve inproc "" "--disable-frontend-multiprocessing"
# The benchmark client is one Python process parsing every SSE chunk (client_cpu_busy says how busy): again with 4.
serve mp2 "" "" "--client-processes 4"
serve inproc2 "" "--disable-frontend-multiprocessing" "--client-processes 4"
t0=$SECONDS
timeout 150 python3 scripts/bench_throughput.py $M --max-model-len 2048 --compile-cache-dir $SERVE_CACHE \
  --dataset sharegpt-like --num-prompts 320 --disable-tqdm --output-json $OUT/offline320.json > $L/offline320.log 2>&1
echo "== offline320 rc=$? $((SECONDS - t0)) s"; grep -iE "tok/s|throughput|steps" $L/offline320.log | tail -4
grep -hE "engine ready|compiled [0-9]+ step" $L/server_*.log | cut -c1-160
tar czf $OUT/logs14.tgz -C /tmp logs14
