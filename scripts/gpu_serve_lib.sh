# Sourced by the GPU serving scripts (gpu_serve4.sh, gpu_serve5.sh, gpu_startup5.sh); needs M (model flags),
# L (log folder) and OUT. serve NAME "ENV=val ..." "server flags": a real server on port 8011 with the compile cache
# SERVE_CACHE (an optional 4th argument adds bench_serving.py flags), the 320-prompt ShareGPT-like burst (bench_serving.py, rate inf) against it, key lines to stdout,
# serving_NAME.json to $OUT (and a PNG to /tmp/serving_NAME.png), the server's /metrics to $L, then the server stopped.
SERVE_CACHE=${SERVE_CACHE:-/root/.cache/jaxserve/bench_startup}
serve() {
  local name=$1 envs=${2:-PYTHONUNBUFFERED=1} flags=${3:-} bench_flags=${4:-}
  local t0=$(date +%s)
  env $envs python3 -m jaxserve.serve $M $flags --max-model-len 2048 --port 8011 --compile-cache-dir $SERVE_CACHE \
    --served-model-name llama3-8b > $L/server_$name.log 2>&1 &
  local sp=$!
  for i in $(seq 1 150); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
  echo "server $name healthy after $(( $(date +%s) - t0 )) s"
  timeout 100 python3 scripts/bench_serving.py --base-url http://localhost:8011 --dataset sharegpt-like --num-prompts 320 \
    --request-rate inf --vocab-size 128256 $bench_flags --result-json $OUT/serving_$name.json --plot /tmp/serving_$name.png \
    > $L/serving_$name.log 2>&1
  echo "== serving $name ($envs $flags; client $bench_flags) rc=$?"
  grep -E "output_throughput|mean_ttft|median_tpot|median_itl|duration_s|failed|client_cpu_busy" $L/serving_$name.log | tr -s ' ' | tr '\n' ' '; echo
  grep -E "KV cache:|GIL switch|uvloop|httptools|attention" $L/server_$name.log | cut -c1-200 | head -3
  curl -s localhost:8011/metrics > $L/metrics_$name.txt  # the engine's own view (TTFT/TPOT histograms, steps)
  kill -TERM $sp; wait $sp
}
