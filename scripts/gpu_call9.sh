#!/usr/bin/env bash
# Session 5 on a 4-GPU machine (after scripts/gpu_setup.sh), two calls on the same warm machine:
#   a: issue 6 on GPUs 0 and 1: 8B decode at TP=1 and TP=2, TP=2 also with XLA's command buffers (CUDA graphs)
#      taking the collectives (+COLLECTIVES), the batch-256 step (replayed forward) at TP=1 and TP=2, and dummy
#      Llama-3-70B at TP=2 (needs H200 memory).
#   b: issue 8 on all four GPUs: 8B at TP=4, then offline throughput (1000 ShareGPT-like prompts) for 8B at TP=1, 2
#      and 4, and 200 prompts for 70B at TP=4. COLL=1 adds +COLLECTIVES (if run a found it faster).
# Each run has its own timeout, most important first. JSONs to $OUT (few files come back), logs in $OUT/logs.tgz.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
MODE=${1:-a}
E="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
M8="--model benchmarks/configs/llama3-8b.json"; M70="--model benchmarks/configs/llama3-70b.json"
LAT="--enforce-eager --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 16"
L=/tmp/logs9; mkdir -p $L
COLLF="--xla_gpu_enable_command_buffer=+COLLECTIVES"
run() { local name=$1; shift; timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|replayed|without the profiler|Error" "$L/$name.log" | cut -c1-200 | tail -4; }
if [ "$MODE" = a ]; then
  export CUDA_VISIBLE_DEVICES=0,1
  run lat8b_tp1 70 python3 scripts/bench_latency.py $M8 $E $LAT --output-json $OUT/lat8b_tp1.json
  run lat8b_tp2 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2.json
  XLA_FLAGS=$COLLF run lat8b_tp2_coll 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2_coll.json
  # The better TP=2 variant (batch-1 step) for the batch-256 replay.
  BEST=$(python3 -c "
import json
try:
    a = json.load(open('$OUT/lat8b_tp2.json')); b = json.load(open('$OUT/lat8b_tp2_coll.json'))
    f = lambda d: [r for r in d['results'] if r['batch'] == 1][0]['decode_step_ms']
    print('coll' if f(b) < f(a) else 'default')
except Exception as e:
    print('default')
")
  echo "TP=2 command-buffer variant for the rest: $BEST"
  [ "$BEST" = coll ] && export XLA_FLAGS=$COLLF
  P="python3 scripts/profile_decode.py $M8 $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
  run prof256_tp2 100 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
  run prof256_tp1 100 $P --trace-dir /tmp/p1 --output-json $OUT/prof256_tp1.json
  run lat70b_tp2 170 python3 scripts/bench_latency.py $M70 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat70b_tp2.json
fi
if [ "$MODE" = b ]; then
  [ "${COLL:-0}" = 1 ] && export XLA_FLAGS=$COLLF
  run lat8b_tp4 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 4 --output-json $OUT/lat8b_tp4.json
  T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --disable-tqdm"
  for tp in 4 2 1; do
    run off8b_tp$tp 110 $T $M8 --num-prompts 1000 --tensor-parallel-size $tp --output-json $OUT/off8b_tp$tp.json
  done
  run off70b_tp4 180 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json
fi
tar czf $OUT/logs.tgz -C /tmp logs9
