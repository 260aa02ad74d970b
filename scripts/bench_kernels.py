"""Attention kernel benchmark against the hardware limit.

Decode: our Pallas paged decode vs jax's bundled Pallas paged_attention vs the XLA reference, Llama-3-8B heads
(32 q / 8 kv, d=128, block 16, bf16), reported as achieved KV-read bandwidth next to a device copy's bandwidth
measured in the same run. Prefill: our ragged kernel vs the XLA reference, causal FLOP/s next to a bf16 matmul
measured in the same run, for 8 x 2048-token prompts and a mixed chunked batch. KV write: new tokens' K/V into
one layer's cache (~2 GiB per K and V), in place, XLA scatter vs Pallas vs jax-triton, as bandwidth.

  python scripts/bench_kernels.py --out /tmp/bench            # GPU
  python scripts/bench_kernels.py --smoke --out /tmp/smoke    # CPU: tiny sizes, Pallas in interpret mode
  python scripts/bench_kernels.py --kv-write --out /tmp/kvw    # the KV-write part alone

Timing: one uncounted warm-up call (compile + run), then the median of 5 rounds of --repeats back-to-back calls,
each round ended with block_until_ready. Decode is also timed as --chain calls inside one jitted program (the
"in one program" column): the device's time per call, as the engine's forward runs the kernel once per layer;
back-to-back calls of a short kernel measure the host's dispatch instead. Writes results.json and kernels.png to
--out and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.pallas_kernels import (kv_write, kv_write_pallas, paged_decode, paged_decode_reference,
                                     ragged_attention_reference, ragged_prefill)
from jaxserve.pallas_kernels import kv_write_triton as kvt
from jaxserve.pallas_kernels.paged_decode_mgpu import MosaicDecodeTuning, paged_decode_mgpu
from jaxserve.pallas_kernels.ragged_prefill_mgpu import FA3_TUNING, MosaicPrefillTuning, ragged_prefill_mgpu

HQ, HKV, D, BLOCK = 32, 8, 128, 16  # Llama-3-8B attention
DTYPE = jnp.bfloat16
KV_WRITE_TOKENS = (64, 256, 2048, 8192)  # a few decode rows ... a long prefill chunk
KV_WRITE_BLOCKS = 65536  # 8 kv heads x 16 slots x 128 x bf16 = 32 KiB a block: 2 GiB per K and per V
KV_WRITES_PER_CALL = 32  # one jitted call writes 32 times (a forward pass's layers); see _chained_writes


TIMING_ROUNDS = 5  # --smoke: 1 (interpreted kernels' times mean nothing, and each call takes seconds)


def time_fn(fn, *args, repeats: int) -> float:
    """Seconds per call: one uncounted warm-up, then the median of TIMING_ROUNDS rounds of `repeats` back-to-back
    calls (dispatch is asynchronous, so launches queue and the host's per-call overhead stays out of the figure)."""
    jax.block_until_ready(fn(*args))
    rounds = []
    for _ in range(TIMING_ROUNDS):
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - t0) / repeats)
    return statistics.median(rounds)


