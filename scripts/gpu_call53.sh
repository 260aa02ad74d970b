#!/usr/bin/env bash
# Session 13, one H100 (after scripts/gpu_setup.sh): issue 7's rows with this session's code (TP=1 steps unchanged
# since session 11): batch-1/64 decode, the 320-prompt burst on a real server, offline 1000 ShareGPT-like prompts,
# and the batch-256 idle share, all on one compile cache.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs53; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 575 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|idle share|Error" "$L/$name.log" | cut -c1-220 | tail -5; }
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
C="--compile-cache-dir /tmp/jc"
run lat 130 python3 scripts/bench_latency.py $M --max-model-len 2048 $C --max-num-seqs 64 --batch-sizes 1 64 \
  --input-len 128 --output-len 128 --output-json $OUT/lat.json
SERVE_CACHE=/tmp/jc; source scripts/gpu_serve_lib.sh
serve default "" ""
grep -E "p99_itl|p99_tpot|p99_ttft" $L/serving_default.log | tr -s ' ' | tr '\n' ' '; echo
run off 150 python3 scripts/bench_throughput.py $M --max-model-len 2048 $C --dataset sharegpt-like --num-prompts 1000 \
  --disable-tqdm --output-json $OUT/off.json
run prof 90 python3 scripts/profile_decode.py $M --max-model-len 2048 $C --enforce-eager --batch-size 256 \
  --input-len 200 --steps 50 --replay 10
tar czf $OUT/logs53.tgz -C /tmp logs53
