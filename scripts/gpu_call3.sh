#!/usr/bin/env bash
# Issue 6 on a 2-GPU machine (after scripts/gpu_setup.sh), sized to fit one 10-minute call: dummy Llama-3-8B
# decode step times at TP=1, TP=2, PP=2 on the same machine; pipeline micro-batches on and off on prefill-heavy
# work (random 1024 in / 32 out); a profiler trace of PP=2 prefill steps with the time both GPUs are busy at once.
# Writes JSONs under $OUT (few: $OUT returns a limited number of files); key lines to stdout.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
E="--enforce-eager --max-model-len 2048"
L=/tmp/c3; mkdir -p $L
run() { local name=$1; shift; timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|prefill of|per device|Error" "$L/$name.log" | tail -4; }
for cfg in "tp1:--tensor-parallel-size 1" "tp2:--tensor-parallel-size 2" "pp2:--pipeline-parallel-size 2"; do
  n=${cfg%%:*}; f=${cfg#*:}
  run lat_$n 100 python3 scripts/bench_latency.py $M $E $f --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 32 --output-json $OUT/lat_$n.json
done
# Micro-batches on (steps of >= 1024 tokens run as two halves) and off, with every bucket compiled at start-up
# (no --enforce-eager) and buckets up to 4096 tokens to keep that short.
for mb in 1024 0; do
  run pp2_rand_mb$mb 120 python3 scripts/bench_throughput.py $M --max-model-len 2048 --max-num-batched-tokens 4096 --pipeline-parallel-size 2 --pp-microbatch-tokens $mb --dataset random --input-len 1024 --output-len 32 --num-prompts 200 --disable-tqdm --output-json $OUT/pp2_rand_mb$mb.json
done
run pp2_trace 110 python3 scripts/profile_decode.py $M $E --pipeline-parallel-size 2 --max-num-batched-tokens 4096 --phase prefill --batch-size 16 --input-len 1024 --trace-dir /tmp/pptr --output-json $OUT/pp2_trace.json
exit 0
