#!/usr/bin/env bash
# Session 14, one H100 (after scripts/gpu_setup.sh): does the HTTP front-end bound the burst's TPOT on the GPU host?
# The 320-prompt burst against a real server (httptools + uvloop now installed), with 1 and then 4 client processes,
# each with the server's CPU per process over the burst (gpu_serve_lib.sh proc_cpu), the engine loop's host ms per
# step ("busy" log line) and the engine's own TTFT/TPOT from /metrics; then bench_frontend.py's lockstep mock at
# 12 ms steps (the front-end alone, no device) on this host's CPU.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs56; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)" | tr -s ' '
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
SERVE_CACHE=/tmp/jc; source scripts/gpu_serve_lib.sh
serve c1 "" ""
grep -E "engine_mean|p99_itl" $L/serving_c1.log | tr -s ' ' | tr '\n' ' '; echo
serve c4 "" "" "--client-processes 4"
grep -E "engine_mean|p99_itl" $L/serving_c4.log | tr -s ' ' | tr '\n' ' '; echo
timeout 200 python3 scripts/bench_frontend.py --step-ms 12 --output-len 200 --rounds 2 \
  --variants h11/asyncio httptools/uvloop --output-json $OUT/frontend12.json > $L/frontend12.log 2>&1
echo "== frontend12 rc=$?"; tail -12 $L/frontend12.log | cut -c1-220
timeout 100 python3 scripts/bench_frontend.py --step-ms 12 --output-len 200 --rounds 1 --num-prompts 640 \
  --variants httptools/uvloop --output-json $OUT/frontend12_640.json > $L/frontend12_640.log 2>&1
echo "== frontend12_640 rc=$?"; tail -6 $L/frontend12_640.log | cut -c1-220
tar czf $OUT/logs56.tgz -C /tmp logs56
