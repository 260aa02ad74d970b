#!/usr/bin/env bash
# Session 6, last H100 call (after scripts/gpu_setup.sh): the Mosaic prefill kernel storing its rows in token
# order (no row gather after it): compiled tests, the prefill table (share of the matmul rate, kernel alone),
# and the engine against XLA on the SmolLM2 and Llama-3-8B shapes. JSONs to $OUT, logs in $OUT/logs12.tgz.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs12; mkdir -p $L
timeout 130 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py > $L/tests.log 2>&1
echo "== mosaic prefill tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/tests.log | tail -6
timeout 150 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill > $L/bench_prefill.log 2>&1
echo "== bench_kernels prefill rc=$?"; grep -E "^device|^prefill|matmul|ours|triton" $L/bench_prefill.log | cut -c1-400 | head -20
cp /tmp/kernels/results.json $OUT/kernels_prefill.json 2>/dev/null; cp /tmp/kernels/*.png $OUT/ 2>/dev/null
for m in smollm2-135m llama3-8b; do
  timeout 80 python3 scripts/compare_backends.py --model benchmarks/configs/$m.json --load-format dummy --skip-tokenizer-init \
    --dtype bfloat16 --max-model-len 2048 --enforce-eager --num-gpu-blocks-override 4000 \
    --backends pallas_mosaic xla --output-json $OUT/compare_$m.json > $L/compare_$m.log 2>&1
  echo "== compare $m rc=$?"; grep -E "^prompt|Error" $L/compare_$m.log | cut -c1-200 | tail -7
done
tar czf $OUT/logs12.tgz -C /tmp logs12
