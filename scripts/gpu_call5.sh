#!/usr/bin/env bash
# Session 5, one H100 call (after scripts/gpu_setup.sh): the Mosaic kernels' compiled tests after the masked/unmasked
# loop split, the engine end to end with Mosaic decode + two-warpgroup Mosaic prefill vs XLA, the prefill table
# (with the kernel timed apart from its gathers) and tuning sweep, and the optimized HLO of the batch-1 decode step
# (which small fusions run per layer). Writes under $OUT (few files: the device returns ~8).
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs; mkdir -p $L
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_paged_decode_mgpu.py \
  tests/test_kernels_ragged_prefill_mgpu.py > $L/mgpu_tests.log 2>&1
echo "== mosaic kernel tests (incl. two warpgroups) rc=$?"; grep -E "passed|failed|FAILED|Error" $L/mgpu_tests.log | tail -6
timeout 150 python3 scripts/compare_backends.py $M --max-model-len 2048 --enforce-eager --num-gpu-blocks-override 4000 \
  --backends pallas_mosaic xla --mosaic-prefill-warpgroups 2 --output-json $OUT/compare_mosaic2wg_8b.json > $L/compare.log 2>&1
echo "== compare rc=$?"; grep -E "^prompt|identical|Error" $L/compare.log | cut -c1-300 | tail -9
timeout 240 python3 scripts/bench_kernels.py --out /tmp/kernels --repeats 5 --only prefill prefill_sweep --mosaic-2wg \
  > $L/bench_prefill.log 2>&1
echo "== bench_kernels prefill rc=$?"; grep -E "^prefill|sweep" $L/bench_prefill.log | cut -c1-700
cp /tmp/kernels/*.json $OUT/ 2>/dev/null
# Optimized HLO of the batch-1 decode forward: the entry computation's ops of the first layers.
XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*fwd.*" timeout 100 \
  python3 scripts/profile_decode.py $M --enforce-eager --max-model-len 2048 --batch-size 1 --input-len 128 --steps 5 \
  --replay 3 --trace-dir /tmp/t1 > $L/hlo_run.log 2>&1
echo "== hlo dump rc=$?"; ls /tmp/hlo | grep after_optim | head
python3 - <<'PY' > $OUT/hlo_b1_entry.txt
import glob, os, re
files = sorted(glob.glob("/tmp/hlo/*after_optimizations.txt"), key=os.path.getsize, reverse=True)
for f in files[:3]:
    txt = open(f).read()
    print("#####", os.path.basename(f), os.path.getsize(f))
    entry = txt[txt.index("\nENTRY"):]
    ops = [l for l in entry.splitlines() if " parameter(" not in l and "get-tuple-element" not in l]
    print("\n".join(l[:300] for l in ops[:120]))
PY
head -c 300 $OUT/hlo_b1_entry.txt
tar czf $OUT/logs.tgz -C /tmp logs
