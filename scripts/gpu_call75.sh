#!/usr/bin/env bash
# Session 17, one 2-GPU call (after scripts/gpu_setup.sh): why call 74's PP=2 engine (--max-num-seqs 256) ran out of
# memory in its warm-up allocating one more layer's pages (1.89 GiB) inside a stage's step. scripts/step_memory.py
# compiles every warm-up shape's program(s) at a real KV cache and prints XLA's memory analysis, for PP=2 and TP=1;
# then PP=2 decode latency with 5% less of the device given to JAX (the table's missing row).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
   --compile-cache-dir /tmp/jc --compile-threads 8 --max-num-seqs 256"
L=/tmp/logs75
RUN_SHOW="^T=|pages on one|^batch|engine ready|Error|error:"; RUN_TAIL=40; RUN_CUT=170; source scripts/gpu_run_lib.sh
M="python3 scripts/step_memory.py $E --enforce-eager --num-gpu-blocks-override 8192"
run mem_pp2 200 $M --pipeline-parallel-size 2 --output-json $OUT/mem_pp2.json
RUN_TAIL=20; run mem_tp1 130 $M --output-json $OUT/mem_tp1.json
RUN_TAIL=5
run lat_pp2 $((585 - SECONDS)) python3 scripts/bench_latency.py $E --batch-sizes 1 64 256 --input-len 128 --output-len 128 \
    --pipeline-parallel-size 2 --gpu-memory-utilization 0.85 --output-json $OUT/lat_pp2.json
tar czf $OUT/logs75.tgz -C /tmp logs75
