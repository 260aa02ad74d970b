#!/usr/bin/env bash
# Session 12, one 2-GPU call (after scripts/gpu_setup.sh): the TP=2 step's host enqueue against its collectives.
# The engine's step at batch 1 and 64 (bench_multistep.py's replay and a one-step program), TP=2 with the defaults
# (synchronous all-reduces as XLA's collective kernels) and with NCCL's all-reduce instead
# (--xla_gpu_experimental_use_collective_kernels= , still synchronous), each with its thunk sequence dumped to count
# the command buffers; TP=1 on the same machine; then bench_latency at TP=2 with the better of the two if time is left.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64"
M="python3 scripts/bench_multistep.py $E --enforce-eager --batch-sizes 1 64 --loop-steps 1 --steps 64"
D="--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*packed_fwd.*"
NCCL="--xla_gpu_experimental_use_collective_kernels="
L=/tmp/logs48; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 585 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|replayed|loop|^batch_size|Error|error" "$L/$name.log" | cut -c1-200 | tail -8; }
cmdbufs() { local f; f=$(ls $1/*thunk_sequence_after_thunk_passes* 2>/dev/null | head -1)
            [ -n "$f" ] && echo "$1: $(grep -c kCommandBuffer $f) command buffers, $(grep -c -E 'kAllReduce|kCollectiveKernel' $f) all-reduce thunks ($(basename $f))"; }
XLA_FLAGS="--xla_dump_to=/tmp/dumpA $D" run tp2_default 120 $M --tensor-parallel-size 2 --output-json $OUT/tp2_default.json
XLA_FLAGS="--xla_dump_to=/tmp/dumpB $D $NCCL" run tp2_nccl 120 $M --tensor-parallel-size 2 --output-json $OUT/tp2_nccl.json
for d in /tmp/dumpA /tmp/dumpB; do cmdbufs $d; done
run tp1 90 $M --output-json $OUT/tp1.json
B="python3 scripts/bench_latency.py $E --batch-sizes 1 64 --input-len 128 --output-len 128 --tensor-parallel-size 2 --compile-threads 8"
XLA_FLAGS="$NCCL" run lat_tp2_nccl 150 $B --output-json $OUT/lat_tp2_nccl.json
(cd /tmp && tar czf $OUT/dump48.tgz $(ls -d dumpA/*thunk_sequence* dumpB/*thunk_sequence* 2>/dev/null | head -8))
tar czf $OUT/logs48.tgz -C /tmp logs48
