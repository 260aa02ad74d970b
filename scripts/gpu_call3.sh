#!/usr/bin/env bash
# Issue 6 on a 2-GPU machine (after scripts/gpu_setup.sh): dummy Llama-3-8B at TP=1, TP=2, PP=2 on the same
# machine (single-process sharded steps run async since 1d497fa). Writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
E="--enforce-eager --max-model-len 2048"
run() { local name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|Error" "$OUT/$name.log" | tail -4; }
for cfg in "tp1:--tensor-parallel-size 1" "tp2:--tensor-parallel-size 2" "pp2:--pipeline-parallel-size 2"; do
  n=${cfg%%:*}; f=${cfg#*:}
  run lat_$n 110 python3 scripts/bench_latency.py $M $E $f --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 64 --output-json $OUT/lat_$n.json
  run tp_$n 150 python3 scripts/bench_throughput.py $M --max-model-len 2048 $f --max-num-seqs 256 --dataset sharegpt-like --num-prompts 300 --disable-tqdm --output-json $OUT/tp_$n.json
done
# Pipeline micro-batches on prefill-heavy steps (random 1024 in / 64 out), on and off.
for mb in 1024 0; do
  run pp2_rand_mb$mb 150 python3 scripts/bench_throughput.py $M --max-model-len 2048 --pipeline-parallel-size 2 --pp-microbatch-tokens $mb --dataset random --input-len 1024 --output-len 64 --num-prompts 200 --disable-tqdm --output-json $OUT/pp2_rand_mb$mb.json
done
