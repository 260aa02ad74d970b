#!/usr/bin/env bash
# Session 9, H100 (after scripts/gpu_setup.sh): the persistent Mosaic decode kernel (paged_decode_mgpu, workers=-1).
#   a: compiled decode-kernel tests; the issue-4 decode table, timed back to back and as 16 calls in one program.
#   b: serving-like cells (ctx 256/512) and the persistent tunings there; the engine's batch-256 step with the
#      persistent kernel against the grid kernel; the engine against XLA with the persistent kernel on every step.
set -u
export PYTHONUNBUFFERED=1
part=${1:-a}
L=/tmp/logs32$part; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 580 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"; }
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
if [ "$part" = a ]; then
  run tests 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_paged_decode_mgpu.py -k "not sweep"
  grep -E "passed|failed|FAILED|Error" $L/tests.log | tail -6
  run bench 330 python3 scripts/bench_kernels.py --out /tmp/k32 --repeats 10 --only decode
  grep -E "^device|ours_mosaic|bundled" $L/bench.log | cut -c1-200
  cp /tmp/k32/results.json $OUT/kernels_decode.json 2>/dev/null
else
  run cells 200 python3 scripts/bench_kernels.py --out /tmp/k32c --repeats 10 --only decode sweep --no-xla \
    --batches 64 128 256 --ctxs 256 512 --sweep-cells 256:256 256:512 --sweep-kernels mosaic --sweep-workers -1
  grep -E "^device|ours_mosaic|bundled|sweep" $L/cells.log | cut -c1-300
  cp /tmp/k32c/results.json $OUT/kernels_cells.json 2>/dev/null
  P="python3 scripts/profile_decode.py $M --enforce-eager --batch-size 256 --input-len 200 --steps 20 --replay 10"
  for v in 264 0; do
    JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS=$v run prof_$v 90 $P --trace-dir /tmp/tr$v --output-json $OUT/prof256_min$v.json
    grep -E "replayed|without the profiler|Error" $L/prof_$v.log | cut -c1-200
  done
  C="python3 scripts/compare_backends.py --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
  C="$C --enforce-eager --num-gpu-blocks-override 4000 --backends pallas_mosaic xla"
  for m in smollm2-135m llama3-8b; do
    JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS=1 run compare_$m 80 $C --model benchmarks/configs/$m.json \
      --output-json $OUT/compare_persistent_$m.json
    grep -E "^prompt|Error" $L/compare_$m.log | cut -c1-200 | tail -7
  done
fi
tar czf $OUT/logs32$part.tgz -C /tmp logs32$part
