#!/usr/bin/env bash
# Session 15, one 2 x H200 call (after scripts/gpu_setup.sh): call 62 again with --compile-threads 8, on the fix
# that lowers JAX's share of each device by the all-reduce scratch that does not fit beyond it
# (engine_builder.collective_pool_fraction). 1. dummy Llama-3-70B at TP=2, bench_latency batch 1 / 64;
# 2. if time is left, dummy Llama-3-8B at TP=2 (its scratch fits: the share stays 90%). Device memory every 5 s.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
L=/tmp/logs64; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -l 5 > $L/mem.log 2>&1 &
SMI=$!
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 590 ]; then echo "== $name skipped"; return; fi
        echo "== $name start $(date +%T)"
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|program store|KV cache:|share|compiled|engine ready|Error|error:" "$L/$name.log" \
            | cut -c1-400 | tail -7; }
C="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --tensor-parallel-size 2"
B="python3 scripts/bench_latency.py $C --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128
   --compile-threads 8"
run tp2_70b 430 $B --model benchmarks/configs/llama3-70b.json --compile-cache-dir /tmp/jc70 \
    --output-json $OUT/tp2_70b.json
run tp2_8b $((585 - SECONDS)) $B --model benchmarks/configs/llama3-8b.json --compile-cache-dir /tmp/jc8 \
    --output-json $OUT/tp2_8b.json
kill $SMI
awk -F', ' '{print $2, $3}' $L/mem.log | sort -k1,1n -k2,2n | awk '{m[$1]=$2} END {for (d in m) print "device", d, "max", m[d]}'
tar czf $OUT/logs64.tgz -C /tmp logs64
