#!/usr/bin/env bash
# Session 14, one 4-GPU call (after scripts/gpu_setup.sh): dummy Llama-3-70B at TP=4 offline (200 ShareGPT-like
# prompts) with the defaults, the run that failed twice in session 6 ("Failed to allocate collective memory ...
# CUDA_ERROR_OUT_OF_MEMORY" in the warm-up) and was never re-run: compile threads now default to 1 on several
# devices, and the all-reduces sit in XLA's command buffers. Device memory is sampled every 5 s meanwhile.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/logs61; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader -l 5 > $L/mem.log 2>&1 &
SMI=$!
T="python3 scripts/bench_throughput.py --model benchmarks/configs/llama3-70b.json --load-format dummy --skip-tokenizer-init
   --dtype bfloat16 --max-model-len 2048 --compile-cache-dir /tmp/jc --dataset sharegpt-like --disable-tqdm"
t0=$SECONDS
timeout 470 $T --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json > $L/off70b_tp4.log 2>&1
echo "== off70b_tp4 rc=$? $((SECONDS - t0)) s"
grep -E "Throughput|KV cache:|engine ready|compiled|Error|error|OUT_OF_MEMORY" $L/off70b_tp4.log | cut -c1-300 | tail -12
kill $SMI; sort -t, -k2 -n $L/mem.log | tail -4
tar czf $OUT/logs61.tgz -C /tmp logs61
