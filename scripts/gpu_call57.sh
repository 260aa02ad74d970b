#!/usr/bin/env bash
# Session 14, one H100 (after scripts/gpu_setup.sh): does a larger KV page help decode attention at large batch?
# The burst is device-bound (call 56: the engine waits 6.1 of 9.2 ms per step for the device) and attention is 37%
# of the batch-256 step, reading KV at ~2.1 TB/s in 4 KiB pages (block 16). Here: the decode kernels at block 16,
# 64 and 32 (bench_kernels.py --block-size), then the engine's batch-256 decode step (profile_decode.py) at each.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs57; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 580 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "ours_mosaic|idle share without|decode steps at batch 256 without|Error" "$L/$name.log" | cut -c1-200 | tail -14; }
for b in 16 64 32; do
  run k$b 110 python3 scripts/bench_kernels.py --only decode --block-size $b --batches 64 256 --ctxs 256 512 2048 \
    --no-xla --repeats 10 --out $OUT/kernels_b$b
done
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
for b in 16 64 32; do
  run prof$b 110 python3 scripts/profile_decode.py $M --max-model-len 2048 --compile-cache-dir /tmp/jc --enforce-eager \
    --batch-size 256 --input-len 200 --steps 30 --replay 10 --block-size $b
done
tar czf $OUT/logs57.tgz -C /tmp logs57
