#!/usr/bin/env bash
# Session 16, one 2-GPU call (after scripts/gpu_setup.sh): does TP=2 decode, host-bound at batch 1 (its program
# runs ~3.65 ms, the engine's step ~4.9 ms), enqueue faster without XLA's command buffers? A TP=2 decode program
# is 65 command buffers per device, split by its 64 all-reduces (session 12). bench_latency batch 1 / 64 at TP=2
# with the defaults and with --xla_gpu_enable_command_buffer= (none), and TP=1 on the same machine.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048
   --compile-threads 8 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
L=/tmp/logs72
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
source scripts/gpu_run_lib.sh
B="python3 scripts/bench_latency.py $E"
run tp2 140 $B --tensor-parallel-size 2 --compile-cache-dir /tmp/jc --output-json $OUT/tp2.json
export XLA_FLAGS="--xla_gpu_enable_command_buffer="
run tp2_nocb 140 $B --tensor-parallel-size 2 --compile-cache-dir /tmp/jc_nocb --output-json $OUT/tp2_nocb.json
unset XLA_FLAGS
run tp1 120 $B --compile-cache-dir /tmp/jc --output-json $OUT/tp1.json
run tp2_again 80 $B --tensor-parallel-size 2 --compile-cache-dir /tmp/jc --output-json $OUT/tp2_again.json
tar czf $OUT/logs72.tgz -C /tmp logs72
