#!/usr/bin/env bash
# Session 11, one H100 (after scripts/gpu_setup.sh): the program store (compiled step programs kept between starts,
# loaded with nothing traced). 1) check_program_store.py on SmolLM2: cold start, a start from jax's cache that
# serializes its programs again (--store-cache-hits: is that safe on the GPU?), a start from the store; the same
# tokens each time. 2) Warm start of dummy Llama-3-8B: one cold start, three warm. 3) Batch-1/64 decode on the
# warm cache (steps call the loaded programs), against calls 34/36's 5.67 ms.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs41; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"; }
run store 200 python3 scripts/check_program_store.py --store-cache-hits
tail -5 $L/store.log
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
C=/root/.cache/jaxserve/bench_startup
run startup 240 python3 scripts/bench_startup.py --runs 4 --log-dir $L/st --output-json $OUT/startup.json -- $M
grep -E "^ *[1-4] |warm start" $L/startup.log | tail -5
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "program store|ahead of time|step shapes in|engine ready|not kept|not loaded" $f | cut -c12-23,60-220 | tr '\n' '|')"; done
run lat 150 python3 scripts/bench_latency.py $M --compile-cache-dir $C --max-num-seqs 64 --batch-sizes 1 64 \
  --input-len 128 --output-len 128 --output-json $OUT/lat.json
grep -E "^batch|ms per|engine ready|program store" $L/lat.log | cut -c1-200 | tail -5
ls -la $C/jaxserve_programs | head -3; du -sh $C/jaxserve_programs
tar czf $OUT/logs41.tgz -C /tmp logs41
