#!/usr/bin/env bash
# Session 5 on a 4-GPU machine (after scripts/gpu_setup.sh), two calls on the same warm machine:
#   a: issue 6 on GPUs 0 and 1: 8B decode at TP=1 and TP=2, TP=2 also with XLA's one-shot all-reduce kernel
#      (instead of NCCL) and with that plus the collectives inside XLA's command buffers (CUDA graphs); the
#      batch-256 step (replayed forward) at TP=1 and at TP=2 with the best variant; dummy Llama-3-70B at TP=2.
#   c: one call of the most important of a and b (TP=1, TP=2 with and without the one-shot all-reduce, 70B at
#      TP=2, 8B at TP=4, offline 8B at TP=2).
#   b: issue 8 on all four GPUs: 8B at TP=4, then offline throughput (1000 ShareGPT-like prompts) for 8B at TP=1, 2
#      and 4, and 200 prompts for 70B at TP=4. XLA_FLAGS as run a found best (passed in by the caller).
# Each run has its own timeout, most important first. JSONs to $OUT (few files come back), logs in $OUT/logs.tgz.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
MODE=${1:-a}
E="--load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
M8="--model benchmarks/configs/llama3-8b.json"; M70="--model benchmarks/configs/llama3-70b.json"
LAT="--enforce-eager --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 16"
L=/tmp/logs9; mkdir -p $L
COLLF="--xla_gpu_enable_command_buffer=+COLLECTIVES"
ONESHOT="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"  # XLA's single-host one-shot all-reduce kernel
run() { local name=$1; shift; timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|replayed|without the profiler|Error" "$L/$name.log" | cut -c1-200 | tail -4; }
if [ "$MODE" = a ]; then
  export CUDA_VISIBLE_DEVICES=0,1
  run lat8b_tp1 70 python3 scripts/bench_latency.py $M8 $E $LAT --output-json $OUT/lat8b_tp1.json
  run lat8b_tp2 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2.json
  XLA_FLAGS="$ONESHOT" run lat8b_tp2_oneshot 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2_oneshot.json
  XLA_FLAGS="$ONESHOT $COLLF" run lat8b_tp2_oneshot_cb 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2_oneshot_cb.json
  # The best TP=2 variant (batch-1 + batch-64 step) for the rest.
  BEST=$(python3 -c "
import json
best, flags = None, {'': '', 'oneshot': '$ONESHOT', 'oneshot_cb': '$ONESHOT $COLLF'}
for v in flags:
    try:
        d = json.load(open('$OUT/lat8b_tp2' + ('_' + v if v else '') + '.json'))
        t = sum(r['decode_step_ms'] for r in d['results'])
        if best is None or t < best[0]:
            best = (t, v)
    except Exception:
        pass
print(best[1] if best else '')
")
  echo "best TP=2 variant: '${BEST:-default}'"
  case "$BEST" in oneshot) export XLA_FLAGS="$ONESHOT";; oneshot_cb) export XLA_FLAGS="$ONESHOT $COLLF";; esac
  P="python3 scripts/profile_decode.py $M8 $E --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
  run prof256_tp2 100 $P --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2.json
  unset XLA_FLAGS
  run prof256_tp1 100 $P --trace-dir /tmp/p1 --output-json $OUT/prof256_tp1.json
  case "$BEST" in oneshot) export XLA_FLAGS="$ONESHOT";; oneshot_cb) export XLA_FLAGS="$ONESHOT $COLLF";; esac
  run lat70b_tp2 170 python3 scripts/bench_latency.py $M70 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat70b_tp2.json
fi
if [ "$MODE" = c ]; then  # one call of what a short budget allows, most important first
  export CUDA_VISIBLE_DEVICES=0,1
  run lat8b_tp1 65 python3 scripts/bench_latency.py $M8 $E $LAT --output-json $OUT/lat8b_tp1.json
  run lat8b_tp2 65 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2.json
  XLA_FLAGS="$ONESHOT" run lat8b_tp2_oneshot 65 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat8b_tp2_oneshot.json
  BEST=$(python3 -c "
import json
t = {}
for v in ('', '_oneshot'):
    try:
        t[v] = sum(r['decode_step_ms'] for r in json.load(open('$OUT/lat8b_tp2' + v + '.json'))['results'])
    except Exception:
        pass
print('oneshot' if t.get('_oneshot', 1e9) < t.get('', 1e9) else '')
")
  echo "best TP=2 variant: '${BEST:-default}'"
  [ "$BEST" = oneshot ] && export XLA_FLAGS="$ONESHOT"
  run lat70b_tp2 160 python3 scripts/bench_latency.py $M70 $E $LAT --tensor-parallel-size 2 --output-json $OUT/lat70b_tp2.json
  unset CUDA_VISIBLE_DEVICES
  run lat8b_tp4 65 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 4 --output-json $OUT/lat8b_tp4.json
  export CUDA_VISIBLE_DEVICES=0,1
  run off8b_tp2 130 python3 scripts/bench_throughput.py $E $M8 --dataset sharegpt-like --disable-tqdm --num-prompts 1000 \
    --tensor-parallel-size 2 --output-json $OUT/off8b_tp2.json
fi
if [ "$MODE" = b ]; then
  run lat8b_tp4 70 python3 scripts/bench_latency.py $M8 $E $LAT --tensor-parallel-size 4 --output-json $OUT/lat8b_tp4.json
  T="python3 scripts/bench_throughput.py $E --dataset sharegpt-like --disable-tqdm"
  for tp in 4 2 1; do
    run off8b_tp$tp 110 $T $M8 --num-prompts 1000 --tensor-parallel-size $tp --output-json $OUT/off8b_tp$tp.json
  done
  run off70b_tp4 180 $T $M70 --num-prompts 200 --tensor-parallel-size 4 --output-json $OUT/off70b_tp4.json
fi
tar czf $OUT/logs.tgz -C /tmp logs9
