#!/usr/bin/env bash
# Session 12, one 2-GPU call (after scripts/gpu_setup.sh): offline TP=2 (512 running requests) with sampling inside
# the step's program for steps of <= 64 tokens (call 50's run with every decode shape fused failed to allocate an
# all-reduce's scratch at warm-up), then the same run with it off.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs51; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 370 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "Throughput|engine ready|forward with its sampling|Error" "$L/$name.log" | cut -c1-230 | tail -4; }
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --compile-threads 8"
run off_tp2 190 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2.json
JAXSERVE_FUSED_SAMPLING=0 run off_tp2_unfused 170 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2_unfused.json
tar czf $OUT/logs51.tgz -C /tmp logs51
