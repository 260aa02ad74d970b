"""Host cost of launching one jitted step against how many buffers it takes: a toy program over N argument
arrays (like the engine's per-layer weights), D of them donated and returned updated (like the per-layer KV pages),
sharded over a mesh of 1, 2, ... devices. The device work is trivial, so the time per call is the host's dispatch.

Question it answers (issue 6): would stacking the per-layer weights and KV pages into a few arrays cut the
TP=2 step's host enqueue (3.8-4.4 ms, docs/PERF.md)? Our Llama-3-8B step takes ~300 arrays.

    python scripts/bench_dispatch.py --buffers 16 64 300 --donated 0 64 --devices 1 2
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def time_dispatch(n_devices: int, n_buffers: int, n_donated: int, calls: int) -> float:
    """Seconds of host time per call (mean over `calls` calls, after warm-up), the outputs fed back in."""
    mesh = Mesh(np.array(jax.devices()[:n_devices]), ("tp",))
    shard = NamedSharding(mesh, P("tp"))
    ws = [jax.device_put(jnp.ones((n_devices * 256,), jnp.float32), shard) for _ in range(n_buffers)]
    kv = [jax.device_put(jnp.zeros((n_devices * 256,), jnp.float32), shard) for _ in range(n_donated)]

    def step(ws, kv, x):
        acc = x
        for w in ws:  # every weight read once, elementwise: no collective, so only the launch is timed
            acc = acc + w
        return [k + acc for k in kv], acc

    f = jax.jit(step, donate_argnums=(1,))
    x = jax.device_put(jnp.zeros((n_devices * 256,), jnp.float32), shard)
    for _ in range(3):
        kv, x = f(ws, kv, x)
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        kv, x = f(ws, kv, x)
    host = (time.perf_counter() - t0) / calls
    jax.block_until_ready((kv, x))
    return host


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buffers", type=int, nargs="+", default=[16, 64, 300])
    p.add_argument("--donated", type=int, nargs="+", default=[0, 64])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    rows = []
    for d in args.devices:
        if d > jax.device_count():
            print(f"devices={d}: only {jax.device_count()} here, skipped")
            continue
        for n in args.buffers:
            for k in args.donated:
                us = time_dispatch(d, n, k, args.calls) * 1e6
                rows.append(dict(devices=d, buffers=n, donated=k, host_us_per_call=us))
                print(f"devices {d}  buffers {n:4d}  donated {k:3d}: {us:8.1f} us per call "
                      f"({us / (n + k + 1):.2f} us per argument)", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
