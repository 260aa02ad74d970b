#!/usr/bin/env bash
# Session 8, one H100 call (after scripts/gpu_setup.sh): does the FA3-layout prefill (the new default) cost warm-start
# time? Start to first served token on one compile cache: FA3 cold then twice warm; the one-warpgroup prefill
# (--mosaic-prefill-warpgroups 1: its prefill programs compile, then twice warm); FA3 warm once more. Then offline
# throughput on 1000 ShareGPT-like prompts with the defaults, if time is left.
set -u
export PYTHONUNBUFFERED=1
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
L=/tmp/logs26; mkdir -p $L
run() { local name=$1; shift; local t0=$SECONDS
        if [ $((SECONDS + $1)) -gt 575 ]; then echo "== $name skipped"; return; fi
        timeout "$@" > "$L/$name.log" 2>&1; echo "== $name rc=$? $((SECONDS - t0)) s"
        grep -E "^ *[1-3] |warm start|Throughput" "$L/$name.log" | tail -4; }
S="python3 scripts/bench_startup.py --compile-cache-dir /tmp/cc"
run st_fa3 200 $S --runs 3 --log-dir $L/fa3 --output-json $OUT/startup_fa3.json -- $M --max-model-len 2048
run st_wg1 150 $S --runs 3 --keep-cache --log-dir $L/wg1 --output-json $OUT/startup_wg1.json -- $M --max-model-len 2048 \
  --mosaic-prefill-warpgroups 1
run st_fa3b 60 $S --runs 1 --keep-cache --log-dir $L/fa3b --output-json $OUT/startup_fa3b.json -- $M --max-model-len 2048
for d in fa3 wg1 fa3b; do for f in $L/$d/run*.log; do echo "$d $(basename $f): $(grep -E "profile run|ahead of time|engine ready" $f | cut -c12-23,60-125 | tr '\n' '|')"; done; done
run offline 180 python3 scripts/bench_throughput.py $M --max-model-len 2048 --dataset sharegpt-like --num-prompts 1000 \
  --disable-tqdm --compile-cache-dir /tmp/cc --output-json $OUT/offline_fa3.json
tar czf $OUT/logs26.tgz -C /tmp logs26
