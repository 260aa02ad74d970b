#!/usr/bin/env bash
# Session 14, one 2-GPU call (after scripts/gpu_setup.sh): call 54's TP=2 decode (8.06 / 10.96 ms at batch 1 / 64,
# with --compile-cache-dir /tmp/jc) against call 55's (5.74 / 5.61 ms, default cache folder) on two other hosts.
# Here all on one machine: TP=2 on a cold /tmp/jc (compiles and stores its programs), TP=2 again on the warm /tmp/jc
# (programs loaded from the store), TP=1 on /tmp/jc, then TP=2 with the default cache folder (call 55's command).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs58; mkdir -p $L
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|program store|engine ready|Error" "$L/$name.log" | cut -c1-200 | tail -4; }
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 --compile-threads 8"
run tp2_cold 140 $B --tensor-parallel-size 2 --compile-cache-dir /tmp/jc --output-json $OUT/tp2_cold.json
run tp2_warm 80 $B --tensor-parallel-size 2 --compile-cache-dir /tmp/jc --output-json $OUT/tp2_warm.json
run tp1 110 $B --compile-cache-dir /tmp/jc --output-json $OUT/tp1.json
run tp2_default 140 $B --tensor-parallel-size 2 --output-json $OUT/tp2_default.json
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
tar czf $OUT/logs58.tgz -C /tmp logs58
