#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh): warm start with profile_run's activation figure read from
# its side-cache (commit after gpu_call19): cold, then three warm starts on one cache.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs20; mkdir -p $L
t0=$SECONDS
timeout 250 python3 scripts/bench_startup.py --runs 4 --log-dir $L/st --output-json $OUT/startup.json -- $M \
  --max-model-len 2048 > $L/startup.log 2>&1
echo "== startup rc=$? $((SECONDS - t0)) s"; grep -E "^ *[1-4] |warm start" $L/startup.log | tail -5
for r in 1 2 3 4; do grep -E "dummy weights|ahead of time|engine ready" $L/st/run$r.log | cut -c12-23,60-140 | tr '\n' '|'; echo; done
tar czf $OUT/logs20.tgz -C /tmp logs20
