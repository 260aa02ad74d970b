#!/usr/bin/env bash
# Session 17, one 2-GPU call (after scripts/gpu_setup.sh), meant for an H100 pair (`nvidia-h100-x2`): the rest of
# issue 6's table on one machine with the current code: TP=1 (baseline, rerun), TP=2 and PP=2 decode at batch 1, 64
# and 256 (128 + 128, --max-num-seqs 256), and PP=2 offline (1000 ShareGPT-like prompts). Dummy Llama-3-8B, one
# compile cache, --compile-threads 8. Given H200s it stops at once unless ANY_CARD=1.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
   --compile-cache-dir /tmp/jc --compile-threads 8"
L=/tmp/logs74
RUN_SHOW="^batch|Throughput|engine ready|Error|error:"; RUN_TAIL=5; source scripts/gpu_run_lib.sh
h100_pair_or_stop
B="python3 scripts/bench_latency.py $E --max-num-seqs 256 --batch-sizes 1 64 256 --input-len 128 --output-len 128"
run lat_tp1 120 $B --output-json $OUT/lat_tp1.json
run lat_tp2 140 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2.json
run lat_pp2 140 $B --pipeline-parallel-size 2 --output-json $OUT/lat_pp2.json
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_pp2 $((585 - SECONDS)) $T --pipeline-parallel-size 2 --output-json $OUT/off_pp2.json
tar czf $OUT/logs74.tgz -C /tmp logs74
