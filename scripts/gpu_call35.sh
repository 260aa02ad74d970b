#!/usr/bin/env bash
# Session 10, one 2 x H100 call (after scripts/gpu_setup.sh): issue 6 after the step became one program (the forward
# unpacks its own packed inputs, commit 27c6e90) and the GC change (commit after it). Same runs as call 31 on one
# machine: the batch-256 step (enqueue, replayed forward, plain rounds), offline 1000 ShareGPT-like prompts, each at
# TP=2 and TP=1; then batch-1 / batch-64 decode at both, as time allows.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs35; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|replayed|without the profiler|Error" "$L/$name.log" | cut -c1-230 | tail -4; }
P="python3 scripts/profile_decode.py $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
P="$P --plain-rounds 2"
run prof256_tp2 90 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
run prof256_tp1 70 $P --trace-dir /tmp/p1 --output-json $OUT/prof256_tp1.json
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_tp2 170 $T --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/off_tp2.json
run off_tp1 150 $T --output-json $OUT/off_tp1.json
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
run lat_tp2 90 $B --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/lat_tp2.json
run lat_tp1 80 $B --compile-threads 8 --output-json $OUT/lat_tp1.json
tar czf $OUT/logs35.tgz -C /tmp logs35
