#!/usr/bin/env bash
# Why a warm start recompiles (issue 7): compile the same small engine twice in fresh processes and compare
# JAX's persistent-cache key component by component (jax._src.cache_key's debug log), then diff the dumped
# StableHLO of the first program whose computation hash differs. Writes ck{1,2}.log and the diff under $OUT.
set -u
A="--model benchmarks/configs/smollm2-135m.json --load-format dummy --skip-tokenizer-init --max-model-len 512
   --max-num-seqs 8 --max-num-batched-tokens 16 --batch-sizes 1 --input-len 8 --output-len 4"
for i in 1 2; do
  JAX_DEBUG_LOG_MODULES=jax._src.cache_key JAX_DUMP_IR_TO=/tmp/ir$i timeout 150 python3 scripts/bench_latency.py $A \
    --compile-cache-dir /tmp/cc$i > $OUT/ck$i.log 2>&1
  echo "run $i rc=$?"
done
python3 - "$OUT" <<'PY'
import difflib, glob, os, re, sys
out = sys.argv[1]
pat = re.compile(r"hash of serialized (.+?): ([0-9a-f]+)")
runs = [[m.groups() for m in map(pat.search, open(f"{out}/ck{i}.log")) if m] for i in (1, 2)]
print("key components logged:", len(runs[0]), len(runs[1]))
bad = [(k, a[0]) for k, (a, b) in enumerate(zip(*runs)) if a != b]
print("differing components:", len(bad), sorted({name for _, name in bad}))
files = [sorted(glob.glob(f"/tmp/ir{i}/*jit_fwd*")) for i in (1, 2)]
print("dumped jit_fwd files:", len(files[0]), len(files[1]))
for f1, f2 in zip(*files):
    a, b = open(f1).read().splitlines(), open(f2).read().splitlines()
    if a != b:
        d = list(difflib.unified_diff(a, b, lineterm="", n=0))
        print(f"DIFF {os.path.basename(f1)} vs {os.path.basename(f2)}: {len(d)} lines")
        for line in d[:12]:
            print(line[:400])
        break
else:
    print("jit_fwd dumps identical")
PY
