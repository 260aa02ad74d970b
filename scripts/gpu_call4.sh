#!/usr/bin/env bash
# Issue 4 on one GPU (after scripts/gpu_setup.sh): the kernel tests compiled, the kernel benchmark (Mosaic GPU
# decode column and sweep, jax-triton KV write, tokamax prefill if its wheels are in .whl/tokamax), and the
# engine end to end with the Mosaic decode backend vs XLA. Writes under $OUT.
# tokamax's wheels (not carried by gpu_setup.sh) are fetched on the dev machine with:
#   pip download --no-deps -d .whl/tokamax tokamax einshape jaxtyping qwix typeguard==2.13.3 immutabledict \
#     tensorboardx wadler_lindig
set -u
export PYTHONUNBUFFERED=1
MODE=${1:-all}
if [ "$MODE" = prefill ]; then
# Prefill only: the two-warpgroup kernel's compiled tests, then the prefill table and the Mosaic tuning sweep.
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py -k two_warpgroups \
  > $OUT/mgpu_2wg_tests.log 2>&1
rc2=$?; echo "== two-warpgroup prefill tests rc=$rc2"; tail -2 $OUT/mgpu_2wg_tests.log
F=""; [ $rc2 = 0 ] && F=--mosaic-2wg
timeout 400 python3 scripts/bench_kernels.py --out $OUT/kernels --only prefill prefill_sweep $F > $OUT/bench_prefill.log 2>&1
echo "== bench_kernels prefill rc=$?"; grep -E "^prefill|sweep" $OUT/bench_prefill.log | cut -c1-600
exit 0
fi
if [ "$MODE" != compare ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tk .whl/tokamax/*.whl 2>/dev/null
# The Mosaic kernel first, alone and briefly: a hang or a crash there must not cost the rest of the call.
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_paged_decode_mgpu.py \
  tests/test_kernels_ragged_prefill_mgpu.py -m "not slow" -k "not two_warpgroups" \
  > $OUT/mgpu_tests.log 2>&1
rc=$?; echo "== mosaic kernel tests rc=$rc"; grep -E "passed|failed|FAILED|Error" $OUT/mgpu_tests.log | tail -8
MFLAGS=""; [ $rc = 0 ] || MFLAGS=--no-mosaic
# The two-warpgroup prefill (hangs at times in the CPU interpreter): timed only if its compiled tests pass.
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py -k two_warpgroups \
  > $OUT/mgpu_2wg_tests.log 2>&1
rc2=$?; echo "== two-warpgroup prefill tests rc=$rc2"; tail -3 $OUT/mgpu_2wg_tests.log
[ $rc2 = 0 ] && [ -z "$MFLAGS" ] && MFLAGS=--mosaic-2wg
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_paged_decode.py \
  tests/test_kernels_ragged_prefill.py tests/test_kernels_kv_write.py -m "not slow" > $OUT/kernel_tests.log 2>&1
echo "== kernel tests rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.log | tail -12
PYTHONPATH=/tmp/site:/tmp/tk timeout 280 python3 scripts/bench_kernels.py --out $OUT/kernels --sweep $MFLAGS \
  > $OUT/bench_kernels.log 2>&1
echo "== bench_kernels rc=$?"; grep -vE "^(kv_write|sweep|mosaic sweep)" $OUT/bench_kernels.log | grep -vi warn | tail -50
grep -E "^(kv_write|sweep|mosaic sweep)" $OUT/bench_kernels.log | cut -c1-400
fi
[ "$MODE" = kernels ] && exit 0
for m in ${MODELS:-llama3-8b smollm2-135m}; do
  timeout 120 python3 scripts/compare_backends.py --model benchmarks/configs/$m.json --load-format dummy \
    --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --enforce-eager --num-gpu-blocks-override 4000 \
    --backends pallas_mosaic xla \
    --output-json $OUT/compare_mosaic_$m.json > $OUT/compare_$m.log 2>&1
  echo "== compare $m rc=$?"; grep -E "^prompt|identical\"|Error" $OUT/compare_$m.log | cut -c1-300 | tail -8
done
exit 0
