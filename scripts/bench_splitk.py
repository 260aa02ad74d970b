"""Batch-1 decode layers without attention: do explicit split-K partials beat XLA's split-K GEMV + reduction?

At batch 1 XLA runs the o-projection and the down projection as split-K GEMVs followed by a reduction kernel,
because the fused add + RMSNorm kernel after them (pallas_kernels/add_rms_norm.py) is a custom call that cannot
absorb the reduction. The alternative: ask for the partials ([S, T, D] f32, a batched dot over K chunks) and let
the kernel sum them. This times L layers of Llama-3-8B's matmuls (QKV, o-proj, gate/up, down) and the two fused
norms, in one jitted program, for each (S_o, S_down) pair (0 = XLA's own form), and counts the reduction
fusions in the compiled HLO.

    python scripts/bench_splitk.py                # the H100 run (Llama-3-8B shapes, 32 layers)
    python scripts/bench_splitk.py --smoke        # tiny shapes, interpreted kernel (CPU)
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.add_rms_norm import add_rms_norm


def partials(a, w, s: int):
    """a [T, K] @ w [K, N] as S f32 partial products [S, T, N] over K chunks (0: the plain bf16 dot)."""
    if s == 0:
        return a @ w
    T, K = a.shape
    return jnp.einsum("tsk,skn->stn", a.reshape(T, s, K // s), w.reshape(s, K // s, w.shape[1]),
                      preferred_element_type=jnp.float32)


def make_chain(s_o: int, s_d: int, interpret: bool, eps: float = 1e-5):
    def chain(x, ws):
        pending = jnp.zeros_like(x)
        for wqkv, wo, wgu, wd, n1, n2 in ws:
            x, n = add_rms_norm(x, pending, n1, eps=eps, interpret=interpret)
            a = (n @ wqkv)[:, :x.shape[1]]  # stands in for the attention output
            x, n = add_rms_norm(x, partials(a, wo, s_o), n2, eps=eps, interpret=interpret)
            gu = n @ wgu
            i = wd.shape[0]
            pending = partials(jax.nn.silu(gu[:, :i]) * gu[:, i:], wd, s_d)
        if pending.ndim == 3:
            pending = jnp.sum(pending, 0).astype(x.dtype)
        return x + pending
    return chain


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--qkv", type=int, default=6144)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--splits", default="0:0,4:4,8:8,4:8,8:16",
                   help="comma-separated S_o:S_down pairs; 0 = XLA's own split-K + reduction")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and the Pallas interpreter (CPU)")
    p.add_argument("--output-json", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.layers, a.hidden, a.qkv, a.intermediate, a.iters = 2, 256, 384, 512, 2
    interpret = a.smoke or jax.devices()[0].platform == "cpu"
    bf = jnp.bfloat16
    key = jax.random.PRNGKey(0)
    D, Q, F = a.hidden, a.qkv, a.intermediate

    def rnd(k, shape, scale):
        return (jax.random.normal(k, shape, jnp.float32) * scale).astype(bf)

    ws = []
    for layer in range(a.layers):
        k = jax.random.split(jax.random.fold_in(key, layer), 6)
        ws.append((rnd(k[0], (D, Q), D ** -0.5), rnd(k[1], (D, D), D ** -0.5), rnd(k[2], (D, 2 * F), D ** -0.5),
                   rnd(k[3], (F, D), F ** -0.5), jnp.ones(D, bf), jnp.ones(D, bf)))
    x = rnd(jax.random.PRNGKey(1), (1, D), 1.0)
    rows, ref = [], None
    for pair in a.splits.split(","):
        s_o, s_d = (int(v) for v in pair.split(":"))
        if (s_o and D % s_o) or (s_d and F % s_d):
            continue
        f = jax.jit(make_chain(s_o, s_d, interpret))
        hlo = f.lower(x, ws).compile().as_text()
        kinds = collections.Counter(re.findall(r"kind=(k\w+)", hlo))
        out = f(x, ws).block_until_ready()
        if ref is None:
            ref = np.asarray(out, np.float32)
        err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
        for _ in range(3):
            f(x, ws).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = f(x, ws)
        out.block_until_ready()
        ms = (time.perf_counter() - t0) / a.iters * 1e3
        rows.append(dict(s_o=s_o, s_down=s_d, ms=ms, us_per_layer=ms * 1e3 / a.layers, fusion_kinds=dict(kinds),
                         max_abs_diff_vs_first=err))
        print(f"S_o {s_o:>2}  S_down {s_d:>2}: {ms:7.3f} ms  ({ms * 1e3 / a.layers:6.1f} us/layer)  "
              f"max |diff| {err:.3g}  fusions {dict(kinds)}", flush=True)
    res = dict(device=jax.devices()[0].device_kind, layers=a.layers, rows=rows)
    if a.output_json:
        Path(a.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output_json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
