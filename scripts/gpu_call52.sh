#!/usr/bin/env bash
# Session 13, one H100 (after scripts/gpu_setup.sh): the skinny-matmul kernel (pallas_kernels/gemv.py) against XLA's
# dots: 1) bench_gemv.py (each projection over the kernel's tunings, then 32 layers' matmuls and norms); 2) batch-1
# and batch-64 decode with it (the default) and without it (JAXSERVE_GEMV=0), alternating, on one compile cache.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs52; mkdir -p $L
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 570 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^batch|layers,|XLA|Error|error" "$L/$name.log" | cut -c1-200 | tail -12; }
run gemv 250 python3 scripts/bench_gemv.py --output-json $OUT/gemv.json
E="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 2048"
B="python3 scripts/bench_latency.py $E --max-num-seqs 64 --max-num-batched-tokens 1024 --batch-sizes 1 64 --input-len 128 --output-len 128 --compile-cache-dir /tmp/jc"
run lat_on 120 $B --output-json $OUT/lat_on.json
JAXSERVE_GEMV=0 run lat_off 90 $B --output-json $OUT/lat_off.json
run lat_on2 60 $B --output-json $OUT/lat_on2.json
JAXSERVE_GEMV=0 run lat_off2 60 $B --output-json $OUT/lat_off2.json
tar czf $OUT/logs52.tgz -C /tmp logs52