def time_chained(fn, q, k, v, tables, lens, *, n: int, repeats: int) -> float:
    """Seconds per call of fn(q, k, v, tables, lens) run n times inside one jitted program, as a forward pass runs
    an attention kernel once per layer: the device's time per call, without the host's per-dispatch cost that
    back-to-back calls of a short kernel are bound by (~38 us an H100 call; docs/PERF.md). Calls alternate
    between two copies of the cache, so that one call does not find the last one's KV in L2, and each has its
    own q (XLA would merge identical calls)."""
    qs = tuple(q * (1 + i / 64) for i in range(n))
    k2, v2 = jnp.copy(k), jnp.copy(v)

    def chained(qs, k, v, k2, v2, tables, lens):
        return [fn(qi, *((k, v) if i % 2 == 0 else (k2, v2)), tables, lens) for i, qi in enumerate(qs)]
    sec = time_fn(jax.jit(chained), qs, k, v, k2, v2, tables, lens, repeats=max(min(repeats, 2), repeats // 4)) / n
    del k2, v2
    return sec


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes/s of a device copy (read + write counted), on random data."""
    x = jax.random.normal(jax.random.key(1), (n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)  # not a no-op, so XLA must stream the whole array
    return 2 * x.nbytes / time_fn(f, x, repeats=repeats)


def matmul_flops(n: int, repeats: int) -> float:
    """bf16 matmul FLOP/s on random data (zeros/ones run faster than real data)."""
    a = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n**3 / time_fn(f, a, b, repeats=repeats)


def make_cache(key, batch: int, ctx: int, hkv: int, d: int):
    """Pages for `batch` sequences of `ctx` tokens, randomly permuted tables; block 0 stays the null page."""
    pages_per_seq = math.ceil(ctx / BLOCK)
    n = batch * pages_per_seq + 1
    kk, kv, kp = jax.random.split(key, 3)
    k = jax.random.normal(kk, (hkv, n, BLOCK, d), DTYPE)
    v = jax.random.normal(kv, (hkv, n, BLOCK, d), DTYPE)
    tables = (jax.random.permutation(kp, n - 1) + 1).reshape(batch, pages_per_seq).astype(jnp.int32)
    return k, v, tables


class Rows(list):
    """A section's result rows. Every row added also rewrites results.json with all rows so far, so a run cut off
    by a time limit (a device call's 600 s) keeps what it measured; main() writes the final file over it."""

    def __init__(self, args, items=()):
        super().__init__()
        self.args = args
        self.extend(items)

    def append(self, row):
        self.extend([row])

    def extend(self, items):
        items = list(items)
        super().extend(items)
        self.args.all_rows.extend(items)
        write_results(self.args, self.args.all_rows, partial=True)

    def __iadd__(self, items):
        self.extend(items)
        return self


def write_results(args, rows, partial: bool = False) -> None:
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, interpret=args.interpret,
                  copy_bw=args.copy_bw, matmul_flops=args.matmul_flops, partial=partial, rows=rows)
    tmp = os.path.join(args.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "results.json"))


def bench_decode(args, interpret: bool):
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as bundled  # deprecated module, still shipped
    rows = Rows(args)
    scale = 1 / math.sqrt(args.head_dim)
    for ctx in args.ctxs:
        for batch in args.batches:
            key = jax.random.PRNGKey(batch * 7919 + ctx)
            k, v, tables = make_cache(key, batch, ctx, args.kv_heads, args.head_dim)
            q = jax.random.normal(jax.random.fold_in(key, 1), (batch, args.q_heads, args.head_dim), DTYPE)
            lens = jnp.full((batch,), ctx, jnp.int32)
            kv_bytes = 2 * batch * ctx * args.kv_heads * args.head_dim * jnp.dtype(DTYPE).itemsize
            pps = tables.shape[1]
            impls = {
                "ours": functools.partial(paged_decode, scale=scale, interpret=interpret),
                **({} if args.no_mosaic else {
                    "ours_mosaic": functools.partial(paged_decode_mgpu, scale=scale, interpret=interpret),
                    "ours_mosaic_persistent": functools.partial(
                        paged_decode_mgpu, scale=scale, tuning=MosaicDecodeTuning(workers=-1),
                        interpret=interpret)}),
                "jax_bundled": lambda q, k, v, t, l: bundled.paged_attention(
                    q * scale, k, v, t, l, block_h=16, k_splits=math.gcd(16, pps),
                    pages_per_compute_block=min(8, pps // math.gcd(16, pps)), interpret=interpret),
                **({} if args.no_xla else {"xla": functools.partial(paged_decode_reference, scale=scale)}),
            }
            ref_out = None
            for name, fn in impls.items():
                row = dict(kind="decode", impl=name, batch=batch, ctx=ctx, block=BLOCK)
                try:
                    jf = jax.jit(fn)
                    out = jf(q, k, v, tables, lens)
                    if ref_out is None:
                        ref_out = out
                    err = jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))
                    row["max_err_vs_first"] = float(jnp.max(err))
                    sec = time_fn(jf, q, k, v, tables, lens, repeats=args.repeats)
                    row.update(us=sec * 1e6, gbps=kv_bytes / sec / 1e9, frac_copy=kv_bytes / sec / args.copy_bw)
                    # The XLA gather would hold n copies of the gathered KV. --smoke chains the first cell only: an
                    # interpreted kernel n times in one program is most of that mode's time.
                    first_cell = (batch, ctx) == (args.batches[0], args.ctxs[0])
                    if args.chain and name != "xla" and (first_cell or not args.smoke):
                        sec = time_chained(fn, q, k, v, tables, lens, n=args.chain, repeats=args.repeats)
                        row.update(us_chained=sec * 1e6, gbps_chained=kv_bytes / sec / 1e9,
                                   frac_copy_chained=kv_bytes / sec / args.copy_bw)
                except Exception as e:  # a failing impl is recorded, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(_fmt(row), flush=True)
            del k, v
    return rows


def sweep_decode(args, interpret: bool):
    """Decode-kernel tunings (pages per compute block x splits x warps) at the cells that set the targets;
    prints each cell's best, the data the defaults in pallas_kernels/tuning.py are chosen from."""
    from jaxserve.pallas_kernels.tuning import DecodeTuning
    rows = Rows(args)
    scale = 1 / math.sqrt(args.head_dim)
    for batch, ctx in args.sweep_cells:
        key = jax.random.PRNGKey(batch * 31 + ctx)
        k, v, tables = make_cache(key, batch, ctx, args.kv_heads, args.head_dim)
        q = jax.random.normal(jax.random.fold_in(key, 1), (batch, args.q_heads, args.head_dim), DTYPE)
        lens = jnp.full((batch,), ctx, jnp.int32)
        kv_bytes = 2 * batch * ctx * args.kv_heads * args.head_dim * jnp.dtype(DTYPE).itemsize
        auto = DecodeTuning().resolve(batch, args.kv_heads, tables.shape[1], BLOCK, args.head_dim, 2)
        best = None
        for ppcb in (8, 16) if "triton" in args.sweep_kernels else ():
            for splits in (1, 2, 4):
                for warps in (4, 8):
                    t = DecodeTuning(pages_per_compute_block=ppcb, num_splits=splits, num_warps=warps)
                    row = dict(kind="decode_sweep", batch=batch, ctx=ctx, ppcb=ppcb, splits=splits, warps=warps,
                               auto=(ppcb, splits, warps) == (auto.pages_per_compute_block, auto.num_splits,
                                                              auto.num_warps))
                    try:
                        f = jax.jit(functools.partial(paged_decode, scale=scale, tuning=t, interpret=interpret))
                        sec = time_fn(f, q, k, v, tables, lens, repeats=args.repeats)
                        row.update(us=sec * 1e6, gbps=kv_bytes / sec / 1e9)
                        if best is None or sec * 1e6 < best["us"]:
                            best = row
                    except Exception as e:  # noqa: BLE001 - e.g. shared memory overflow: recorded
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
        m_auto = MosaicDecodeTuning().resolve(batch, args.kv_heads, tables.shape[1], BLOCK, args.head_dim, 2)
        mosaic = "mosaic" in args.sweep_kernels and not args.no_mosaic
        layouts = ([(0, splits) for splits in (1, 2, 4, 8)] if 0 in args.sweep_workers else []) + \
            ([(-1, 1)] if -1 in args.sweep_workers else [])  # (workers, splits): grid, then persistent
        for keys in (64, 128) if mosaic else ():
            for stages in (2, 3, 4):
                for workers, splits in layouts:
                    t = MosaicDecodeTuning(keys_per_step=keys, num_stages=stages, num_splits=splits, workers=workers)
                    row = dict(kind="decode_sweep_mosaic", batch=batch, ctx=ctx, keys=keys, stages=stages,
                               splits=splits, persistent=bool(workers),
                               auto=(keys, stages, splits, workers) == (m_auto.keys_per_step, m_auto.num_stages,
                                                                        m_auto.num_splits, m_auto.workers))
                    try:
                        fn = functools.partial(paged_decode_mgpu, scale=scale, tuning=t, interpret=interpret)
                        if args.chain:  # the device's time, as the engine's forward runs the kernel
                            sec = time_chained(fn, q, k, v, tables, lens, n=args.chain, repeats=args.repeats)
                        else:
                            sec = time_fn(jax.jit(fn), q, k, v, tables, lens, repeats=args.repeats)
                        row.update(us=sec * 1e6, gbps=kv_bytes / sec / 1e9)
                    except Exception as e:  # noqa: BLE001 - recorded
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
        ok = [r for r in rows if r["kind"] == "decode_sweep_mosaic" and r["batch"] == batch and r["ctx"] == ctx
              and "us" in r]
        if ok:
            print(f"mosaic sweep B={batch} ctx={ctx}: best {min(ok, key=lambda r: r['us'])} | auto "
                  f"{[r for r in ok if r['auto']]}", flush=True)
        autos = [r for r in rows if r.get("auto") and r["kind"] == "decode_sweep" and r["batch"] == batch
                 and r["ctx"] == ctx and "us" in r]
        print(f"sweep B={batch} ctx={ctx}: best {best} | auto {autos[0] if autos else auto}", flush=True)
        del k, v
    return rows


def _prefill_batch(key, ctx_lens, q_lens, hq, hkv, d):
    """Flat batch of new tokens (their K/V already in the cache) + metadata."""
    seq_lens = np.asarray(ctx_lens) + np.asarray(q_lens)
    B, max_len = len(seq_lens), int(seq_lens.max())
    k, v, tables = make_cache(key, B, max_len, hkv, d)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_ids = np.repeat(np.arange(B), q_lens).astype(np.int32)
    pos = np.concatenate([np.arange(c, c + n) for c, n in zip(ctx_lens, q_lens)]).astype(np.int32)
    q = jax.random.normal(jax.random.fold_in(key, 2), (int(cu[-1]), hq, d), DTYPE)
    flops = 4 * hq * d * sum(n * c + n * (n + 1) // 2 for c, n in zip(ctx_lens, q_lens))  # QK^T + PV, causal
    meta = (tables, jnp.asarray(seq_lens, jnp.int32), jnp.asarray(cu), jnp.asarray(seq_ids), jnp.asarray(pos))
    return q, k, v, meta, flops


def _tokamax_impls(q, ctx_lens, q_lens, args, scale) -> dict:
    """tokamax's attention (a Pallas kernel library; optional) on the same prompts with contiguous K/V: the upper
    reference for a paged prefill kernel. Only for prompt-only cases of equal lengths (no cached context);
    its output is compared with ours on the same q (K/V drawn here, so the error column is not comparable)."""
    try:
        import tokamax
        from absl import flags
    except ImportError:
        return {}
    if not flags.FLAGS.is_parsed():  # tokamax reads absl flags, which would parse this script's argv
        flags.FLAGS.mark_as_parsed()
    if any(ctx_lens) or len(set(q_lens)) != 1 or jax.devices()[0].platform != "gpu":
        return {}
    B, L = len(q_lens), q_lens[0]
    qb = q.reshape(B, L, args.q_heads, args.head_dim)
    kk, kv = jax.random.split(jax.random.key(5))
    k = jax.random.normal(kk, (B, L, args.kv_heads, args.head_dim), DTYPE)
    v = jax.random.normal(kv, (B, L, args.kv_heads, args.head_dim), DTYPE)
    out = {}
    for impl in ("mosaic", "triton", "cudnn", "xla"):
        out[f"tokamax_{impl}"] = (lambda q_, k_, v_, impl=impl: tokamax.dot_product_attention(
            q_, k_, v_, scale=scale, is_causal=True, implementation=impl), (qb, k, v))
    return out


def _kernel_only(q, k, tables, lens, cu, scale, tuning):
    """The Mosaic prefill kernel without the wrapper's work around it (q laid out once, outside the timing).
    Its output is in token order for Gp <= 8 (padding rows zeroed by the kernel; tile-major otherwise): `.check`
    reshapes it, or puts rows in order, for the error column (untimed)."""
    from jaxserve.pallas_kernels import ragged_prefill_mgpu as pm
    q_in, items, static = pm.tile_queries(q, k, lens, cu, tuning)
    q_in = jax.block_until_ready(q_in)

    def fn(q_, k_, v_):
        return pm._prefill_call(q_in, k_, v_, tables, items, scale=scale, gp=static.gp, G=static.G,
                                tune=static.tune, direct=static.direct, interpret=False)
    fn.check = lambda o: pm.untile_outputs(o, cu, q.shape, static)
    return fn


def bench_prefill(args, interpret: bool):
    rows = Rows(args)
    scale = 1 / math.sqrt(args.head_dim)
    for name, (ctx_lens, q_lens) in args.prefill_cases.items():
        q, k, v, (tables, lens, cu, seq_ids, pos), flops = _prefill_batch(
            jax.random.PRNGKey(len(name)), ctx_lens, q_lens, args.q_heads, args.kv_heads, args.head_dim)
        impls = {
            "ours": lambda q, k, v: ragged_prefill(q, k, v, tables, lens, cu, scale=scale, interpret=interpret),
            **({} if args.no_mosaic else {"ours_mosaic": lambda q, k, v: ragged_prefill_mgpu(
                q, k, v, tables, lens, cu, scale=scale, interpret=interpret)}),
            # two warpgroups: GPU only and opt-in (the CPU interpreter needs 8 host devices for it)
            **({} if not args.mosaic_2wg or interpret else {"ours_mosaic_2wg": lambda q, k, v: ragged_prefill_mgpu(
                q, k, v, tables, lens, cu, scale=scale, tuning=MosaicPrefillTuning(warpgroups=2))}),
            # the same kernels alone (q laid out for them beforehand, output not put back in token order)
            **({} if args.no_mosaic or interpret else {"ours_mosaic_kernel_only": _kernel_only(
                q, k, tables, lens, cu, scale, MosaicPrefillTuning())}),
            **({} if not args.mosaic_2wg or interpret else {"ours_mosaic_2wg_kernel_only": _kernel_only(
                q, k, tables, lens, cu, scale, MosaicPrefillTuning(warpgroups=2))}),
            # FA3's layout: two compute warpgroups taking turns on the tensor cores, a producer warpgroup
            **({} if not args.mosaic_fa3 or interpret else {
                "ours_mosaic_fa3": lambda q, k, v: ragged_prefill_mgpu(q, k, v, tables, lens, cu, scale=scale,
                                                                       tuning=FA3_TUNING),
                "ours_mosaic_fa3_kernel_only": _kernel_only(q, k, tables, lens, cu, scale, FA3_TUNING)}),
            "xla": lambda q, k, v: ragged_attention_reference(q, k, v, tables, lens, cu, seq_ids, pos, scale=scale,
                                                              pages_per_iter=args.xla_pages_per_iter),
        }
        contiguous = _tokamax_impls(q, ctx_lens, q_lens, args, scale)
        ref_out = None
        runs = [(impl, fn, (q, k, v)) for impl, fn in impls.items()] + [(i, f, a) for i, (f, a) in contiguous.items()]
        for impl, fn, fargs in runs:
            row = dict(kind="prefill", impl=impl, case=name, tokens=int(q.shape[0]))
            try:
                jf = jax.jit(fn)
                out = jf(*fargs)
                if hasattr(fn, "check"):
                    out = jax.jit(fn.check)(out)
                if impl in impls:
                    ref_out = out if ref_out is None else ref_out
                    err = jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))
                row["max_err_vs_first"] = float(jnp.max(err)) if impl in impls else float("nan")  # own K/V
                sec = time_fn(jf, *fargs, repeats=args.repeats)
                row.update(us=sec * 1e6, tflops=flops / sec / 1e12, frac_matmul=flops / sec / args.matmul_flops)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def sweep_prefill(args, interpret: bool):
    """The Mosaic prefill kernel over its tunings (keys per step, TMA ring depth, warpgroups per tile) on the
    prefill cases; two warpgroups only with --mosaic-2wg and never in the interpreter (it needs 8 host devices)."""
    rows = Rows(args)
    if args.no_mosaic:
        return rows
    scale = 1 / math.sqrt(args.head_dim)
    layouts = [(1, False)]  # (compute warpgroups, producer warpgroup)
    if args.mosaic_2wg and not interpret:
        layouts.append((2, False))
    if args.mosaic_fa3 and not interpret:
        layouts += [(1, True), (2, True)]
    cases = list(args.prefill_cases.items())
    for name, (ctx_lens, q_lens) in cases[-1:] if args.smoke else cases:  # --smoke: the mixed case only
        q, k, v, (tables, lens, cu, _, _), flops = _prefill_batch(
            jax.random.PRNGKey(len(name)), ctx_lens, q_lens, args.q_heads, args.kv_heads, args.head_dim)
        want = ragged_prefill(q, k, v, tables, lens, cu, scale=scale, interpret=interpret).astype(jnp.float32)
        case_rows = []
        for wg, producer in layouts:
            for keys in (64, 128):
                # --smoke: one ring depth per key count, the shallow end with 64 keys, the deep one with 128 (CI time)
                for stages in ((2,) if keys == 64 else (4,)) if args.smoke else (2, 3, 4):
                    tune = MosaicPrefillTuning(keys_per_step=keys, num_stages=stages, warpgroups=wg,
                                               producer=producer)
                    if tune.resolve(16, args.head_dim, 2).num_stages < stages:
                        continue  # trimmed to fit shared memory: the same as a shallower ring
                    row = dict(kind="prefill_sweep_mosaic", case=name, warpgroups=wg, producer=producer, keys=keys,
                               stages=stages)
                    try:
                        row["stages_used"] = tune.resolve(16, args.head_dim, 2).num_stages
                        jf = jax.jit(lambda q, k, v, tune=tune: ragged_prefill_mgpu(
                            q, k, v, tables, lens, cu, scale=scale, tuning=tune, interpret=interpret))
                        row["max_err_vs_triton"] = float(jnp.max(jnp.abs(jf(q, k, v).astype(jnp.float32) - want)))
                        sec = time_fn(jf, q, k, v, repeats=args.repeats)
                        row.update(us=sec * 1e6, frac_matmul=flops / sec / args.matmul_flops)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    case_rows.append(row)
        ok = [r for r in case_rows if "us" in r and r["max_err_vs_triton"] < 2e-2]  # a wrong tuning cannot win
        if ok:
            best = min(ok, key=lambda r: r["us"])
            print(f"mosaic prefill sweep {name}: best {best} | all " +
                  " ".join(f"wg{r['warpgroups']}{'p' if r['producer'] else ''}/k{r['keys']}/s{r['stages_used']}:"
                           + (f"{r['frac_matmul']:.1%}" if "us" in r else "ERR") for r in case_rows), flush=True)
        rows += case_rows
    return rows


