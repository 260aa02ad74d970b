#!/usr/bin/env bash
# Session 9, one H100 (after scripts/gpu_setup.sh): issue 7's engine figures with the session-9 defaults (persistent
# Mosaic decode from 2048 items, FA3 prefill from 2048 tokens, synchronous all-reduces), all in one warm machine.
#   a: batch-1 / batch-64 decode (128 in + 128 out), the batch-256 step's idle share, offline 1000 ShareGPT-like.
#   b: offline random 1024 in / 128 out, 1000 prompts (vLLM's default random workload; session 3's figure was
#      compile-dominated), then the batch-256 step once more, with the persistent decode and with the grid one.
set -u
export PYTHONUNBUFFERED=1
part=${1:-a}
L=/tmp/logs33$part; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 580 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|Throughput|replayed|without the profiler|HBM|MFU|Error" "$L/$name.log" | cut -c1-220 | tail -${TAILN:-5}; }
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
C="--compile-cache-dir /tmp/jcache"
if [ "$part" = a ]; then
  run lat 160 python3 scripts/bench_latency.py $M $C --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 \
    --output-json $OUT/lat.json
  run prof 110 python3 scripts/profile_decode.py $M --enforce-eager --batch-size 256 --input-len 200 --steps 50 --replay 10 \
    --trace-dir /tmp/tr --output-json $OUT/prof256.json
  run tp_share 220 python3 scripts/bench_throughput.py $M $C --dataset sharegpt-like --num-prompts 1000 --disable-tqdm \
    --output-json $OUT/tp_sharegpt.json
elif [ "$part" = d ]; then
  # Is the slow mode the GIL? The engine thread and its dispatch thread hand the GIL over several times a step, and
  # a thread that wants it back waits up to the switch interval (5 ms) while the other runs Python. Alternate 5 ms
  # (default) and 1 ms, three 50-step rounds per process; then once without the dispatch thread.
  P="python3 scripts/profile_decode.py $M --enforce-eager --batch-size 256 --input-len 200 --steps 50 --replay 10"
  P="$P --plain-rounds 3"
  for i in 1 2 3; do for g in 5 1; do
    [ $SECONDS -gt 250 ] && break 2
    JAXSERVE_GIL_SWITCH_MS=$g run gil${g}_$i 60 $P --trace-dir /tmp/td$g$i --output-json $OUT/prof256_gil${g}_$i.json
  done; done
  [ $SECONDS -lt 250 ] && run nodt 60 $P --dispatch-thread false --trace-dir /tmp/tdn --output-json $OUT/prof256_nodt.json
elif [ "$part" = c ]; then
  # The batch-256 step's wall time came out bimodal (12 or 16-18 ms over the same ~11.3 ms of device work) in
  # calls 32 and 33: alternate the grid and persistent decode kernels, two runs each.
  for i in 1 2; do for v in 0 2048; do
    JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS=$v run prof_${v}_$i 100 python3 scripts/profile_decode.py $M --enforce-eager \
      --batch-size 256 --input-len 200 --steps 50 --replay 10 --trace-dir /tmp/tc$v$i --output-json $OUT/prof256_${v}_$i.json
  done; done
else
  run tp_rand 330 python3 scripts/bench_throughput.py $M $C --dataset random --input-len 1024 --output-len 128 \
    --num-prompts 1000 --disable-tqdm --output-json $OUT/tp_random.json
  run prof 110 python3 scripts/profile_decode.py $M --enforce-eager --batch-size 256 --input-len 200 --steps 50 --replay 10 \
    --trace-dir /tmp/tr2 --output-json $OUT/prof256_b.json
  JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS=0 run prof_grid 100 python3 scripts/profile_decode.py $M --enforce-eager \
    --batch-size 256 --input-len 200 --steps 50 --replay 10 --trace-dir /tmp/tr3 --output-json $OUT/prof256_grid.json
fi
tar czf $OUT/logs33$part.tgz -C /tmp logs33$part
