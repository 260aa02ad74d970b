#!/usr/bin/env bash
# Session 8, one 2 x H100 call (after scripts/gpu_setup.sh): why a TP=2 forward updates ~17 command buffers per device
# where TP=1 updates one. The batch-256 decode step at TP=2 with XLA's optimized HLO dumped (jit_step modules only);
# the after-optimizations text shows which instructions sit outside the command-buffer computations.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*jit_step.*"
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs29; mkdir -p $L
timeout 200 python3 scripts/profile_decode.py $M --max-model-len 2048 --enforce-eager --batch-size 256 --input-len 200 \
  --steps 20 --replay 10 --tensor-parallel-size 2 --trace-dir /tmp/p2 --output-json $OUT/prof256_tp2_dump.json \
  > $L/tp2.log 2>&1
echo "== prof256_tp2 rc=$? $SECONDS s"; grep -E "replayed|without the profiler" $L/tp2.log
ls -la /tmp/dump | head -30 > $L/dump_list.txt; ls /tmp/dump | wc -l
cd /tmp/dump && tar czf $OUT/dump29.tgz $(ls | grep -E "after_optimizations.txt$|thunk" | head -40)
tar czf $OUT/logs29.tgz -C /tmp logs29
ls -la $OUT
