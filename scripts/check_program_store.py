"""Check the program store (jaxserve/program_store.py) on this machine's accelerator: three starts in fresh
processes on one compilation cache folder, each printing its greedy tokens and what the store did.

  1. a cold start: every step program compiled here, and stored;
  2. the store emptied, jax's cache kept: the programs come from jax's cache; with --store-cache-hits they are
     serialized again into the store (model_runner.STORE_CACHE_HITS; off on CPU, where such a program fails when
     run);
  3. a start that loads what the store holds, with nothing traced.

Every start must give the same tokens. Usage:
  python scripts/check_program_store.py [--model PATH] [--load-format dummy] [--store-cache-hits] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from jaxserve import model_runner
if {store_hits}:
    import jax
    model_runner.STORE_CACHE_HITS[jax.devices()[0].platform] = True
from jaxserve import LLM, SamplingParams
traced = []
real = model_runner.ModelRunner._warm_call
model_runner.ModelRunner._warm_call = lambda self, *a: traced.append(a[:2]) or real(self, *a)
llm = LLM({model!r}, compile_cache_dir={cache!r}, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
          **{flags!r})
ready = time.perf_counter() - t0
sp = SamplingParams(temperature=0.0, max_tokens=24)
if {dummy}:  # no tokenizer: token ids
    outs = llm.generate([{{"prompt_token_ids": list(range(3, 3 + n))}} for n in (5, 40, 300)], sp, use_tqdm=False)
else:
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 10."]
    outs = llm.chat([[{{"role": "user", "content": q}}] for q in questions], sp, use_tqdm=False)
r = llm.llm_engine.runner
st = r._store
print("RESULT", json.dumps(dict(ready_s=round(ready, 2), traced=len(traced), shapes=len(r._warm_shapes()),
                                loaded=st.hits if st else None, stored=st.saved if st else None,
                                jit_steps=r._packed_forward._cache_size(),
                                tokens=[o.outputs[0].token_ids for o in outs], text=outs[0].outputs[0].text)))
"""


def start(model, cache: Path, store_hits: bool, dummy: bool) -> dict:
    flags = dict(load_format="dummy", skip_tokenizer_init=True) if dummy else {}
    code = CHILD.format(model=model, cache=str(cache), store_hits=store_hits, dummy=dummy, flags=flags)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        print(out.stdout[-3000:], out.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"start failed: rc {out.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or config (default: the embedded SmolLM2)")
    ap.add_argument("--store-cache-hits", action="store_true")
    ap.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                    help="dummy: random weights, token-id prompts (a model config alone, no download)")
    ap.add_argument("--cache-dir", default=None, help="compilation cache folder (default: a fresh temporary one)")
    args = ap.parse_args()
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="jaxserve-store-"))
    go = lambda: start(args.model, cache, args.store_cache_hits, args.load_format == "dummy")  # noqa: E731
    runs = {"cold": go()}
    shutil.rmtree(cache / "jaxserve_programs", ignore_errors=True)
    runs["from jax's cache"] = go()
    runs["from the store"] = go()
    for name, r in runs.items():
        print(f"{name:>17}: ready {r['ready_s']:6.2f} s, traced {r['traced']:2d} of {r['shapes']} shapes, "
              f"loaded {r['loaded']}, stored {r['stored']}, jit steps {r['jit_steps']}, text {r['text']!r}")
    same = all(r["tokens"] == runs["cold"]["tokens"] for r in runs.values())
    print("same tokens in every start:", same)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
