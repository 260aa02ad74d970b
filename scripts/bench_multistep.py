"""What several decode steps in one program would buy: per-step time of N greedy decode steps inside one jitted
`lax.fori_loop`, against the engine's one program per step, at the batch sizes given.

A question for the engine's design (docs/PERF.md, session 12), not a serving benchmark: when the host cannot
enqueue a step as fast as the device runs it (TP=2 on one process, small batches), a loop of N steps on the
device pays the host's per-launch costs once per N steps. The loop here feeds each step's argmax back as the
next token and keeps the step's metadata (positions, slots, context lengths) fixed: every iteration rewrites
the same KV slots and reads the same context, so it does the same device work as one engine step.

  python scripts/bench_multistep.py --model benchmarks/configs/llama3-8b.json --load-format dummy \
      --skip-tokenizer-init --dtype bfloat16 --enforce-eager --batch-sizes 1 64 --loop-steps 1 8 16

Rows printed per batch size:
- engine step: the engine's step program replayed back to back (profile_decode.replay_forward's method).
- loop N: the N-step program called back to back; per-step time = wall time / (calls x N), and the host's
  enqueue time per call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _step_fn(runner):
    """forward(params, kv, token_ids, meta, li) -> (logits, kv) of the runner's one-stage step, unjitted."""
    if runner.parallel is None:
        model = runner.model
        return lambda params, kv, tok, meta, li: model.apply({"params": params}, tok, kv, meta, li)
    if runner.parallel.pp != 1:
        raise SystemExit("bench_multistep: pipeline stages are not covered (one stage only)")
    stage = runner.parallel.stage_steps[0]
    return lambda params, kv, tok, meta, li: stage(params[0], kv, tok, meta, li)


def make_loop(runner, n: int):
    import jax
    import jax.numpy as jnp

    from jaxserve.model_runner import _step_inputs, _unpack_fn
    fwd = _step_fn(runner)

    def loop(params, kv, packed, prev, *, T, B, P, S, decode_only):
        tok, meta, li = _step_inputs(_unpack_fn(packed, prev, T=T, B=B, P=P, S=S), decode_only)

        def body(_, carry):
            kv, tok = carry
            logits, kv = fwd(params, kv, tok, meta, li)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            m = min(T, nxt.shape[0])
            return kv, tok.at[:m].set(nxt[:m])
        kv, tok = jax.lax.fori_loop(0, n, body, (kv, tok))
        return tok, kv
    return jax.jit(loop, donate_argnums=(1,), static_argnames=("T", "B", "P", "S", "decode_only"))


def make_step(runner, output: str):
    """One step as its own jitted program, no loop: output "logits" (what the engine's step returns) or "tokens"
    (their argmax, as a step with its sampling inside would return)."""
    import jax
    import jax.numpy as jnp

    from jaxserve.model_runner import _step_inputs, _unpack_fn
    fwd = _step_fn(runner)

    def step_logits(params, kv, packed, prev, *, T, B, P, S, decode_only):
        tok, meta, li = _step_inputs(_unpack_fn(packed, prev, T=T, B=B, P=P, S=S), decode_only)
        return fwd(params, kv, tok, meta, li)

    def step_tokens(params, kv, packed, prev, *, T, B, P, S, decode_only):
        logits, kv = step_logits(params, kv, packed, prev, T=T, B=B, P=P, S=S, decode_only=decode_only)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), kv
    fn = step_logits if output == "logits" else step_tokens
    return jax.jit(fn, donate_argnums=(1,), static_argnames=("T", "B", "P", "S", "decode_only"))


def time_loop(runner, call, n: int, calls: int, variant: str = "loop") -> dict:
    """variant "loop": n steps in one fori_loop; "logits"/"tokens": make_step's one step (n must be 1)."""
    import jax
    fn, (packed, prev, dims, decode_only) = call
    loop = make_loop(runner, n) if variant == "loop" else make_step(runner, variant)
    t0 = time.perf_counter()
    tok, runner.kv_caches = loop(runner.params, runner.kv_caches, packed, prev, **dims, decode_only=decode_only)
    jax.block_until_ready(tok)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        tok, runner.kv_caches = loop(runner.params, runner.kv_caches, packed, prev, **dims, decode_only=decode_only)
    t1 = time.perf_counter()
    jax.block_until_ready((tok, runner.kv_caches))
    t2 = time.perf_counter()
    res = {"variant": variant, "n": n, "calls": calls, "step_ms": (t2 - t0) / (calls * n) * 1e3,
           "enqueue_ms_per_call": (t1 - t0) / calls * 1e3, "compile_s": compile_s}
    print(f"  {variant} {n:3d}: {res['step_ms']:.3f} ms per step, enqueue {res['enqueue_ms_per_call']:.2f} ms per call "
          f"({calls} calls; compiled in {compile_s:.1f} s)", flush=True)
    return res


def main() -> None:
    from jaxserve.config import EngineArgs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--loop-steps", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--step-variants", nargs="*", default=[], choices=["logits", "tokens"],
                   help="also time one step as a program of its own returning its logits, or their argmax")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per row (engine replay and loops)")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args()
    import jax
    import numpy as np

    from jaxserve.engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    from profile_decode import replay_forward
    eng = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    runner = eng.runner
    rng = np.random.default_rng(0)
    devices = [d.device_kind for d in jax.devices()]
    results = {"devices": devices, "tensor_parallel_size": ns.tensor_parallel_size, "rows": []}
    print(f"devices: {devices}", flush=True)
    for b in ns.batch_sizes:
        for i in range(b):
            ids = rng.integers(10, eng.arch.vocab_size - 10, ns.input_len).tolist()
            eng.add_request(f"b{b}-{i}", ids, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64))
        while any(r.is_prefill for r in eng.scheduler.running) or eng.scheduler.num_waiting:
            eng.step()
        last = {}
        orig = runner.run_packed_forward

        def capture(packed, prev, dims, decode_only):
            last["call"] = orig, (packed, prev, dims, decode_only)
            return orig(packed, prev, dims, decode_only)
        runner.run_packed_forward = capture
        for _ in range(3):
            eng.step()
        eng.wait_device()
        del runner.run_packed_forward
        if "call" not in last:
            raise SystemExit("no one-program step was captured (pipeline or multi-host run?)")
        fn, args = last["call"]
        print(f"batch {b} (step shape {args[2]}, decode_only={args[3]}):", flush=True)
        row = {"batch": b, "dims": args[2]}
        row["engine_step"] = replay_forward(eng, (fn, args), ns.steps)
        row["loops"] = [time_loop(runner, last["call"], n, max(2, ns.steps // n)) for n in ns.loop_steps]
        row["steps"] = [time_loop(runner, last["call"], 1, ns.steps, v) for v in ns.step_variants]
        results["rows"].append(row)
        for rid in list(eng.groups):
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()
        eng.wait_device()
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
