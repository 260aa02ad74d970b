#!/usr/bin/env bash
# Issue 7, session 5, one H100 call (after scripts/gpu_setup.sh): process start to first served token (cold, then
# warm compile cache) with --attention-backend pallas_triton and with the Hopper defaults (Mosaic decode + prefill:
# each Mosaic kernel shape is lowered in Python at every start, ~0.7 s each, before the persistent cache is read);
# then, on the warm cache, the serving benchmark (320 ShareGPT-like prompts at once) with each backend.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
C=/root/.cache/jaxserve/bench_startup
L=/tmp/logs; mkdir -p $L
timeout 150 python3 scripts/bench_startup.py --runs 2 --log-dir $L/stt --output-json $OUT/startup_triton.json -- $M \
  --max-model-len 2048 --attention-backend pallas_triton > $L/startup_triton.log 2>&1
echo "== startup, pallas_triton rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup_triton.log | tail -4
timeout 220 python3 scripts/bench_startup.py --runs 2 --keep-cache --log-dir $L/st --output-json $OUT/startup_mosaic.json -- $M \
  --max-model-len 2048 > $L/startup_mosaic.log 2>&1
echo "== startup, Mosaic defaults (run 1 compiles the Mosaic programs) rc=$?"; grep -E "^ *run|^ *[12] |warm start" $L/startup_mosaic.log | tail -4
grep -hE "compiled [0-9]+ step shapes|engine ready" $L/stt/*.log $L/st/*.log 2>/dev/null | cut -c1-160
source scripts/gpu_serve_lib.sh
SERVE_CACHE=$C
serve mosaic ""
serve triton "" "--attention-backend pallas_triton"
tar czf $OUT/logs.tgz -C /tmp logs
