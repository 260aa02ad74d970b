#!/usr/bin/env bash
# Session 5, one H100 call (after scripts/gpu_setup.sh): the Mosaic prefill kernel with q read in place (compiled
# tests, prefill table with kernel-only rows, tuning sweep), the engine end to end with Mosaic decode + Mosaic
# prefill vs XLA on the SmolLM2 and Llama-3-8B shapes, and the batch-1 decode step's op sequence. Writes to $OUT.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs; mkdir -p $L
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py > $L/mgpu_prefill_tests.log 2>&1
rc=$?; echo "== mosaic prefill tests (incl. two warpgroups) rc=$rc"; grep -E "passed|failed|FAILED|Error" $L/mgpu_prefill_tests.log | tail -6
timeout 220 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill prefill_sweep --mosaic-2wg \
  > $L/bench_prefill.log 2>&1
echo "== bench_kernels prefill rc=$?"; grep -E "^device|^prefill|sweep" $L/bench_prefill.log | cut -c1-700
cp /tmp/kernels/results.json $OUT/kernels_prefill.json 2>/dev/null
for m in smollm2-135m llama3-8b; do
  timeout 120 python3 scripts/compare_backends.py --model benchmarks/configs/$m.json --load-format dummy --skip-tokenizer-init \
    --dtype bfloat16 --max-model-len 2048 --enforce-eager --num-gpu-blocks-override 4000 \
    --backends pallas_mosaic xla --mosaic-prefill-warpgroups 1 --output-json $OUT/compare_mprefill_$m.json > $L/compare_$m.log 2>&1
  echo "== compare $m rc=$?"; grep -E "^prompt|Error" $L/compare_$m.log | cut -c1-200 | tail -7
done
timeout 90 python3 scripts/profile_decode.py --model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init \
  --dtype bfloat16 --enforce-eager --max-model-len 2048 --batch-size 1 --input-len 128 --steps 20 --replay 10 \
  --trace-dir /tmp/t1 --output-json $OUT/prof1_opseq.json > $L/prof1.log 2>&1
echo "== prof1 rc=$?"; grep -E "replayed|without the profiler" $L/prof1.log; sed -n '/op sequence/,+40p' $L/prof1.log
tar czf $OUT/logs.tgz -C /tmp logs
