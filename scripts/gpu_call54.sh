#!/usr/bin/env bash
# Session 13, one 2-GPU call (after scripts/gpu_setup.sh), all on one compile cache: batch-1/64 decode at TP=2 (steps
# sampling inside their program, the default) and TP=1, offline 1000 ShareGPT-like prompts at TP=2, the 320-prompt
# burst on a TP=2 server, then offline TP=1 if time is left.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
E="$M --max-model-len 2048 --compile-cache-dir /tmp/jc --compile-threads 8"
L=/tmp/logs54; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|engine ready|Error" "$L/$name.log" | cut -c1-230 | tail -4; }
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
run lat_tp2 130 $B --tensor-parallel-size 2 --output-json $OUT/lat_tp2.json
run lat_tp1 90 $B --output-json $OUT/lat_tp1.json
T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
run off_tp2 150 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2.json
if [ $SECONDS -lt 380 ]; then
  SERVE_CACHE=/tmp/jc; source scripts/gpu_serve_lib.sh
  serve tp2 "" "--tensor-parallel-size 2 --compile-threads 8"
  grep -E "p99_itl|p99_tpot|p99_ttft" $L/serving_tp2.log | tr -s ' ' | tr '\n' ' '; echo
fi
run off_tp1 110 $T --output-json $OUT/off_tp1.json
tar czf $OUT/logs54.tgz -C /tmp logs54
