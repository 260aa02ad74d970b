#!/usr/bin/env bash
# Session 15, one 2 x H200 call (after scripts/gpu_setup.sh): the collective-scratch fix of session 14 on a GPU.
# Session 15 note: every run here timed out in the warm-up (no --compile-threads: one thread on several devices);
# add --compile-threads 8 to B before running it again (docs/PERF.md, session 15).
# 1. dummy Llama-3-8B at TP=2, bench_latency batch 1 / 64 with the new default (JAX's allocator grows on demand for
#    several devices) on a cold compile cache, then the same programs with the allocator preallocated as before
#    (XLA_PYTHON_CLIENT_PREALLOCATE=true): does growing on demand cost step time?
# 2. dummy Llama-3-70B at TP=2 (issue 6's 70B run, never run before), batch 1 / 64: does the warm-up now fit its
#    all-reduces' scratch? nvidia-smi samples device memory every 5 s; the engine logs its KV sizing (INFO).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
L=/tmp/logs62; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -l 5 > $L/mem.log 2>&1 &
SMI=$!
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 590 ]; then echo "== $name skipped"; return; fi
        echo "== $name start $(date +%T)"
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|program store|KV cache:|engine ready|Error|error:" "$L/$name.log" | cut -c1-400 | tail -6; }
C="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --tensor-parallel-size 2"
B="python3 scripts/bench_latency.py $C --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
M8="--model benchmarks/configs/llama3-8b.json --compile-cache-dir /tmp/jc8"
run tp2_grow 160 $B $M8 --output-json $OUT/tp2_grow.json
run tp2_prealloc 90 env XLA_PYTHON_CLIENT_PREALLOCATE=true $B $M8 --output-json $OUT/tp2_prealloc.json
run tp2_grow_again 90 $B $M8 --output-json $OUT/tp2_grow_again.json
run tp2_70b $((585 - SECONDS)) $B --model benchmarks/configs/llama3-70b.json --compile-cache-dir /tmp/jc70 \
    --output-json $OUT/tp2_70b.json
kill $SMI
awk -F', ' '{print $2, $3}' $L/mem.log | sort -k1,1n -k2,2n | awk '{m[$1]=$2} END {for (d in m) print "device", d, "max", m[d]}'
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
tar czf $OUT/logs62.tgz -C /tmp logs62
