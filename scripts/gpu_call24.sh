#!/usr/bin/env bash
# Session 8, one H100 call (after scripts/gpu_setup.sh): the Mosaic prefill kernel with a producer warpgroup (FA3's
# layout: two compute warpgroups taking turns on the tensor cores) and zero-fill work items for padding rows (no
# select pass after the kernel). Compiled tests, the prefill table and tuning sweep (share of the matmul rate), and
# the engine against XLA with --mosaic-prefill-warpgroups 3. JSONs to $OUT, logs in $OUT/logs24.tgz.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs24; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 575 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"; }
run tests 170 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_ragged_prefill_mgpu.py \
  tests/test_kernels_paged_decode_mgpu.py
grep -E "passed|failed|FAILED|Error" $L/tests.log | tail -8
run bench 150 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill --mosaic-2wg --mosaic-fa3
grep -E "^device|^prefill|matmul|ours|triton" $L/bench.log | cut -c1-300 | head -24
cp /tmp/kernels/results.json $OUT/kernels_prefill.json 2>/dev/null
C="python3 scripts/compare_backends.py --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
C="$C --enforce-eager --num-gpu-blocks-override 4000 --backends pallas_mosaic xla --mosaic-prefill-warpgroups 3"
for m in smollm2-135m llama3-8b; do
  run compare_$m 80 $C --model benchmarks/configs/$m.json --output-json $OUT/compare_fa3_$m.json
  grep -E "^prompt|Error" $L/compare_$m.log | cut -c1-200 | tail -7
done
run sweep 200 python3 scripts/bench_kernels.py --out /tmp/sweep --repeats 5 --only prefill_sweep --mosaic-2wg --mosaic-fa3
grep -E "sweep|Error" $L/sweep.log | cut -c1-900 | tail -4
cp /tmp/sweep/results.json $OUT/kernels_prefill_sweep.json 2>/dev/null
tar czf $OUT/logs24.tgz -C /tmp logs24
