#!/usr/bin/env bash
# Session 12, one 2-GPU call (after scripts/gpu_setup.sh): why the engine's TP=2 step enqueues slower than a one-step
# program of bench_multistep.py. The same forward as four programs (the engine's step; a step returning logits; a
# step returning their argmax; a one-iteration loop), batch 1 and 64, at TP=2 (also with XLA's collective kernels asked
# into command buffers, +COLLECTIVES_KERNEL) and TP=1, thunk
# sequences dumped to count command buffers.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64"
M="python3 scripts/bench_multistep.py $E --enforce-eager --batch-sizes 1 64 --loop-steps 1 --step-variants logits tokens --steps 64"
L=/tmp/logs49; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|replayed|loop|logits|tokens|Error|error" "$L/$name.log" | cut -c1-200 | tail -10; }
XLA_FLAGS="--xla_dump_to=/tmp/dumpA --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(packed_fwd|step_|loop).*" \
  run tp2_a 130 $M --tensor-parallel-size 2 --output-json $OUT/tp2_a.json
for f in /tmp/dumpA/*thunk_sequence_after_thunk_passes*; do
  echo "$(basename $f | cut -c1-80): $(grep -c kCommandBuffer $f) command buffers, $(grep -c -E 'kAllReduce|kCollectiveKernel|kAllGather' $f) collective thunks, $(grep -c -E '^[0-9]+: ' $f) top-level thunks"; done
# XLA's collective kernels inside command buffers (a command type of newer XLAs; an unknown name fails at start-up)
XLA_FLAGS="--xla_gpu_enable_command_buffer=+COLLECTIVES,+COLLECTIVES_KERNEL --xla_dump_to=/tmp/dumpC --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(packed_fwd|step_).*" \
  run tp2_ck 130 $M --tensor-parallel-size 2 --output-json $OUT/tp2_ck.json
for f in /tmp/dumpC/*thunk_sequence_after_thunk_passes*; do
  echo "$(basename $f | cut -c1-80): $(grep -c kCommandBuffer $f) command buffers, $(grep -c -E '^[0-9]+: ' $f) top-level thunks"; done
run tp1 100 $M --output-json $OUT/tp1.json
run tp2_b 110 $M --tensor-parallel-size 2 --output-json $OUT/tp2_b.json
(cd /tmp && tar czf $OUT/dump49.tgz $(ls -d dumpA/*thunk_sequence_after* dumpC/*thunk_sequence_after* 2>/dev/null | head -16))
tar czf $OUT/logs49.tgz -C /tmp logs49
