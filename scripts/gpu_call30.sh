#!/usr/bin/env bash
# Session 8, one 2 x H100 call (after scripts/gpu_setup.sh). Call 29's dump: at TP=2 each all-reduce is XLA's
# collective kernel, run async on its own stream, outside the command buffers, so a decode step is 65 command
# buffers per device. A/B of the batch-256 TP=2 step: default; NCCL all-reduces (collective kernels off), which XLA
# puts inside the command buffers; the collective kernels made synchronous. Then offline TP=2 with the best, TP=1.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
L=/tmp/logs30; mkdir -p $L
P="python3 scripts/profile_decode.py $M --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
prof() { local name=$1 flags=$2; local t0=$SECONDS
  XLA_FLAGS="$flags" timeout 80 $P --tensor-parallel-size ${3:-2} --trace-dir /tmp/tr_$name --output-json $OUT/prof_$name.json > $L/prof_$name.log 2>&1
  echo "== prof $name ($flags) rc=$? $((SECONDS - t0)) s"; grep -E "replayed|without the profiler" $L/prof_$name.log; }
prof default ""
prof nccl "--xla_gpu_experimental_use_collective_kernels="
prof sync "--xla_gpu_disable_async_collectives=ALLREDUCE"
prof tp1 "" 1
best=$(python3 -c "
import json, os
r = {}
for n, f in [('default', ''), ('nccl', '--xla_gpu_experimental_use_collective_kernels='),
             ('sync', '--xla_gpu_disable_async_collectives=ALLREDUCE')]:
    try:
        r[f] = json.load(open(os.environ['OUT'] + '/prof_' + n + '.json'))['step_ms_unprofiled']
    except Exception:
        pass
print(min(r, key=r.get) if r else '')
")
echo "best flags: '$best'"
T="python3 scripts/bench_throughput.py $M --dataset sharegpt-like --num-prompts 1000 --disable-tqdm"
if [ $SECONDS -lt 200 ]; then XLA_FLAGS="$best" timeout 100 $T --tensor-parallel-size 2 --output-json $OUT/off_tp2.json > $L/off_tp2.log 2>&1
  echo "== off_tp2 rc=$?"; grep Throughput $L/off_tp2.log | cut -c1-120; fi
if [ $SECONDS -lt 260 ]; then timeout 90 $T --output-json $OUT/off_tp1.json > $L/off_tp1.log 2>&1
  echo "== off_tp1 rc=$?"; grep Throughput $L/off_tp1.log | cut -c1-120; fi
tar czf $OUT/logs30.tgz -C /tmp logs30
