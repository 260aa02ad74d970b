#!/usr/bin/env bash
# Part 2 needs the tree of commit ce02ea0: the engine read JAXSERVE_L2_PREFETCH only there (taken out after call 70).
# Session 16, one H100 (after scripts/gpu_setup.sh): L2 prefetches of the GEMV weights at batch 1
# (pallas_kernels/l2_prefetch.py). 1. bench_gemv's 32 decode layers (XLA's dots, no attention) without and with
#    six prefetch specs; 2. bench_latency batch 1 / 64 (128 + 128) without them, with the two best specs of part 1,
#    and without them again (the drift), all on one compile cache.
set -u
export PYTHONUNBUFFERED=1
L=/tmp/logs66
nvidia-smi --query-gpu=name --format=csv,noheader
RUN_SHOW="^batch|layers,|Error|error:" RUN_TAIL=12 RUN_CUT=220; source scripts/gpu_run_lib.sh
run gemv 170 python3 scripts/bench_gemv.py --only --output-json $OUT/gemv.json --prefetch \
  qkv=8,o=8,gate_up=8,down=8 qkv=16,o=16,gate_up=16,down=16 qkv=8x4,o=8x4,gate_up=8,down=8x4 \
  qkv=16x4,o=16x4,gate_up=16,down=16x4 qkv=16,o=16 gate_up=16,down=16
BEST=$(python3 - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/gemv.json"))["layers"]
pf = sorted((v["ms"], k.split("prefetch ")[1]) for k, v in r.items() if "prefetch" in k)
print(" ".join(s for _, s in pf[:2]) or "qkv=8,o=8,gate_up=8,down=8")
PY
)
echo "engine specs: $BEST"
M="--model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init --dtype bfloat16"
B="python3 scripts/bench_latency.py $M --max-model-len 2048 --compile-cache-dir /tmp/jc --max-num-seqs 64
   --batch-sizes 1 64 --input-len 128 --output-len 128"
run lat_base 140 $B --output-json $OUT/lat_base.json
i=0
for spec in $BEST; do
  i=$((i + 1))
  export JAXSERVE_L2_PREFETCH=$spec; run lat_pf$i 110 $B --output-json $OUT/lat_pf$i.json; unset JAXSERVE_L2_PREFETCH
done
run lat_base2 100 $B --output-json $OUT/lat_base2.json
tar czf $OUT/logs66.tgz -C /tmp logs66
