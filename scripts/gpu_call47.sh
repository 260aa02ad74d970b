#!/usr/bin/env bash
# Session 12, one 2-GPU call (after scripts/gpu_setup.sh): what N decode steps in one program buy
# (scripts/bench_multistep.py) at TP=1 and TP=2, batch 1 and 64, with XLA's default command buffers and with
# while loops captured in them too (+WHILE,+CONDITIONAL). The two TP=1 processes run at once, one per GPU.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 --enforce-eager"
M="python3 scripts/bench_multistep.py $E --batch-sizes 1 64 --loop-steps 1 8 --steps 64"
W="--xla_gpu_enable_command_buffer=+COLLECTIVES,+WHILE,+CONDITIONAL"
L=/tmp/logs47; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
show() { grep -E "^devices|^batch|replayed|loop|Error|error" "$L/$1.log" | cut -c1-200 | tail -12; }
t0=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 200 $M --output-json $OUT/tp1.json > $L/tp1.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=$W timeout 200 $M --output-json $OUT/tp1_while.json > $L/tp1_while.log 2>&1 &
wait; echo "== tp1 pair $((SECONDS - t0)) s"; show tp1; echo "-- while:"; show tp1_while
t0=$SECONDS
timeout 180 $M --tensor-parallel-size 2 --output-json $OUT/tp2.json > $L/tp2.log 2>&1
echo "== tp2 rc=$? $((SECONDS - t0)) s"; show tp2
if [ $SECONDS -lt 400 ]; then
  t0=$SECONDS
  XLA_FLAGS=$W timeout $((580 - SECONDS)) $M --tensor-parallel-size 2 --output-json $OUT/tp2_while.json > $L/tp2_while.log 2>&1
  echo "== tp2_while rc=$? $((SECONDS - t0)) s"; show tp2_while
fi
tar czf $OUT/logs47.tgz -C /tmp logs47
