"""Device memory of every step program, by XLA's memory analysis at the engine's real KV cache: is any page array
copied (an output not aliased to its donated input, or a temporary the size of a layer's pages)?

Question it answers (issue 6, docs/PERF.md session 17): a PP=2 engine sized its KV cache to 2.1 GiB of headroom and
then failed its warm-up allocating one more layer's pages (1.89 GiB) inside a stage's step. Starts the engine
without its warm-up (`--enforce-eager`; give `--num-gpu-blocks-override` to skip the profiling too), compiles each
warm-up shape (each pipeline stage's program apart) and prints its temporaries, outputs and aliased bytes.

    python scripts/step_memory.py --model benchmarks/configs/llama3-8b.json --load-format dummy \
        --skip-tokenizer-init --dtype bfloat16 --pipeline-parallel-size 2 --num-gpu-blocks-override 4096 --enforce-eager
"""
from __future__ import annotations

import argparse
import json


def analyse(compiled) -> dict:
    ma = compiled.memory_analysis()
    return dict(temp=int(ma.temp_size_in_bytes), out=int(ma.output_size_in_bytes),
                alias=int(ma.alias_size_in_bytes), args=int(ma.argument_size_in_bytes))


def step_programs(runner, T: int, decode_only: bool) -> list[tuple[str, object]]:
    """[(name, compiled program)] a step of this shape runs: one, or one per pipeline stage."""
    import jax
    par = runner.parallel
    if par is None or par.pp == 1:
        fn, args, kw = runner._warm_call(T, decode_only, runner.kv_caches)
        return [("step", fn.lower(*args, **kw).compile())]
    meta, ids, li = runner._dummy_inputs(T, decode_only)
    out, x = [], ids
    for s, (a, b) in enumerate(par.stages):
        xs, mt, lt = jax.device_put((x, meta, li), par.replicated[s])
        if s > 0:  # later stages take the hidden states [T, D]
            xs = jax.ShapeDtypeStruct((T, runner.arch.hidden_size), runner.kv_dtype, sharding=par.replicated[s])
        out.append((f"stage{s}", par.stage_fns[s].lower(runner.params[s], runner.kv_caches[a:b], xs, mt, lt)
                    .compile()))
    return out


def main(argv=None) -> list[dict]:
    from jaxserve.config import EngineArgs
    from jaxserve.engine import LLMEngine
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    eng = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    runner = eng.runner
    page = runner.kv_caches[0][0]
    page_bytes = page.addressable_data(0).nbytes  # one layer's k (or v) pages on one device
    print(f"one layer's k pages on one device: {page_bytes / 2**20:.1f} MiB", flush=True)
    rows = []
    for T, dec in runner._warm_shapes():
        for name, compiled in step_programs(runner, T, dec):
            m = analyse(compiled)
            unaliased = m["out"] - m["alias"]
            copy = m["temp"] >= page_bytes or unaliased >= page_bytes
            rows.append(dict(T=T, decode_only=dec, program=name, page_bytes=page_bytes, copy_suspected=copy, **m))
            print(f"T={T:5d}{' decode' if dec else '       '} {name}: temp {m['temp'] / 2**20:9.1f} MiB, "
                  f"outputs {m['out'] / 2**20:9.1f} MiB of which aliased {m['alias'] / 2**20:9.1f} MiB"
                  f"{'  <-- a page array copied?' if copy else ''}", flush=True)
    if ns.output_json:
        with open(ns.output_json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
