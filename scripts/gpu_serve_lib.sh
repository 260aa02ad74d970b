# Sourced by the GPU serving scripts (gpu_serve4.sh, gpu_serve5.sh, gpu_startup5.sh); needs M (model flags),
# L (log folder) and OUT. serve NAME "ENV=val ..." "server flags": a real server on port 8011 with the compile cache
# SERVE_CACHE (an optional 4th argument adds bench_serving.py flags), the 320-prompt ShareGPT-like burst (bench_serving.py, rate inf) against it, key lines to stdout,
# serving_NAME.json to $OUT (and a PNG to /tmp/serving_NAME.png), the server's /metrics to $L, then the server stopped.
SERVE_CACHE=${SERVE_CACHE:-/root/.cache/jaxserve/bench_startup}
# proc_cpu PID: "name ticks ..." (user + system, 1/100 s) for the server process (front-end) as a whole, its main
# thread (the event loop), its busiest child (the engine process) and that child's main thread (the engine loop).
proc_cpu() {
  local p=$1 best=0 bp=$1 c t
  for c in $(pgrep -P $p); do t=$(awk '{print $14+$15}' /proc/$c/stat 2>/dev/null || echo 0); [ "$t" -gt "$best" ] && best=$t && bp=$c; done
  echo "frontend $(awk '{print $14+$15}' /proc/$p/stat) frontend_loop $(awk '{print $14+$15}' /proc/$p/task/$p/stat)" \
       "engine $best engine_loop $(awk '{print $14+$15}' /proc/$bp/task/$bp/stat)"
}
serve() {
  local name=$1 envs=${2:-PYTHONUNBUFFERED=1} flags=${3:-} bench_flags=${4:-}
  local t0=$(date +%s)
  env $envs python3 -m jaxserve.serve $M $flags --max-model-len 2048 --port 8011 --compile-cache-dir $SERVE_CACHE \
    --served-model-name llama3-8b > $L/server_$name.log 2>&1 &
  local sp=$!
  for i in $(seq 1 150); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
  echo "server $name healthy after $(( $(date +%s) - t0 )) s"
  local cpu0; cpu0=$(proc_cpu $sp); local w0=$(date +%s.%N)
  timeout 100 python3 scripts/bench_serving.py --base-url http://localhost:8011 --dataset sharegpt-like --num-prompts 320 \
    --request-rate inf --vocab-size 128256 $bench_flags --result-json $OUT/serving_$name.json --plot /tmp/serving_$name.png \
    > $L/serving_$name.log 2>&1
  local rc=$?; local cpu1; cpu1=$(proc_cpu $sp); local w1=$(date +%s.%N)
  echo "== serving $name ($envs $flags; client $bench_flags) rc=$rc"
  python3 -c "import sys; a,b=sys.argv[1].split(),sys.argv[2].split(); w=float(sys.argv[4])-float(sys.argv[3])
print('cpu over the burst (%.1f s wall): ' % w + ', '.join('%s %.1f s' % (k, (int(y)-int(x))/100) for k, x, y in
      zip(a[0::2], a[1::2], b[1::2])))" "$cpu0" "$cpu1" $w0 $w1
  grep -E "busy [0-9.]+ s:" $L/server_$name.log | cut -c1-400 | tail -2
  grep -E "output_throughput|mean_ttft|median_tpot|median_itl|duration_s|failed|client_cpu_busy" $L/serving_$name.log | tr -s ' ' | tr '\n' ' '; echo
  grep -E "KV cache:|GIL switch|uvloop|httptools|attention" $L/server_$name.log | cut -c1-200 | head -3
  curl -s localhost:8011/metrics > $L/metrics_$name.txt  # the engine's own view (TTFT/TPOT histograms, steps)
  kill -TERM $sp; wait $sp
}
