#!/usr/bin/env bash
# Session 10, one 2 x GPU call (after scripts/gpu_setup.sh): issue 6's one-program step against the two-program one
# (profile_decode --two-program-step) at TP=2, batch 256, on one machine, twice each, alternating; then TP=1 once.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs37; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt ${LIMIT:-280} ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "replayed|without the profiler|Error" "$L/$name.log" | cut -c1-230 | tail -3; }
P="python3 scripts/profile_decode.py $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
P="$P --plain-rounds 2 --tensor-parallel-size 2"
for i in 1 2; do
  run one_$i 75 $P --trace-dir /tmp/o$i --output-json $OUT/prof256_tp2_one_$i.json
  run two_$i 75 $P --two-program-step --trace-dir /tmp/t$i --output-json $OUT/prof256_tp2_two_$i.json
done
tar czf $OUT/logs37.tgz -C /tmp logs37