def _time_donating(fn, cache: list, *args, repeats: int) -> float:
    """time_fn of `cache[:] = fn(*cache, *args)`: the donated cache threads through the calls, updated in place."""
    def step():
        cache[:] = fn(*cache, *args)
        return cache[0]
    return time_fn(step, repeats=repeats)


def _chained_writes(write):
    """jit of R writes in a row (slots i32[R, T], other pages each time), as a forward pass writes one per layer:
    a lone write runs for a few us on the GPU, less than the host's ~40 us to dispatch a call, so timing calls
    of one would measure the host. The cache is donated, so the chain updates it in place."""
    def run(k, v, k_new, v_new, slots):
        for r in range(slots.shape[0]):
            k, v = write(k, v, k_new, v_new, slots[r])
        return k, v
    return jax.jit(run, donate_argnums=(0, 1))


def bench_kv_write(args, interpret: bool):
    """T new tokens' K/V into one layer's cache (T tokens in whole pages, pages in random order), the cache donated
    so every implementation updates it in place; jax-triton once per tokens-per-program choice (`auto` marks the
    one launch_config picks). Bytes: k_new and v_new read, the same rows written; us and GB/s per write."""
    hkv, d = args.kv_heads, args.head_dim
    tokens, n_blocks, R = ((8, 40), 64, 2) if args.smoke else (KV_WRITE_TOKENS, KV_WRITE_BLOCKS, KV_WRITES_PER_CALL)
    impls = {"xla": kv_write, "pallas": functools.partial(kv_write_pallas, interpret=interpret)}
    if kvt.triton_available():
        impls |= {f"jax_triton/bt{b}": functools.partial(kvt.kv_write_triton, block_tokens=b) for b in kvt.BLOCK_TOKENS}
    rows = Rows(args, [] if kvt.triton_available() else
                [dict(kind="kv_write", impl="jax_triton", skipped="no GPU or jax_triton")])
    for r in rows:
        print(_fmt_kv_write(r), flush=True)
    new_cache = lambda: [jnp.zeros((hkv, n_blocks, BLOCK, d), DTYPE) for _ in "kv"]  # [Hkv, N, S, D] each
    cache = new_cache()
    for T in tokens:
        key = jax.random.PRNGKey(T)
        P = math.ceil(T / BLOCK)
        pages = (jax.random.permutation(key, n_blocks - 1)[:R * P] + 1).reshape(R, P)  # never the null block 0
        slots = (pages[:, :, None] * BLOCK + jnp.arange(BLOCK)).reshape(R, -1)[:, :T].astype(jnp.int32)  # [R, T]
        k_new, v_new = (jax.random.normal(jax.random.fold_in(key, i), (T, hkv, d), DTYPE) for i in (1, 2))
        n_bytes = 2 * T * hkv * d * jnp.dtype(DTYPE).itemsize * 2  # k and v; read + written
        for impl, write in impls.items():
            row = dict(kind="kv_write", impl=impl, tokens=T, writes_per_call=R)
            if impl.startswith("jax_triton"):
                row["auto"] = int(impl.removeprefix("jax_triton/bt")) == kvt.launch_config(T, hkv, d)[0]
            try:
                sec = _time_donating(_chained_writes(write), cache, k_new, v_new, slots, repeats=args.repeats) / R
                row["max_err"] = max(float(jnp.max(jnp.abs(c.reshape(hkv, -1, d)[:, slots].astype(jnp.float32)
                                                           - new.transpose(1, 0, 2)[:, None].astype(jnp.float32))))
                                     for c, new in zip(cache, (k_new, v_new)))  # [Hkv, R, T, D] vs [Hkv, 1, T, D]
                row.update(us=sec * 1e6, gbps=n_bytes / sec / 1e9, frac_copy=n_bytes / sec / args.copy_bw)
            except Exception as e:  # a failing impl is recorded, not fatal; it may have consumed the cache
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                if any(c.is_deleted() for c in cache):
                    cache[:] = new_cache()
            rows.append(row)
            print(_fmt_kv_write(row), flush=True)
    return rows


