#!/usr/bin/env bash
# Session 8, one H100 call (after scripts/gpu_setup.sh): the FA3-layout prefill with warpgroup 1 idle (barrier turns
# only) on tiles whose tokens all fall to warpgroup 0 (decode rows of a mixed step): compiled tests, then the prefill
# table (8 x 2048 and the mixed chunked batch with its 64 decode rows).
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs28; mkdir -p $L
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py -k "not sweep" \
  > $L/tests.log 2>&1
echo "== tests rc=$? $SECONDS s"; grep -E "passed|failed|FAILED|Error" $L/tests.log | tail -6
timeout 120 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill --mosaic-fa3 > $L/bench.log 2>&1
echo "== bench rc=$? $SECONDS s"; grep -E "^device|ours_mosaic" $L/bench.log | cut -c1-130
cp /tmp/kernels/results.json $OUT/kernels_prefill.json 2>/dev/null
tar czf $OUT/logs28.tgz -C /tmp logs28
