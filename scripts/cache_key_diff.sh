#!/usr/bin/env bash
# Why a warm start recompiles (issue 7): compile the same small engine twice in fresh processes and compare
# JAX's persistent-cache keys (the cache files' names), then diff the dumped StableHLO of the first forward
# program that differs. Identical dumps with different keys put the cause outside the computation (flags,
# compile options, accelerator config). Writes ck{1,2}.log under $OUT and prints the findings.
set -u
A="--model benchmarks/configs/smollm2-135m.json --load-format dummy --skip-tokenizer-init --max-model-len 512
   --max-num-seqs 8 --max-num-batched-tokens 16 --batch-sizes 1 --input-len 8 --output-len 4"
for i in 1 2; do
  JAX_DUMP_IR_TO=/tmp/ir$i timeout 150 python3 scripts/bench_latency.py $A \
    --compile-cache-dir /tmp/cc$i > $OUT/ck$i.log 2>&1
  echo "run $i rc=$?"
done
python3 - "$OUT" <<'PY'
import difflib, glob, os, sys
out = sys.argv[1]
keys = [sorted(os.listdir(f"/tmp/cc{i}")) for i in (1, 2)]
print("cache entries:", len(keys[0]), len(keys[1]), "| in both runs:", len(set(keys[0]) & set(keys[1])))
print("only in run 1:", [k[:40] for k in sorted(set(keys[0]) - set(keys[1]))][:8])
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
