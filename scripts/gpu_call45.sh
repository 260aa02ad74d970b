#!/usr/bin/env bash
# Session 11, one H100 (after scripts/gpu_setup.sh), after the review fixes (file names its key and shape; a failing
# stored program is dropped and compiled): 1) check_program_store.py --store-cache-hits on the SmolLM2 shape;
# 2) bench_startup, one cold start and two warm, on dummy Llama-3-8B.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs45; mkdir -p $L
timeout 200 python3 scripts/check_program_store.py --model benchmarks/configs/smollm2-135m.json --load-format dummy \
  --store-cache-hits > $L/store.log 2>&1; echo "== store rc=$?"; tail -5 $L/store.log
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
timeout 200 python3 scripts/bench_startup.py --runs 3 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1; echo "== startup rc=$?"
grep -E "^ *[1-3] |warm start" $L/startup.log | tail -4
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "program store|step programs|engine ready|failed|not loaded" $f | cut -c12-23,60-160 | tr '\n' '|')"; done
tar czf $OUT/logs45.tgz -C /tmp logs45
