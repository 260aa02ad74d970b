#!/usr/bin/env bash
# Session 6 on a 4-GPU machine (after scripts/gpu_setup.sh): the offline runs issue 8 still lacks, and the
# large-batch throughput ratio issue 6 asks for, all on one machine so every ratio has its TP=1 baseline there.
#   a: offline throughput, 1000 ShareGPT-like prompts of dummy Llama-3-8B at TP=4, 2 and 1, then 200 prompts of
#      dummy Llama-3-70B at TP=4. Warm-up compiles from $CT threads (--compile-threads; session 5's TP=2 offline
#      run timed out compiling its 18 shapes one by one).
#   b: the batch-256 decode step (profile_decode.py, replayed forward, no profiler) at TP=1, 2 and 4.
#   c: the TP=1 offline baseline, the TP=2/4 step with the all-reduces inside XLA's command buffers, 70B at TP=4
#      offline, and TP=2 offline with command-buffer collectives.
#   d: (session 7) 70B at TP=4 offline, compiled one shape at a time (the default on several devices now).
# Each run has its own timeout, most important first. JSONs to $OUT (few files come back), logs in $OUT/logs10.tgz.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
MODE=${1:-a}; CT=${CT:-8}
E="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
M8="--model benchmarks/configs/llama3-8b.json"; M70="--model benchmarks/configs/llama3-70b.json"
L=/tmp/logs10; mkdir -p $L
# run NAME TIMEOUT CMD...: skipped when less than TIMEOUT seconds are left of the call's 560; logs tarred after each.
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 560 ]; then echo "== $name skipped: $1 s would pass the call's limit"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|replayed|without the profiler|compiled .* shapes|Error" "$L/$name.log" | cut -c1-220 | tail -5
        tar czf $OUT/logs10_$MODE.tgz -C /tmp logs10; }
if [ "$MODE" = a ]; then
  T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --disable-tqdm --compile-threads $CT"
  for tp in 4 2 1; do
    run off8b_tp$tp 150 $T $M8 --num-prompts 1000 --tensor-parallel-size $tp --output-json $OUT/off8b_tp$tp.json
  done
  run off70b_tp4 170 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json
fi
if [ "$MODE" = b ]; then
  P="python3 scripts/profile_decode.py $M8 $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
  for tp in 1 2 4; do
    run prof256_tp$tp 100 $P --tensor-parallel-size $tp --trace-dir /tmp/p$tp --output-json $OUT/prof256_tp$tp.json
  done
fi
if [ "$MODE" = c ]; then  # session 6, second 4-GPU call: what a and b left
  T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --disable-tqdm --compile-threads $CT"
  # the TP=1 baseline (a's ran out of memory compiling from threads with the KV cache allocated: fixed, fc63a8b)
  run off8b_tp1 120 $T $M8 --num-prompts 1000 --output-json $OUT/off8b_tp1.json
  # b's TP=2/4 steps were launch-bound (6.3 ms to enqueue): each device's 64 all-reduces are launched one by one
  # outside XLA's command buffers (CUDA graphs). The same step with collectives inside them, and without.
  CB="--xla_gpu_enable_command_buffer=+COLLECTIVES"
  P="python3 scripts/profile_decode.py $M8 $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
  XLA_FLAGS="$CB" run prof256_tp2_cb 70 $P --tensor-parallel-size 2 --trace-dir /tmp/p2c --output-json $OUT/prof256_tp2_cb.json
  run prof256_tp2 70 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
  XLA_FLAGS="$CB" run prof256_tp4_cb 80 $P --tensor-parallel-size 4 --trace-dir /tmp/p4c --output-json $OUT/prof256_tp4_cb.json
  run off70b_tp4 170 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json
  if [ ! -s $OUT/off70b_tp4.json ]; then  # a's failure: no device memory left for the all-reduce scratch
    run off70b_tp4_mem085 170 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --gpu-memory-utilization 0.85 \
      --output-json $OUT/off70b_tp4.json
  fi
  XLA_FLAGS="$CB" run off8b_tp2_cb 110 $T $M8 --num-prompts 1000 --tensor-parallel-size 2 --output-json $OUT/off8b_tp2_cb.json
fi
if [ "$MODE" = d ]; then  # session 7: 70B at TP=4 offline with the compile threads now defaulting to 1 on several
  # devices (c's two failures compiled from 8 threads: "Failed to allocate collective memory ... OUT_OF_MEMORY");
  # if it fails again, with a smaller step budget (smaller activations, less taken before the all-reduce scratch).
  T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --disable-tqdm"
  run off70b_tp4 300 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json
  if [ ! -s $OUT/off70b_tp4.json ]; then
    run off70b_tp4_b2048 230 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --max-num-batched-tokens 2048 \
      --output-json $OUT/off70b_tp4.json
  fi
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
fi
tar czf $OUT/logs10_$MODE.tgz -C /tmp logs10
