#!/usr/bin/env bash
# Issue 7, session 5, one H100 call (after scripts/gpu_setup.sh): process start to first served token, cold then warm
# compile cache, with the Hopper defaults (Mosaic decode + prefill: each kernel shape is lowered in Python at every
# start, ~0.7 s each, before the persistent cache is consulted), then the same with --attention-backend pallas_triton.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs; mkdir -p $L
timeout 280 python3 scripts/bench_startup.py --runs 2 --log-dir $L/st --output-json $OUT/startup_mosaic.json -- $M \
  --max-model-len 2048 > $L/startup_mosaic.log 2>&1
echo "== startup, Mosaic defaults rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup_mosaic.log | tail -6
timeout 200 python3 scripts/bench_startup.py --runs 2 --log-dir $L/stt --output-json $OUT/startup_triton.json -- $M \
  --max-model-len 2048 --attention-backend pallas_triton > $L/startup_triton.log 2>&1
echo "== startup, pallas_triton rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup_triton.log | tail -6
grep -hE "compiled [0-9]+ step shapes|engine ready" $L/st/*.log $L/stt/*.log 2>/dev/null | cut -c1-220
tar czf $OUT/logs.tgz -C /tmp logs
