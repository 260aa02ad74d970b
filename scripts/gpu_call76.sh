#!/usr/bin/env bash
# Session 17, one 2-GPU call (after scripts/gpu_setup.sh): call 74/75's PP=2 warm-up failure with the allocator's
# state logged (JAXSERVE_LOGGING_LEVEL=DEBUG: in use, peak and largest free block per device before and after the
# KV cache, and after every warm-up shape), then PP=2 decode with a KV cache 8 GiB smaller than the rule gives
# (--kv-cache-memory), for issue 6's table.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=DEBUG
card=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee /dev/stderr | head -1)
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
   --compile-cache-dir /tmp/jc --compile-threads 8 --max-num-seqs 256 --pipeline-parallel-size 2"
L=/tmp/logs76
RUN_SHOW="memory|warm-up T|^batch|engine ready|Error|error:"; RUN_TAIL=30; RUN_CUT=330; source scripts/gpu_run_lib.sh
B="python3 scripts/bench_latency.py $E --batch-sizes 1 64 256 --input-len 128 --output-len 128"
run lat_pp2 150 $B --output-json $OUT/lat_pp2.json
case "$card" in *H200*) kv=$((99 << 30)) ;; *) kv=$((52 << 30)) ;; esac
RUN_TAIL=8; run lat_pp2_kv $((585 - SECONDS)) $B --kv-cache-memory $kv --output-json $OUT/lat_pp2_kv.json
tar czf $OUT/logs76.tgz -C /tmp logs76
