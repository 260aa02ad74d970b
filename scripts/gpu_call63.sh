#!/usr/bin/env bash
# Session 15: run after call 64 with --compile-threads 8 (call 62 had timed out in its warm-ups without it).
# Session 15, the 2 x H200 machine of call 62, right after it: dummy Llama-3-70B at TP=2 offline, 200 ShareGPT-like
# prompts with the defaults (512 running requests: more step programs than call 62's 64), on call 62's compile
# cache. Device memory sampled every 5 s.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 JAXSERVE_LOGGING_LEVEL=INFO
L=/tmp/logs63; mkdir -p $L
nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader -l 5 > $L/mem.log 2>&1 &
SMI=$!
t0=$SECONDS
timeout 560 python3 scripts/bench_throughput.py --model benchmarks/configs/llama3-70b.json --load-format dummy \
    --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --compile-cache-dir /tmp/jc70 --dataset sharegpt-like \
    --disable-tqdm --num-prompts 200 --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/off70b_tp2.json > $L/off70b_tp2.log 2>&1
echo "== off70b_tp2 rc=$? $((SECONDS - t0)) s"
grep -E "Throughput|share|KV cache:|program store|engine ready|Error|error:" $L/off70b_tp2.log | cut -c1-400 | tail -8
kill $SMI
awk -F', ' '{print $2, $3}' $L/mem.log | sort -k1,1n -k2,2n | awk '{m[$1]=$2} END {for (d in m) print "device", d, "max", m[d]}'
tar czf $OUT/logs63.tgz -C /tmp logs63
