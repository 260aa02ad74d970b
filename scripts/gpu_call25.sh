#!/usr/bin/env bash
# Session 8, one H100 call (after scripts/gpu_setup.sh), with the FA3-layout Mosaic prefill as the default:
#   1. the prefill table again (whole call vs kernel alone, after work_items lost its while loop);
#   2. start to first served token, cold then twice warm (bench_startup), on the cache the servers then use;
#   3. the 320-prompt ShareGPT-like burst against a server with the one-warpgroup prefill, then with the default.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs25; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 575 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"; }
run bench 80 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill --mosaic-fa3
grep -E "^device|ours_mosaic" $L/bench.log | cut -c1-130
cp /tmp/kernels/results.json $OUT/kernels_prefill.json 2>/dev/null
run startup 200 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048
grep -E "^ *[1-3] |warm start" $L/startup.log | tail -4
for r in 1 2 3; do grep -E "dummy weights|ahead of time|profile run|engine ready" $L/st/run$r.log | cut -c12-23,60-140 | tr '\n' '|'; echo; done
source scripts/gpu_serve_lib.sh
if [ $SECONDS -lt 420 ]; then serve prefill_wg1 "" "--mosaic-prefill-warpgroups 1"; fi
if [ $SECONDS -lt 470 ]; then serve prefill_fa3 "" ""; fi
tar czf $OUT/logs25.tgz -C /tmp logs25
