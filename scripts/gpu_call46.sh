#!/usr/bin/env bash
# Session 11, one H100 (after scripts/gpu_setup.sh): warm start with the stored programs loaded from 4 threads
# (model_runner.LOAD_THREADS; 1 thread in calls 41/44/45: 4.2-5.4 s for 17 programs). One cold start, three warm.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs46; mkdir -p $L
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
timeout 250 python3 scripts/bench_startup.py --runs 4 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1; echo "== startup rc=$?"
grep -E "^ *[1-4] |warm start" $L/startup.log | tail -5
for f in $L/st/run*.log; do echo "$(basename $f): $(grep -E "program store|step programs|engine ready|failed|not loaded" $f | cut -c12-23,60-160 | tr '\n' '|')"; done
tar czf $OUT/logs46.tgz -C /tmp logs46
