#!/usr/bin/env bash
# Session 7, one H100 call (after scripts/gpu_setup.sh):
#   1. add_rms_norm with split-K partials, compiled (tests/test_kernels_fused.py -k add_rms);
#   2. bench_splitk.py: 32 batch-1 layers of Llama-3-8B matmuls + fused norms, XLA's split-K vs explicit partials;
#   3. serving with the engine process and 4 client processes at step budgets 4096, 8192 (default), 2048:
#      smaller prefill chunks let running requests decode during a burst's prefill (TPOT), at some TTFT.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs15; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS; timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s";
        grep -E "passed|failed|S_o|Error" "$L/$name.log" | cut -c1-260 | tail -8; }
run tests 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_kernels_fused.py -k add_rms
run splitk 200 python3 scripts/bench_splitk.py --output-json $OUT/splitk.json
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
source scripts/gpu_serve_lib.sh
serve b4096 "" "--max-num-batched-tokens 4096" "--client-processes 4"
serve b8192 "" "" "--client-processes 4"
serve b2048 "" "--max-num-batched-tokens 2048" "--client-processes 4"
tar czf $OUT/logs15.tgz -C /tmp logs15
