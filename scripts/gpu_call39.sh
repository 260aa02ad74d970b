#!/usr/bin/env bash
# Session 10, one H100 (after scripts/gpu_setup.sh): warm start against the number of compile threads. Tracing and
# lowering hold the GIL (call 38: 92 s summed over 8 threads in a 17 s compile_ahead), loading from the cache does
# not. Compile_ahead now traces its first shape alone. One cold + one warm start at the default (8 threads on a
# GPU), then one warm start each at 4, 2 and 1 (1: no compile_ahead; warm-up compiles one by one).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs39; mkdir -p $L
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
show() { grep -E "^ *[1-3] " $L/$1.log | tail -2
         for f in $L/$1/run*.log; do echo "$(basename $f): $(grep -E "profile run|ahead of time|step shapes in|engine ready" $f | cut -c12-23,60-200 | tr '\n' '|')"; done; }
timeout 200 python3 scripts/bench_startup.py --runs 2 --log-dir $L/t8 --output-json $OUT/startup_t8.json -- $M \
  > $L/t8.log 2>&1; echo "== t8 rc=$? $SECONDS s"; show t8
for t in 4 2 1; do
  [ $SECONDS -gt 330 ] && break
  timeout 60 python3 scripts/bench_startup.py --runs 1 --keep-cache --log-dir $L/t$t --output-json $OUT/startup_t$t.json \
    -- $M --compile-threads $t > $L/t$t.log 2>&1; echo "== t$t rc=$? $SECONDS s"; show t$t
done
tar czf $OUT/logs39.tgz -C /tmp logs39
