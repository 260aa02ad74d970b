#!/usr/bin/env bash
# Session 11, one H100 (after scripts/gpu_setup.sh), final code: 1) bench_startup (one cold start, two warm) with the
# program store; 2) the 320-prompt burst on a server started from that warm cache (steps call the loaded programs);
# 3) offline 1000 ShareGPT-like prompts (not re-run on one H100 in session 10).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs44; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 560 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "Throughput|Error|warm start|^ *[1-3] " "$L/$name.log" | cut -c1-230 | tail -5; }
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
run startup 170 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "program store|step programs|engine ready" $f | cut -c12-23,60-160 | tr '\n' '|')"; done
source scripts/gpu_serve_lib.sh
serve default "" ""
grep -E "p99_itl|p99_tpot|p99_ttft" $L/serving_default.log | tr -s ' ' | tr '\n' ' '; echo
grep -E "program store|engine ready" $L/server_default.log | cut -c12-200
run off 170 python3 scripts/bench_throughput.py $M --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 \
  --disable-tqdm --output-json $OUT/off.json
tar czf $OUT/logs44.tgz -C /tmp logs44
