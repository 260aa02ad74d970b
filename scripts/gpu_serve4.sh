#!/usr/bin/env bash
# Issue 7, session 4, one H100 call (after scripts/gpu_setup.sh): the warm start (serial and --compile-threads 8
# loads), then the serving benchmark (320 ShareGPT-like prompts at once) on a real server, A/B over what the
# server process does besides the engine: the GIL switch interval, uvloop + httptools (wheels in .whl/uv), and
# 512 vs 256 running requests. Every server start after the first finds the compile cache warm.
# Key lines go to stdout; JSONs (few: $OUT returns a limited number of files) to $OUT.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
C=/root/.cache/jaxserve/bench_startup
L=/tmp/s4; mkdir -p $L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/uv .whl/uv/*.whl 2>/dev/null
timeout 260 python3 scripts/bench_startup.py --runs 2 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup.log | tail -6
timeout 90 python3 scripts/bench_startup.py --runs 1 --keep-cache --log-dir $L/st8 --output-json $OUT/startup_threads.json \
  -- $M --max-model-len 2048 --compile-threads 8 > $L/startup8.log 2>&1
echo "== startup, warm, --compile-threads 8 rc=$?"; grep -E "^ *1 |warm start|ahead of time" $L/startup8.log $L/st8/*.log | tail -3
source scripts/gpu_serve_lib.sh
SERVE_CACHE=$C
serve base "JAXSERVE_NOOP=1" ""
serve gil05 "JAXSERVE_GIL_SWITCH_MS=0.5" ""
serve gil05_uvloop "JAXSERVE_GIL_SWITCH_MS=0.5 PYTHONPATH=/tmp/site:/tmp/uv" ""
serve seqs256 "JAXSERVE_NOOP=1" "--max-num-seqs 256"
exit 0
