#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh): start to first served token after the engine-process
# start-up fix (uvicorn and the app imported while the engine process starts): cold then warm with the defaults,
# then warm again with the engine in the server's process (--disable-frontend-multiprocessing), same cache.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs17; mkdir -p $L
t0=$SECONDS
timeout 200 python3 scripts/bench_startup.py --runs 2 --log-dir $L/mp --output-json $OUT/startup_mp.json -- $M \
  --max-model-len 2048 > $L/startup_mp.log 2>&1
echo "== startup_mp rc=$? $((SECONDS - t0)) s"; grep -E "^ *[12] |warm start" $L/startup_mp.log | tail -3
t0=$SECONDS
timeout 80 python3 scripts/bench_startup.py --runs 1 --keep-cache --log-dir $L/inproc --output-json $OUT/startup_inproc.json \
  -- $M --max-model-len 2048 --disable-frontend-multiprocessing > $L/startup_inproc.log 2>&1
echo "== startup_inproc rc=$? $((SECONDS - t0)) s"; grep -E "^ *1 |warm start" $L/startup_inproc.log | tail -2
timeout 60 python3 scripts/bench_startup.py --runs 1 --keep-cache --log-dir $L/mp2 --output-json $OUT/startup_mp2.json \
  -- $M --max-model-len 2048 > $L/startup_mp2.log 2>&1
echo "== startup_mp2 rc=$?"; grep -E "^ *1 |warm start" $L/startup_mp2.log | tail -2
grep -hE "engine ready" $L/*/*.log | cut -c1-120
tar czf $OUT/logs17.tgz -C /tmp logs17
