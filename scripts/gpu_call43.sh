#!/usr/bin/env bash
# Session 11, one 2-GPU call (after scripts/gpu_setup.sh): issue 6's offline TP=2 against TP=1 with the one-program
# step (call 35's offline runs failed on the alignment bug, fixed since), and batch-1/64 decode at both, on one
# machine. Steps call the warm-up's compiled programs (the program store, session 11).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs43; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|engine ready|Error" "$L/$name.log" | cut -c1-230 | tail -4; }
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_tp2 170 $T --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/off_tp2.json
run off_tp1 150 $T --output-json $OUT/off_tp1.json
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
run lat_tp2 100 $B --tensor-parallel-size 2 --compile-threads 8 --output-json $OUT/lat_tp2.json
run lat_tp1 90 $B --compile-threads 8 --output-json $OUT/lat_tp1.json
tar czf $OUT/logs43.tgz -C /tmp logs43