def _fmt_kv_write(r):
    head = f"kv_write {r['impl']:15s} T={r.get('tokens', '-')!s:<6s}"
    if "skipped" in r or "error" in r:
        return f"{head} {'SKIPPED ' + r['skipped'] if 'skipped' in r else 'ERROR ' + r['error']}"
    auto = " (auto)" if r.get("auto") else ""
    return (f"{head} err={r['max_err']:.1e} {r['us']:10.1f} us  {r['gbps']:8.1f} GB/s  "
            f"{100 * r['frac_copy']:5.1f}% of copy{auto}")


def _fmt(r):
    head = f"{r['kind']:8s} {r['impl']:12s} " + (f"B={r['batch']:<4d} ctx={r['ctx']:<6d}" if r["kind"] == "decode"
                                                 else f"{r['case']:14s} T={r['tokens']:<6d}")
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    head += f" err={r['max_err_vs_first']:.1e}"
    if r["kind"] == "decode":
        chained = (f" | in one program {r['us_chained']:8.1f} us {r['gbps_chained']:7.1f} GB/s "
                   f"{100 * r['frac_copy_chained']:5.1f}%") if "us_chained" in r else ""
        return f"{head} {r['us']:10.1f} us  {r['gbps']:8.1f} GB/s  {100 * r['frac_copy']:5.1f}% of copy{chained}"
    return f"{head} {r['us']:10.1f} us  {r['tflops']:8.2f} TFLOP/s  {100 * r['frac_matmul']:5.1f}% of matmul"


