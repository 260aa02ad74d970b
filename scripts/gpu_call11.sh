#!/usr/bin/env bash
# Session 6, H100 calls (after scripts/gpu_setup.sh), issue 7's batch-1 latency after fusing the small kernels
# (pallas_kernels/rope_kv_write.py, add_rms_norm.py; JAXSERVE_FUSE_SMALL_OPS=0 turns both off):
#   a: the fused kernels' compiled tests; bench_latency batch 1 / 64 (128 in, 128 out) fused vs unfused; the engine
#      with the fused kernels vs XLA (compare_backends, SmolLM2 and Llama-3-8B shapes); the batch-1 op sequence
#      fused; the batch-256 step fused vs unfused (profile_decode, replayed forward).
#   b: start to first served token with the Hopper defaults, cold then warm, warm-up compiled from 8 threads
#      (--compile-threads 8), and a warm start without threads on the same cache; then the 320-prompt serving
#      benchmark on the warm cache with the defaults.
#   c: (after b, same machine) serving unfused vs fused again; batch-1/64 steps of programs autotuned from 8
#      threads vs one by one.
# Writes JSONs to $OUT, logs to $OUT/logs11_$MODE.tgz.
set -u
export PYTHONUNBUFFERED=1
MODE=${1:-a}
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs11; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS; timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s";
        grep -E "^batch|replayed|without the profiler|passed|failed|^prompt|Error" "$L/$name.log" | cut -c1-220 | tail -8; }
if [ "$MODE" = a ]; then
  run tests 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_fused.py tests/test_kernels_kv_write.py
  LAT="--enforce-eager --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
  run lat_fused 90 python3 scripts/bench_latency.py $M $LAT --output-json $OUT/lat_fused.json
  JAXSERVE_FUSE_SMALL_OPS=0 run lat_unfused 90 python3 scripts/bench_latency.py $M $LAT --output-json $OUT/lat_unfused.json
  for m in smollm2-135m llama3-8b; do
    run compare_$m 100 python3 scripts/compare_backends.py --model benchmarks/configs/$m.json --load-format dummy \
      --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048 --enforce-eager --num-gpu-blocks-override 4000 \
      --backends pallas_mosaic xla --output-json $OUT/compare_fused_$m.json
  done
  run prof1_fused 80 python3 scripts/profile_decode.py $M --enforce-eager --max-model-len 2048 --batch-size 1 \
    --input-len 128 --steps 20 --replay 10 --trace-dir /tmp/t1 --output-json /tmp/prof1_fused.json
  sed -n '/op sequence/,+22p' $L/prof1_fused.log
  P="python3 scripts/profile_decode.py $M --enforce-eager --max-model-len 2048 --batch-size 256 --input-len 200 --steps 20 --replay 10"
  run prof256_fused 100 $P --trace-dir /tmp/t256f --output-json $OUT/prof256_fused.json
  JAXSERVE_FUSE_SMALL_OPS=0 run prof256_unfused 100 $P --trace-dir /tmp/t256u --output-json $OUT/prof256_unfused.json
fi
if [ "$MODE" = b ]; then
  run startup_threads 260 python3 scripts/bench_startup.py --runs 2 --log-dir $L/st8 \
    --output-json $OUT/startup_threads.json -- $M --max-model-len 2048 --compile-threads 8
  grep -E "^ *[12] |warm start" $L/startup_threads.log | tail -3
  run startup_warm_nothreads 60 python3 scripts/bench_startup.py --runs 1 --keep-cache --log-dir $L/st1 \
    --output-json $OUT/startup_nothreads.json -- $M --max-model-len 2048
  grep -E "^ *1 |warm start" $L/startup_warm_nothreads.log | tail -2
  grep -hE "compiled [0-9]+ step shapes|engine ready|lowering" $L/st8/*.log $L/st1/*.log 2>/dev/null | cut -c1-200
  source scripts/gpu_serve_lib.sh
  L=$L SERVE_CACHE=/root/.cache/jaxserve/bench_startup
  serve fused ""
fi
if [ "$MODE" = c ]; then  # same machine as b (warm): serving fused vs unfused, and threaded vs one-by-one autotuning
  source scripts/gpu_serve_lib.sh
  L=$L SERVE_CACHE=/root/.cache/jaxserve/bench_startup
  serve unfused "JAXSERVE_FUSE_SMALL_OPS=0" "--compile-threads 8"
  serve fused2 "" "--compile-threads 8"
  # Do programs autotuned 8 at a time run as fast as ones autotuned alone? Batch 1/64 steps, fresh caches.
  LAT="--max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128"
  run lat_threads 120 python3 scripts/bench_latency.py $M $LAT --compile-threads 8 --compile-cache-dir /tmp/cc8 \
    --output-json $OUT/lat_threads.json
  run lat_single 150 python3 scripts/bench_latency.py $M $LAT --compile-cache-dir /tmp/cc1 --output-json $OUT/lat_single.json
fi
tar czf $OUT/logs11_$MODE.tgz -C /tmp logs11
