"""Skinny matmuls of a small decode step: the gemv kernel (pallas_kernels/gemv.py) against XLA's dot.

Two parts, both on Llama-3-8B's projections at T tokens (8: the engine's batch-1 bucket), bf16:
  1. sweep: each projection alone (QKV, o, gate/up, down with SiLU x up read inside) over the kernel's tunings, a
     first grid of (block_n, block_k, splits), then warps and stages for the best few. L calls on distinct
     weight copies (more bytes than the L2 holds) in one jitted program: device time per call, TB/s of weights.
     XLA's row is its dot as the model runs it (for down: the SiLU x up fusion, the dot and its reduction).
  2. layers: 32 decode layers without attention, as models.llama runs them (add_rms_norm kernels, the four
     projections), once with XLA's dots and once with the kernel at the sweep's best tunings (partials into
     add_rms_norm for o and down), in one program: ms per 32 layers, the figure the decode step would see.
  --prefetch: the layers again with L2 prefetches of the weights (pallas_kernels/l2_prefetch.py) issued before
     each GEMV; --check-prefetch: first, whether a prefetched (or TMA-loaded) weight reads from L2 after a gap.
H100 (docs/PERF.md, session 13): the kernel ties XLA per projection at best, and the layers ran 5.16 ms with it
against 5.04 ms with XLA's dots, so the engine does not use it. Session 16: the prefetches made the layers slower
(5.64-5.92 ms against 5.07), so the engine does not issue them either.

    python scripts/bench_gemv.py --output-json gemv.json     # on a GPU
    python scripts/bench_gemv.py --only --check-prefetch --prefetch qkv=8,o=8 qkv=16   # layers and prefetches only
    python scripts/bench_gemv.py --smoke                     # tiny shapes, interpreted (CPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels.add_rms_norm import add_rms_norm
from jaxserve.pallas_kernels.gemv import GemvTuning, gemv
from jaxserve.pallas_kernels.l2_prefetch import l2_prefetch, parse_spec

BF = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Proj:
    name: str
    K: int
    N: int
    partials: bool  # its consumer sums f32 partials (add_rms_norm)
    silu_gate: bool = False


def projections(hidden: int, qkv: int, inter: int) -> list[Proj]:
    return [Proj("qkv", hidden, qkv, False), Proj("o", hidden, hidden, True),
            Proj("gate_up", hidden, 2 * inter, False), Proj("down", inter, hidden, True, True)]


def xla_op(p: Proj):
    if p.silu_gate:
        return lambda x, w: (jax.nn.silu(x[:, 0]) * x[:, 1]) @ w
    return lambda x, w: x @ w


def gemv_op(p: Proj, tune: GemvTuning, interpret: bool):
    return lambda x, w: gemv(x, w, tuning=tune, silu_gate=p.silu_gate, interpret=interpret)


def time_program(f, args, iters: int) -> float:
    """Seconds per run of jitted f (one uncounted run first)."""
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def first_grid(p: Proj, n_sm: int, smoke: bool) -> list[GemvTuning]:
    if smoke:
        return [GemvTuning(block_n=64, block_k=64, splits=4 if p.partials else 1)]
    out = []
    for bn, bk, s in itertools.product((32, 64, 128, 256), (64, 128, 256), (1, 2, 4, 8, 16)):
        t = GemvTuning(block_n=bn, block_k=bk, splits=s)
        programs = p.N // bn * s
        if (s > 1 and not p.partials) or not t.fits(p.K, p.N) or not n_sm // 2 <= programs <= 8 * n_sm:
            continue
        if p.K // s // bk < 2:  # a loop of one step cannot pipeline
            continue
        out.append(t)
    return out


def sweep(p: Proj, T: int, copies: int, iters: int, interpret: bool, smoke: bool, n_sm: int, log) -> dict:
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((p.K, p.N), np.float32) * p.K ** -0.5, BF) for _ in range(copies)]
    x = jnp.asarray(rng.standard_normal((T, 2, p.K) if p.silu_gate else (T, p.K), np.float32), BF)
    gbytes = p.K * p.N * 2 / 1e9

    def run(op):
        f = jax.jit(lambda x, ws: [op(x, w) for w in ws])
        us = time_program(f, (x, ws), iters) / copies * 1e6
        return us, f(x, ws)[0]

    xla_us, ref = run(xla_op(p))
    ref = np.asarray(ref, np.float32)
    log(f"{p.name:8s} K={p.K} N={p.N}: XLA {xla_us:7.2f} us ({gbytes / xla_us * 1e3:.2f} TB/s)")
    rows = []

    def try_(t):
        try:
            us, out = run(gemv_op(p, t, interpret))
        except Exception as e:  # a tuning Triton cannot compile (shared memory, registers): skip it
            log(f"  {t}: failed: {str(e).splitlines()[0][:160]}")
            return
        out = np.asarray(out, np.float32)
        err = float(np.max(np.abs((out.sum(0) if out.ndim == 3 else out) - ref)))
        rows.append(dict(tuning=dataclasses.asdict(t), us=us, tbps=gbytes / us * 1e3, max_abs_diff=err))
        log(f"  bn {t.block_n:3d} bk {t.block_k:3d} S {t.splits:2d} w {t.num_warps} st {t.num_stages}: "
            f"{us:7.2f} us ({gbytes / us * 1e3:.2f} TB/s, {xla_us / us:.2f}x XLA)  |diff| {err:.3g}")

    for t in first_grid(p, n_sm, smoke):
        try_(t)
    if not smoke and rows:
        best = sorted(rows, key=lambda r: r["us"])[:2]
        for r, (w, st) in itertools.product(best, [(4, 2), (4, 4), (4, 5), (8, 3), (8, 4), (2, 3)]):
            t = dataclasses.replace(GemvTuning(**r["tuning"]), num_warps=w, num_stages=st)
            try_(t)
    rows.sort(key=lambda r: r["us"])
    return dict(proj=dataclasses.asdict(p), xla_us=xla_us, xla_tbps=gbytes / xla_us * 1e3, rows=rows,
                best=rows[0] if rows else None)


def layer_chain(ps: list[Proj], tunes: dict, interpret: bool, eps: float = 1e-5, prefetch: str = ""):
    """32 decode layers' matmuls and norms as models.llama runs them; tunes[name] = GemvTuning or None (XLA).
    prefetch: a prefetch spec (l2_prefetch.parse_spec); each weight's L2 prefetch is issued right after the kernel
    before the GEMV's input (its norm, or the GEMV before it)."""
    qkv, o, gu, down = ps
    specs = {n: (b, k) for n, b, k in parse_spec(prefetch)}

    def mm(p, x, w):
        t = tunes.get(p.name)
        return xla_op(p)(x, w) if t is None else gemv_op(p, t, interpret)(x, w)

    def pf(name, w, after):
        if name not in specs:
            return after
        return l2_prefetch(w, after, nbytes=specs[name][0], bands=specs[name][1], interpret=interpret)

    def chain(x, ws):
        pending = jnp.zeros_like(x)
        for wqkv, wo, wgu, wd, n1, n2 in ws:
            x, n = add_rms_norm(x, pf("qkv", wqkv, pending), n1, eps=eps, interpret=interpret)
            a = pf("o", wo, mm(qkv, n, wqkv))[:, :o.K]  # stands in for the attention output
            x, n = add_rms_norm(x, pf("gate_up", wgu, mm(o, a, wo)), n2, eps=eps, interpret=interpret)
            g = pf("down", wd, mm(gu, n, wgu).reshape(x.shape[0], 2, -1))
            pending = mm(down, g, wd)
        if pending.ndim == 3:
            pending = jnp.sum(pending, 0).astype(x.dtype)
        return x + pending
    return jax.jit(chain)


