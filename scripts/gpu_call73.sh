#!/usr/bin/env bash
# Session 17, one 2-GPU call (after scripts/gpu_setup.sh), meant for an H100 pair (`nvidia-h100-x2`): issue 6's TP=1
# baseline beside TP=2 with the current code, which has only run on H200 pairs since session 9 (sampling inside the
# TP=2 step, unpacking on the mesh, the collectives' memory). Dummy Llama-3-8B, bench_latency batch 1 / 64
# (128 + 128) and offline 1000 ShareGPT-like prompts at TP=1 and TP=2, one compile cache, --compile-threads 8.
# Given H200s instead it stops at once unless ANY_CARD=1 (sessions 11-16 have six H200-pair calls of this already).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
   --compile-cache-dir /tmp/jc --compile-threads 8"
L=/tmp/logs73
RUN_SHOW="^batch|Throughput|engine ready|Error|error:"; source scripts/gpu_run_lib.sh
h100_pair_or_stop
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
run lat_tp1 110 $B --output-json $OUT/lat_tp1.json
run lat_tp2 130 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2.json
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_tp2 170 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2.json
run off_tp1 $((588 - SECONDS)) $T --output-json $OUT/off_tp1.json
tar czf $OUT/logs73.tgz -C /tmp logs73
