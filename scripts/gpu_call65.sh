#!/usr/bin/env bash
# Session 15, one 4 x H200 call (after scripts/gpu_setup.sh): session 14 call 61 again (dummy Llama-3-70B at TP=4
# offline, 200 ShareGPT-like prompts, which ran out of memory for its all-reduce scratch in the warm-up), with JAX's
# share now lowered for that scratch (engine_builder.collective_pool_fraction) and --compile-threads 8.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
L=/tmp/logs65; mkdir -p $L
nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -l 5 > $L/mem.log 2>&1 &
SMI=$!
t0=$SECONDS
timeout 470 python3 scripts/bench_throughput.py --model benchmarks/configs/llama3-70b.json --load-format dummy \
    --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --compile-cache-dir /tmp/jc70 --dataset sharegpt-like \
    --disable-tqdm --num-prompts 200 --tensor-parallel-size 4 --compile-threads 8 --output-json $OUT/off70b_tp4.json > $L/off70b_tp4.log 2>&1
echo "== off70b_tp4 rc=$? $((SECONDS - t0)) s"
grep -E "Throughput|share|KV cache:|program store|engine ready|Error|error:" $L/off70b_tp4.log | cut -c1-400 | tail -8
kill $SMI
awk -F', ' '{print $2, $3}' $L/mem.log | sort -k1,1n -k2,2n | awk '{m[$1]=$2} END {for (d in m) print "device", d, "max", m[d]}'
tar czf $OUT/logs65.tgz -C /tmp logs65