def _spin(x, *, iters: int, interpret: bool):
    """x, after one GPU thread block has spun through `iters` dependent multiply-adds (an idle gap of a few
    microseconds for the memory system), as a Pallas kernel (Triton lowering)."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        v = jax.lax.fori_loop(0, iters, lambda i, v: v * 1.0000001 + 1e-9, x_ref[...].astype(jnp.float32))
        o_ref[...] = v.astype(o_ref.dtype)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)


def check_prefetch(K: int, N: int, T: int, copies: int, iters: int, spin_iters: int, interpret: bool, log) -> dict:
    """Does the prefetch reach L2? `copies` GEMVs on distinct [K, N] weights, each after an idle gap (_spin),
    with the whole weight prefetched before the gap or not: a weight that fits L2 (an o projection is 32 MiB of
    the H100's 50 MB) should then read from L2. Also the gap alone, so the GEMV's own time can be told apart."""
    keys = jax.random.split(jax.random.key(2), copies)
    ws = [jax.random.normal(k, (K, N), jnp.float32).astype(BF) for k in keys]
    x = jnp.ones((T, K), BF)

    def prog(warm: str = "", gemv_too: bool = True):
        def f(x, ws):
            for w in ws:
                if warm in ("prefetch", "load"):
                    x = l2_prefetch(w, x, nbytes=w.size * w.dtype.itemsize, mode=warm, interpret=interpret)
                if warm == "gemv":  # the same GEMV before the gap: does a plain read leave the weight in L2?
                    x = jnp.tile(x @ w, (1, -(-K // N)))[:, :K] * 1e-3
                x = _spin(x, iters=spin_iters, interpret=interpret)
                if gemv_too:
                    x = jnp.tile(x @ w, (1, -(-K // N)))[:, :K] * 1e-3
            return x
        return jax.jit(f)
    res = {}
    for name, f in (("gap only", prog(gemv_too=False)), ("gap, gemv", prog()),
                    ("prefetch, gap, gemv", prog("prefetch")),
                    ("load, gap", prog("load", False)), ("load, gap, gemv", prog("load")),
                    ("gemv, gap, gemv", prog("gemv")), ("gap, gemv (again)", prog())):
        res[name] = time_program(f, (x, ws), iters) / copies * 1e6
        log(f"prefetch check K={K} N={N}: {name:22s} {res[name]:8.2f} us per copy")
    gemv = res["gap, gemv"] - res["gap only"]
    res["gemv_us"], res["gemv_after_prefetch_us"] = gemv, res["prefetch, gap, gemv"] - res["gap only"]
    res["gemv_after_load_us"] = res["load, gap, gemv"] - res["load, gap"]
    res["second_gemv_us"] = res["gemv, gap, gemv"] - res["gap only"] - gemv
    log(f"prefetch check: GEMV {gemv:.2f} us ({K * N * 2 / gemv / 1e6:.2f} TB/s) from DRAM; after the weight's "
        f"TMA prefetch {res['gemv_after_prefetch_us']:.2f} us (the prefetch's launch included); after its TMA "
        f"load {res['gemv_after_load_us']:.2f} us (the load kernel: {res['load, gap'] - res['gap only']:.2f} us); "
        f"when the same GEMV ran before the gap {res['second_gemv_us']:.2f} us")
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8, help="rows of x (the engine's batch-1 decode bucket is 8)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--qkv", type=int, default=6144)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="projections to sweep (qkv o gate_up down)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one tuning each, interpreted (CPU)")
    ap.add_argument("--prefetch", nargs="*", default=[],
                    help="L2 prefetch specs (l2_prefetch.parse_spec): the layer chain is also timed with each, "
                         "e.g. qkv=8,o=8")
    ap.add_argument("--check-prefetch", action="store_true",
                    help="first: does a prefetched o-projection weight read from L2 after an idle gap?")
    ap.add_argument("--spin-iters", type=int, default=300,
                    help="length of the idle gap of --check-prefetch (300: ~120 us on an H100)")
    ap.add_argument("--check-n", type=int, default=0, help="N of --check-prefetch's weights (0: the hidden size)")
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.hidden, a.qkv, a.intermediate, a.layers, a.iters = 256, 384, 512, 2, 1
    interpret = a.smoke or jax.devices()[0].platform == "cpu"
    n_sm = getattr(jax.devices()[0], "core_count", 0) or 132
    ps = projections(a.hidden, a.qkv, a.intermediate)
    res = dict(device=jax.devices()[0].device_kind, tokens=a.tokens, sweeps={}, layers={})
    out = Path(a.output_json) if a.output_json else None

    def save():
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))

    def log(msg):
        print(msg, flush=True)

    if a.check_prefetch:
        res["prefetch_check"] = check_prefetch(a.hidden, a.check_n or a.hidden, a.tokens, 2 if a.smoke else 8, a.iters,
                                               50 if a.smoke else a.spin_iters, interpret, log)
        save()
    l2 = 60e6  # bytes: more than an H100's 50 MB L2, so no copy is read from it
    for p in ps:
        if a.only is not None and p.name not in a.only:
            continue
        copies = 2 if a.smoke else max(4, math.ceil(4 * l2 / (p.K * p.N * 2)))
        res["sweeps"][p.name] = sweep(p, a.tokens, copies, a.iters, interpret, a.smoke, n_sm, log)
        save()
    rng = np.random.default_rng(1)
    D, Q, F = a.hidden, a.qkv, a.intermediate

    keys = iter(jax.random.split(jax.random.key(1), 4 * a.layers))

    def rnd(shape, k):  # on the device: 14 GB of numpy normals took over a minute of host time
        return (jax.random.normal(next(keys), shape, jnp.float32) * k ** -0.5).astype(BF)
    ws = [(rnd((D, Q), D), rnd((D, D), D), rnd((D, 2 * F), D), rnd((F, D), F), jnp.ones(D, BF), jnp.ones(D, BF))
          for _ in range(a.layers)]
    x = jnp.asarray(rng.standard_normal((a.tokens, D), np.float32), BF)
    best = {n: GemvTuning(**s["best"]["tuning"]) for n, s in res["sweeps"].items() if s["best"]}
    variants = {"xla": ({}, ""), "gemv_best (qkv, o, down)": ({k: v for k, v in best.items() if k != "gate_up"}, ""),
                "gemv_best (all four)": (best, "")}
    variants.update({f"xla, prefetch {spec}": ({}, spec) for spec in a.prefetch})
    variants["xla (again)"] = ({}, "")  # drift across the run
    ref = None
    for name, (tunes, spec) in variants.items():
        if name.startswith("gemv") and not tunes:
            continue
        f = layer_chain(ps, tunes, interpret, prefetch=spec)
        ms = time_program(f, (x, ws), a.iters) * 1e3
        y = np.asarray(f(x, ws), np.float32)
        ref = y if ref is None else ref
        rel = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-30))
        res["layers"][name] = dict(ms=ms, us_per_layer=ms * 1e3 / a.layers, max_rel_diff_vs_xla=rel,
                                   tunings={k: dataclasses.asdict(v) for k, v in tunes.items() if v})
        log(f"{a.layers} layers, {name:32s}: {ms:7.3f} ms ({ms * 1e3 / a.layers:6.1f} us/layer)  "
            f"max rel diff vs XLA {rel:.3g}")
        save()
    return res


if __name__ == "__main__":
    main()
