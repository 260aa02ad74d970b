#!/usr/bin/env bash
# Session 10, one H100 (after scripts/gpu_setup.sh): the start-up GC freeze (commit c3e3c28) on the GPU,
# then issue 7's start-up and serving rows, which session 9 did not re-run.
#   1. profile_decode at batch 256, three 50-step rounds per process, two processes: each round's longest step
#      should sit near its median now (session 9: one 190-250 ms step per process, a full collection).
#   2. bench_startup: one cold start, two warm (process start to first served token, target <= 20 s).
#   3. the 320-prompt ShareGPT-like burst against a real server on that warm cache (p99 ITL printed too).
#   4. batch-1 / batch-64 decode, 128 in + 128 out, as time allows.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs34; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|replayed|without the profiler|HBM|MFU|Error|warm start|^ *[1-3] " "$L/$name.log" \
          | cut -c1-240 | tail -${TAILN:-8}; }
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
P="python3 scripts/profile_decode.py $M --max-model-len 2048 --enforce-eager --batch-size 256 --input-len 200"
P="$P --steps 50 --replay 10 --plain-rounds 3"
for i in 1 2; do run gc_$i 75 $P --trace-dir /tmp/tg$i --output-json $OUT/prof256_gc_$i.json; done
run startup 210 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048
source scripts/gpu_serve_lib.sh
if [ $SECONDS -lt 430 ]; then
  serve default "" ""
  grep -E "p99_itl|p99_tpot|p99_ttft" $L/serving_default.log | tr -s ' ' | tr '\n' ' '; echo
fi
run lat 150 python3 scripts/bench_latency.py $M --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 \
  --input-len 128 --output-len 128 --compile-cache-dir /tmp/jcache --output-json $OUT/lat.json
tar czf $OUT/logs34.tgz -C /tmp logs34
