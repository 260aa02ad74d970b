#!/usr/bin/env bash
# Session-2 GPU call: serving (dispatch thread on), offline at max-num-seqs 512, the command-buffer probe,
# kernels. Run after scripts/gpu_setup.sh; writes under $OUT.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
E="--enforce-eager --max-model-len 2048"
run() { local name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^batch|Throughput|idle share|ms/step|Error|sweep" "$OUT/$name.log" | tail -6; }
DT=true bash scripts/gpu_perf.sh serve
run tp_share512 200 python3 scripts/bench_throughput.py $M --dispatch-thread true --max-num-seqs 512 --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 --disable-tqdm --output-json $OUT/tp_sharegpt512.json
XLA_FLAGS=--xla_gpu_enable_command_buffer= run prof_nocb 120 python3 scripts/profile_decode.py $M $E --dispatch-thread true --batch-size 256 --input-len 200 --steps 50 --trace-dir /tmp/tr_nocb --output-json $OUT/prof_nocb.json
run kernels 200 python3 scripts/bench_kernels.py --out $OUT/kernels --repeats 10 --sweep
