#!/usr/bin/env bash
# Issue 7's measurements in one run on the GPU machine (after scripts/gpu_setup.sh). Writes under $OUT.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
E="--enforce-eager --max-model-len 2048"
run() { local name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|idle share|ms/step|first token|Error" "$OUT/$name.log" | tail -4; }
MODE=${1:-all}
DT=${DT:-true}
if [ "$MODE" = all ] || [ "$MODE" = engine ]; then
# Engine defaults (dispatch thread on for GPUs, the device's fastest attention backend).
run prof 150 python3 scripts/profile_decode.py $M $E --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/tr --output-json $OUT/prof.json
DT=true
run lat 150 python3 scripts/bench_latency.py $M $E --dispatch-thread $DT --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 --output-json $OUT/lat.json
run tp_share 280 python3 scripts/bench_throughput.py $M --dispatch-thread $DT --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --output-json $OUT/tp_sharegpt.json
fi
if [ "$MODE" = all ] || [ "$MODE" = random ]; then
run tp_rand 260 python3 scripts/bench_throughput.py $M --max-model-len 2048 --dispatch-thread ${DT:-false} --dataset random --input-len 1024 --output-len 128 --num-prompts 1000 --disable-tqdm --output-json $OUT/tp_random.json
fi
if [ "$MODE" = launch ]; then
# Where the forward's launch time goes (session 3: ~12 ms of host time per batch-256 step): the same profile with
# XLA command buffers (CUDA graphs) widened, off, and with the pure-XLA attention (no Pallas custom calls).
P="python3 scripts/profile_decode.py $M $E --batch-size 256 --input-len 200 --steps 50"
run launch_default 120 $P --trace-dir /tmp/l0 --output-json $OUT/launch_default.json
[ -n "${WITH_CACHE_KEYS:-}" ] && bash scripts/cache_key_diff.sh
XLA_FLAGS="--xla_gpu_enable_command_buffer=" run launch_cmdbuf_off 120 $P --trace-dir /tmp/l2 --output-json $OUT/launch_cmdbuf_off.json
run launch_xla_attn 120 $P --attention-backend xla --trace-dir /tmp/l3 --output-json $OUT/launch_xla_attn.json
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" run launch_cmdbuf_all 120 $P --trace-dir /tmp/l1 --output-json $OUT/launch_cmdbuf_all.json
for f in $OUT/launch_*.log; do echo "== $f"; grep -E "ms/step|idle share|dispatch_forward" $f; sed -n "/host self time: on the launching/,/host self time: all/p" $f | head -16; done
exit 0
fi
if [ "$MODE" = s4 ]; then
# Session 4: the warm start with the KV sizing fix, the idle share without the profiler (replayed forward), batch 1,
# and offline throughput at 256 and 512 running sequences; all after the first on the startup run's warm cache.
C="--compile-cache-dir /root/.cache/jaxserve/bench_startup"
JAX_DEBUG_LOG_MODULES=jax._src.compiler run startup 300 python3 scripts/bench_startup.py --runs 2 --log-dir $OUT/startup_logs --output-json $OUT/startup.json -- $M --max-model-len 2048
grep -E "^ *run|^ *[12] |warm start" $OUT/startup.log | tail -6
run prof 130 python3 scripts/profile_decode.py $M $C --max-model-len 2048 --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/tr --output-json $OUT/prof.json
grep -E "replayed|without the profiler" $OUT/prof.log
run lat 90 python3 scripts/bench_latency.py $M $C --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 128 --output-json $OUT/lat.json
run tp256 120 python3 scripts/bench_throughput.py $M $C --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --output-json $OUT/tp256.json
run tp512 150 python3 scripts/bench_throughput.py $M $C --max-model-len 2048 --max-num-seqs 512 --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --output-json $OUT/tp512.json
exit 0
fi
if [ "$MODE" = ab_decode ]; then
# Triton vs Mosaic decode in the engine, without the profiler (session 3 chose Triton from profiled step times,
# which inflate launches): the batch-256 step and its replayed forward, then batch 1 / 64 decode, per backend.
for be in pallas_triton pallas_mosaic; do
  run prof_$be 130 python3 scripts/profile_decode.py $M $E --attention-backend $be --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/tr_$be --output-json $OUT/prof_$be.json
  grep -E "replayed|without the profiler" $OUT/prof_$be.log
  run lat_$be 100 python3 scripts/bench_latency.py $M $E --attention-backend $be --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 64 --output-json $OUT/lat_$be.json
done
exit 0
fi
if [ "$MODE" = s5 ]; then
# Session 5: Triton vs Mosaic decode in the engine without the profiler, at batch 256 and batch 1 (profile_decode:
# step time, replayed forward, top device ops), then bench_latency batch 1 / 64 per backend; all in one call.
for be in pallas_triton pallas_mosaic; do
  run prof256_$be 120 python3 scripts/profile_decode.py $M $E --attention-backend $be --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/t256_$be --output-json $OUT/prof256_$be.json
  grep -E "replayed|without the profiler" $OUT/prof256_$be.log
done
for be in pallas_triton pallas_mosaic; do
  run prof1_$be 90 python3 scripts/profile_decode.py $M $E --attention-backend $be --batch-size 1 --input-len 128 --steps 50 --trace-dir /tmp/t1_$be --output-json $OUT/prof1_$be.json
  grep -E "replayed|without the profiler" $OUT/prof1_$be.log
done
for be in pallas_triton pallas_mosaic; do
  run lat_$be 80 python3 scripts/bench_latency.py $M $E --attention-backend $be --max-num-seqs 64 --batch-sizes 1 64 --input-len 128 --output-len 64 --output-json $OUT/lat_$be.json
done
exit 0
fi
if [ "$MODE" = all ] || [ "$MODE" = startup ]; then JAX_DEBUG_LOG_MODULES=jax._src.compiler run startup 400 python3 scripts/bench_startup.py --runs 2 --output-json $OUT/startup.json -- $M --max-model-len 2048; fi
# The same with the warm-up shapes compiled from 8 threads (--compile-threads; not yet measured on a GPU).
if [ "$MODE" = startup_threads ]; then run startup_threads 300 python3 scripts/bench_startup.py --runs 2 --output-json $OUT/startup_threads.json -- $M --max-model-len 2048 --compile-threads 8; exit 0; fi
[ "$MODE" = engine ] || [ "$MODE" = random ] || [ "$MODE" = startup ] && exit 0
# Serving: a real server on loopback, 320 ShareGPT-like prompts sent at once; GPU utilization from /metrics.
t0=$(date +%s.%N)
python3 -m jaxserve.serve $M ${SERVE_EXTRA:-} --max-model-len 2048 --port 8011 --dispatch-thread ${DT:-false} --served-model-name llama3-8b > $OUT/server.log 2>&1 &
SP=$!
for i in $(seq 1 200); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
python3 - <<'PY' >> $OUT/server.log 2>&1
import json, time, urllib.request
t0 = time.time()
body = json.dumps({"model": "llama3-8b", "prompt": [1, 2, 3, 4], "max_tokens": 1}).encode()
urllib.request.urlopen(urllib.request.Request("http://localhost:8011/v1/completions", body)).read()
print("first served token after health in", round(time.time() - t0, 3), "s")
PY
python3 -c "import time; print(\"server start to first served token: %.1f s\" % (time.time() - $t0))"
# 4 client processes: one is 65% busy at this burst and adds 2-6 ms to the median TPOT (docs/PERF.md, session 14).
timeout 200 python3 scripts/bench_serving.py --base-url http://localhost:8011 --dataset sharegpt-like --num-prompts 320 --request-rate inf --vocab-size 128256 --client-processes 4 --result-json $OUT/serving.json --plot $OUT/serving.png > $OUT/serving.log 2>&1 &
BP=$!
# NVML's utilization is a sampled figure: read it every 4 s under load, not once.
for i in 1 2 3 4 5 6 7 8; do sleep 4; echo "t=$((i*4))s $(curl -s localhost:8011/metrics | grep -E '^jaxserve:(gpu_utilization|num_requests_running|num_requests_waiting|kv_cache_usage_perc)' | tr '\n' ' ')"; done > $OUT/metrics_under_load.txt
wait $BP; echo "== serving rc=$?"; tail -25 $OUT/serving.log
cat $OUT/metrics_under_load.txt
kill -TERM $SP; wait $SP; echo "server exit $?"
