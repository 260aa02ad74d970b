#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh): XLA options that may change how the batch-1 GEMVs are
# emitted. Session 6 (docs/PERF.md) saw the QKV, o-proj and down matmuls of a batch-1 decode step run as split-K
# Triton GEMVs followed by separate reduction kernels (1.6-2.2 us each), since our Pallas custom calls cannot take
# partial sums. bench_latency batch 1 (128 in, 128 out), ms per token, under:
#   base   XLA_FLAGS unset (platform.py adds --xla_gpu_enable_command_buffer=+COLLECTIVES, as it does for all)
#   notri  --xla_gpu_enable_triton_gemm=false          (cuBLAS for every GEMM)
#   nosk   --xla_gpu_enable_split_k_autotuning=false   (only if this XLA knows the flag: checked first, it aborts
#          on unknown flags) and/or --xla_gpu_experimental_force_split_k=1 (force split-K = 1: no partial sums)
#   at0    --xla_gpu_autotune_level=0                  (no autotuning: default configs)
#   base2  XLA_FLAGS unset again (drift check)
# then profile_decode batch 1 op sequence under the best non-baseline variant, and JAXSERVE_FUSE_SMALL_OPS=0 under
# it if time allows (then the baseline's op sequence, if time still allows). Each variant compiles into a fresh
# cache (/tmp/cc_NAME), so none reuses another's autotuned programs. Keeps under ~540 s of wall time.
# Writes JSONs and logs to $OUT/logs13.tgz.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
LAT="--enforce-eager --max-model-len 2048 --max-num-seqs 64 --batch-sizes 1 --input-len 128 --output-len 128"
PROF="--enforce-eager --max-model-len 2048 --batch-size 1 --input-len 128 --steps 20 --replay 10"
L=/tmp/logs13; mkdir -p $L
BUDGET=${BUDGET:-540}
run() { local name=$1; shift; local t0=$SECONDS; timeout "$@" > "$L/$name.log" 2>&1; local rc=$?
        echo "== $name rc=$rc $((SECONDS - t0)) s (at $SECONDS s)"; echo "$name $rc $((SECONDS - t0))" >> $L/runs.txt
        grep -E "^batch|replayed|without the profiler|^jaxserve:|Error|error:|Unknown flag" "$L/$name.log" | cut -c1-220 | tail -6
        tar czf $OUT/logs13.tgz -C /tmp logs13; }  # after every run: a call cut off at its limit still returns logs
# lat NAME FLAGS [ENV...]: bench_latency batch 1 with XLA_FLAGS=FLAGS (empty: unset) and a fresh compile cache.
lat() { local name=$1 flags=$2; shift 2
        if [ -z "$flags" ]; then set -- env -u XLA_FLAGS "$@"; else set -- env XLA_FLAGS="$flags" "$@"; fi
        echo "$name|$flags|$*" >> $L/variants.txt
        run lat_$name 110 "$@" python3 scripts/bench_latency.py $M $LAT --compile-cache-dir /tmp/cc_$name \
          --output-json $L/lat_$name.json; }
prof() { local name=$1 flags=$2 cache=$3; shift 3
         if [ -z "$flags" ]; then set -- env -u XLA_FLAGS "$@"; else set -- env XLA_FLAGS="$flags" "$@"; fi
         run prof1_$name 110 "$@" python3 scripts/profile_decode.py $M $PROF --compile-cache-dir $cache \
           --trace-dir /tmp/t1_$name --output-json $L/prof1_$name.json
         sed -n '/op sequence/,+40p' $L/prof1_$name.log; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  echo "image XLA_FLAGS=${XLA_FLAGS-<unset>} commit=${COMMIT:-?}"; } | tee $L/env.txt

# Which split-K flags does this XLA know? An unknown XLA_FLAGS entry aborts the process.
flag_ok() { env XLA_FLAGS="$1" timeout 60 python3 -c "
import jax, jax.numpy as jnp
x = jnp.ones((1, 4096), jnp.bfloat16); w = jnp.ones((4096, 6144), jnp.bfloat16)
print(jax.devices()[0].device_kind, float(jax.jit(lambda a, b: a @ b)(x, w)[0, 0]))" > $L/flag_$2.log 2>&1; }
SKA="--xla_gpu_enable_split_k_autotuning=false"; FSK="--xla_gpu_experimental_force_split_k=1"
NOSK=""
if flag_ok "$SKA" ska; then echo "$SKA: accepted"; NOSK="$SKA"; else
  echo "$SKA: rejected ($(grep -o 'Unknown flag[^.]*' $L/flag_ska.log | head -1)); variant skipped"; fi
if flag_ok "$FSK" fsk; then echo "$FSK: accepted"; else echo "$FSK: rejected"; FSK=""; fi
echo "flag checks done at $SECONDS s"

lat base ""
lat notri "--xla_gpu_enable_triton_gemm=false"
[ -n "$NOSK" ] && lat nosk "$NOSK"
[ -n "$FSK" ] && lat fsk1 "$FSK"
lat at0 "--xla_gpu_autotune_level=0"
lat base2 ""

# Best non-baseline variant by decode ms.
ms() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['decode_step_ms'])" "$1" 2>/dev/null; }
BEST=""; BESTMS=""
while IFS='|' read -r name flags _; do
  case $name in base|base2) continue;; esac
  v=$(ms $L/lat_$name.json) || continue; [ -z "$v" ] && continue
  if [ -z "$BEST" ] || python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$v" "$BESTMS"; then
    BEST=$name; BESTMS=$v; BESTFLAGS=$flags; fi
done < $L/variants.txt
echo "best non-baseline variant: ${BEST:-none} ${BESTMS:-} ms (${BESTFLAGS:-})"

if [ -n "$BEST" ]; then
  # Same flags as the bench run, so its own cache is reused (no other variant's programs are in it).
  prof $BEST "$BESTFLAGS" /tmp/cc_$BEST
  if [ $SECONDS -lt $((BUDGET - 130)) ]; then
    lat ${BEST}_unfused "$BESTFLAGS" JAXSERVE_FUSE_SMALL_OPS=0
  else echo "skipped ${BEST}_unfused: $SECONDS s used"; fi
  if [ $SECONDS -lt $((BUDGET - 110)) ]; then
    prof base "" /tmp/cc_base2
  else echo "skipped the baseline profile: $SECONDS s used"; fi
fi

python3 - "$L" <<'EOF' | tee $L/summary.txt
import json, sys
from pathlib import Path
L = Path(sys.argv[1])
print(open(L / "env.txt").read().strip())
print(f"{'variant':<14} {'ms/token':>8} {'p90':>6}  XLA_FLAGS / env")
for line in open(L / "variants.txt"):
    name, flags, cmd = line.rstrip("\n").split("|", 2)
    env = " ".join(w for w in cmd.split() if w.startswith("JAXSERVE_"))
    try:
        r = json.load(open(L / f"lat_{name}.json"))["results"][0]
        print(f"{name:<14} {r['decode_step_ms']:8.3f} {r['p90_step_ms']:6.2f}  {flags or '(unset)'} {env}")
    except Exception as e:
        print(f"{name:<14} {'-':>8} {'-':>6}  {flags or '(unset)'} {env}  (no result: {type(e).__name__})")
for p in sorted(L.glob("prof1_*.json")):
    d = json.load(open(p))
    keys = {k: round(v, 3) for k, v in d.items() if isinstance(v, (int, float))}
    print(p.stem, keys, "replay:", d.get("replay"))
EOF
echo "done at $SECONDS s"
tar czf $OUT/logs13.tgz -C /tmp logs13
