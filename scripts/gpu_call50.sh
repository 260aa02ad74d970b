#!/usr/bin/env bash
# Session 12, one 2-GPU call (after scripts/gpu_setup.sh): tensor-parallel steps that sample inside their program
# (model_runner.sampled_forward, the new default at TP>1) against sampling in a program of its own
# (JAXSERVE_FUSED_SAMPLING=0), batch-1/64 decode at TP=2, the TP=1 baseline, then offline TP=2 and TP=1 if time is left.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs50; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|engine ready|forward with its sampling|Error" "$L/$name.log" | cut -c1-230 | tail -5; }
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 --compile-threads 8"
run lat_tp2 130 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2.json
JAXSERVE_FUSED_SAMPLING=0 run lat_tp2_unfused 110 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2_unfused.json
run lat_tp1 90 $B --output-json $OUT/lat_tp1.json
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --compile-threads 8"
run off_tp2 190 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2.json
run off_tp1 150 $T --output-json $OUT/off_tp1.json
tar czf $OUT/logs50.tgz -C /tmp logs50
