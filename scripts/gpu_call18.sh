#!/usr/bin/env bash
# Session 7, one 2 x H100 call (after scripts/gpu_setup.sh): issue 6's batch-256 decode step at TP=2 against TP=1 on
# the same machine, and XLA's one-shot all-reduce kernel (NVLink peer-to-peer, for small all-reduces) in place of
# NCCL's: the step's 64 all-reduces of 2 MB are latency-bound. profile_decode.py: replayed forward (device time)
# and 20 steps without the profiler.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
P="python3 scripts/profile_decode.py $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
L=/tmp/logs18; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 540 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "replayed|without the profiler|Error" "$L/$name.log" | cut -c1-200 | tail -3; }
run tp2 110 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
XLA_FLAGS="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" \
  run tp2_oneshot 110 $P --tensor-parallel-size 2 --trace-dir /tmp/p2o --output-json $OUT/prof256_tp2_oneshot.json
grep -E "^(ncc|all|one|AllReduce)|all_reduce|AllReduce|OneShot" $L/tp2_oneshot.log | head -5
run tp1 110 $P --trace-dir /tmp/p1 --output-json $OUT/prof256_tp1.json
sed -n '/^op /,+12p' $L/tp2.log | cut -c1-110
sed -n '/^op /,+12p' $L/tp2_oneshot.log | cut -c1-110
tar czf $OUT/logs18.tgz -C /tmp logs18
