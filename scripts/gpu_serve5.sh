#!/usr/bin/env bash
# Issue 7, session 5, one H100 call (after scripts/gpu_setup.sh): the serving benchmark (320 ShareGPT-like prompts at
# once, a real server) with the engine defaults (Mosaic decode on Hopper since session 5) and with the prefill kernel
# switched (--mosaic-prefill-warpgroups PF_ALT), then batch-1/64 decode latency and offline throughput (1000
# ShareGPT-like prompts) with the defaults. All after the first on a warm compile cache.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
C="--compile-cache-dir /root/.cache/jaxserve/s5"
L=/tmp/logs; mkdir -p $L
source scripts/gpu_serve_lib.sh
SERVE_CACHE=/root/.cache/jaxserve/s5
serve default ""
serve prefill_alt "" "--mosaic-prefill-warpgroups ${PF_ALT:-0}"
cp /tmp/serving_default.png $OUT/ 2>/dev/null
timeout 90 python3 scripts/bench_latency.py $M $C --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 \
  --output-len 128 --output-json $OUT/lat.json > $L/lat.log 2>&1
echo "== latency rc=$?"; grep -E "^batch" $L/lat.log
timeout 150 python3 scripts/bench_throughput.py $M $C --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 \
  --disable-tqdm --output-json $OUT/offline.json > $L/offline.log 2>&1
echo "== offline rc=$?"; grep -E "Throughput|elapsed" $L/offline.log | tail -3
tar czf $OUT/logs.tgz -C /tmp logs