def plot(rows, args, path):
    """Decode: KV-read bandwidth over the copy rate per batch, one panel per context (the in-one-program timing
    where it was taken, dashed back-to-back otherwise); prefill: share of the matmul rate, where it ran."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed (pip install jaxserve[test]); no PNG")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pre = [r for r in rows if r["kind"] == "prefill" and "error" not in r]
    fig, axes = plt.subplots(1, len(args.ctxs) + bool(pre), figsize=(5 * (len(args.ctxs) + bool(pre)), 4),
                             squeeze=False)
    axes = axes[0]
    for ax, ctx in zip(axes, args.ctxs):
        for impl in ("ours", "ours_mosaic", "ours_mosaic_persistent", "jax_bundled", "xla"):
            sel = [r for r in rows if r["kind"] == "decode" and r["ctx"] == ctx and r["impl"] == impl
                   and "error" not in r]
            chained = all("frac_copy_chained" in r for r in sel)
            pts = [(r["batch"], r["frac_copy_chained" if chained else "frac_copy"]) for r in sel]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if chained else "--",
                        label=impl + ("" if chained else " (back to back)"))
        ax.set(xscale="log", xlabel="batch", ylabel="KV read BW / copy BW", title=f"decode ctx={ctx}", ylim=(0, 1.1))
        ax.legend(fontsize=7)
    if pre:
        labels = [f"{r['case']}\n{r['impl']}" for r in pre]
        axes[-1].bar(range(len(pre)), [r["frac_matmul"] for r in pre])
        axes[-1].set_xticks(range(len(pre)), labels, fontsize=7)
        axes[-1].set(ylabel="causal FLOP/s / matmul FLOP/s", title="prefill")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    global BLOCK
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas interpret mode (CPU)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--ctxs", type=int, nargs="*", default=[512, 2048, 8192])
    p.add_argument("--xla-pages-per-iter", type=int, default=4)
    p.add_argument("--sweep", action="store_true", help="also sweep decode tunings at a few cells")
    p.add_argument("--prefill-sweep", action="store_true",
                   help="also sweep the Mosaic prefill tunings (keys per step, stages; warpgroups with --mosaic-2wg)")
    p.add_argument("--only", nargs="*", choices=["decode", "prefill", "kv_write", "sweep", "prefill_sweep"],
                   help="run only these sections (default: decode, prefill and kv_write)")
    p.add_argument("--sweep-cells", dest="cells", nargs="*", default=None, help="B:ctx cells for --sweep (default: 5 cells)")
    p.add_argument("--sweep-kernels", nargs="*", default=["triton", "mosaic"], choices=["triton", "mosaic"])
    p.add_argument("--sweep-workers", type=int, nargs="*", default=[0, -1], choices=[0, -1],
                   help="Mosaic decode layouts to sweep: 0 = one block per item (x splits), -1 = persistent")
    p.add_argument("--mosaic-2wg", action="store_true", help="also time the two-warpgroup Mosaic prefill (GPU)")
    p.add_argument("--mosaic-fa3", action="store_true",
                   help="also time the Mosaic prefill with a producer warpgroup (FA3's layout; GPU)")
    p.add_argument("--no-mosaic", action="store_true", help="leave out the Mosaic GPU decode kernel")
    p.add_argument("--no-xla", action="store_true", help="leave out the XLA gather + einsum decode")
    p.add_argument("--chain", type=int, default=16,
                   help="decode: also time N calls inside one jitted program (the device's time per call, as a "
                        "forward pass runs it); the sweep then uses this timing. 0: back-to-back calls only")
    p.add_argument("--block-size", type=int, default=BLOCK,
                   help="tokens per KV page in the decode and sweep sections (the engine's --block-size)")
    p.add_argument("--kv-write", action="store_true",
                   help="only the KV-cache write benchmark (the default run includes it: ~20 s on an H100)")
    args = p.parse_args()
    BLOCK = args.block_size
    interpret = args.smoke or jax.devices()[0].platform == "cpu"
    args.q_heads, args.kv_heads, args.head_dim = HQ, HKV, D
    if args.smoke:
        args.q_heads, args.kv_heads, args.head_dim = 8, 2, 64
        args.batches, args.ctxs, args.repeats = [3], [40], 1  # one cell: each implementation once (CI time)
        global TIMING_ROUNDS
        TIMING_ROUNDS = 1
        args.chain = min(args.chain, 2)
        args.sweep_cells = [(3, 64)]
        args.prefill_cases = {"prompts": ([0, 0], [24, 17]), "mixed": ([0, 33, 20, 20], [16, 8, 1, 1])}
        bw_bytes, mm_n = 1 << 22, 256
    else:
        args.prefill_cases = {
            "8x2048": ([0] * 8, [2048] * 8),
            # a 2048-token chunk at offset 4096, two prefix-cache hits, 64 decode rows at 2k context
            "mixed_chunked": ([4096, 1024, 1024] + [2047] * 64, [2048, 512, 512] + [1] * 64),
        }
        bw_bytes, mm_n = 1 << 30, 8192
        args.sweep_cells = [(64, 2048), (256, 2048), (8, 8192), (8, 2048), (1, 2048)]
    if args.cells:
        args.sweep_cells = [tuple(int(x) for x in c.split(":")) for c in args.cells]
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    args.copy_bw = copy_bandwidth(bw_bytes, args.repeats)
    args.matmul_flops = matmul_flops(mm_n, args.repeats)
    print(f"device {dev.device_kind}: copy {args.copy_bw / 1e9:.1f} GB/s, bf16 matmul "
          f"{args.matmul_flops / 1e12:.1f} TFLOP/s (interpret={interpret})", flush=True)
    sections = set(args.only or (["kv_write"] if args.kv_write else ["decode", "prefill", "kv_write"]))
    if args.sweep:
        sections.add("sweep")
    if args.prefill_sweep:
        sections.add("prefill_sweep")
    args.interpret, args.all_rows = interpret, []
    rows = []
    for name, fn in (("decode", bench_decode), ("prefill", bench_prefill), ("kv_write", bench_kv_write),
                     ("sweep", sweep_decode), ("prefill_sweep", sweep_prefill)):
        if name in sections:
            rows += fn(args, interpret)
    write_results(args, list(rows))
    print(f"wrote {args.out}/results.json")
    if "decode" in sections:
        plot(rows, args, os.path.join(args.out, "kernels.png"))


if __name__ == "__main__":
    main()
