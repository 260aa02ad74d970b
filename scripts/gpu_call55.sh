#!/usr/bin/env bash
# Session 13, one 2-GPU call (after scripts/gpu_setup.sh): call 54's TP=2 batch-1/64 decode ran at 8.06/10.96 ms where
# call 50 (session 12, 2 x H200) had 5.11/4.91 ms. Here call 50's exact command again (default compile cache, no
# --compile-cache-dir), TP=1 on the same machine, then TP=2 with sampling in its own program.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs55; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 440 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Error" "$L/$name.log" | cut -c1-200 | tail -3; }
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 --compile-threads 8"
run lat_tp2 130 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2.json
run lat_tp1 130 $B --output-json $OUT/lat_tp1.json
JAXSERVE_FUSED_SAMPLING=0 run lat_tp2_unfused 100 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2_unfused.json
tar czf $OUT/logs55.tgz -C /tmp logs55
