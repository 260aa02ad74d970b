#!/usr/bin/env bash
# Session 9, one 2 x H100 call (after scripts/gpu_setup.sh): issue 6 offline ratio with synchronous all-reduces (the
# default since session 8, platform.py): 1000 ShareGPT-like prompts of dummy Llama-3-8B at TP=2 and TP=1 on one
# machine, then the batch-256 and batch-512 steps at TP=2 and TP=1
# (the larger batch as time allows).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs31; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 560 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "Throughput|replayed|without the profiler|Error" "$L/$name.log" | cut -c1-220 | tail -3; }
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_tp2 200 $T --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/off_tp2.json
run off_tp1 170 $T --output-json $OUT/off_tp1.json
P="python3 scripts/profile_decode.py $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
run prof256_tp2 90 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
run prof256_tp1 90 $P --trace-dir /tmp/p1 --output-json $OUT/prof256_tp1.json
P5="python3 scripts/profile_decode.py $E --enforce-eager --batch-size 512 --max-num-seqs 512 --input-len 200 --steps 20 --replay 10"
run prof512_tp2 80 $P5 --tensor-parallel-size 2 --trace-dir /tmp/p52 --output-json $OUT/prof512_tp2.json
run prof512_tp1 80 $P5 --trace-dir /tmp/p51 --output-json $OUT/prof512_tp1.json
tar czf $OUT/logs31.tgz -C /tmp logs31
