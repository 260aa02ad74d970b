"""Skinny matmul for small decode steps: x [T, K] @ w [K, N] with T <= 16, streaming w once. Measured, not used.

Design note. A batch-1 decode step of Llama-3-8B is its weights streamed once (docs/PERF.md, session 5). XLA
runs the QKV, o and down projections of a T=8 step as split-K GEMMs: f32 partial sums, then a reduction kernel
(1.6-1.9 us each). Before the fused small kernels, XLA folded that reduction into the elementwise fusion after
the matmul; the custom calls after them now (rope_kv_write, add_rms_norm) cannot absorb it, so three reduction
kernels per layer cost ~0.17 ms a step, and the SiLU x up kernel between gate/up and down another ~0.06 ms.
This kernel does the split itself and hands on what the next kernel can take:
  - splits == 1: the [T, N] product in x's dtype (the QKV projection, read by rope_kv_write);
  - splits == S > 1: [S, T, N] f32 partials over K chunks, which add_rms_norm sums while it adds the residual
    (the o and down projections), so no reduction kernel is left;
  - silu_gate: x is gate/up [T, 2, K] and the kernel multiplies silu(gate) * up (rounded to w's dtype, as the
    unfused path stores it) by w, so the down projection reads the gate/up output directly.
One program per (N block, K split) walks its K chunk in block_k steps: it loads x's rows (padded to 16 with a
masked load: Triton's dot needs M >= 16; T <= 16 keeps the padding free) and a [block_k, block_n] tile of w,
and accumulates their dot in f32 on the tensor cores. Triton pipelines the w loads over num_stages.

Result (H100, docs/PERF.md session 13, scripts/bench_gemv.py over 47 tunings per projection): at its best
tuning the kernel only ties XLA's GEMM plus its reduction (o: 14.71 against 14.75 us; QKV 21.8 against 21.3;
down with SiLU inside 45.4 against 44.1 with its SiLU and reduction kernels). Both stream these 32-48 MB
matrices at 2.3-2.6 TB/s. What the missing kernels save, the slower GEMV loses again: 32 layers' matmuls and
norms took 5.16 ms with it against XLA's 5.04 ms. So the engine keeps XLA's dots, and this kernel stays with
its benchmark and tests as the record (like bench_splitk.py's partials).
Pallas with the Triton lowering (the Mosaic GPU path needs 64-row warpgroup tiles).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_TOKENS = 16  # rows handled by one dot tile (Triton's smallest M)


@dataclasses.dataclass(frozen=True)
class GemvTuning:
    """block_n: output columns per program. block_k: K per loop step. splits: K chunks (programs per column
    block; > 1 returns f32 partials). num_warps / num_stages: Triton's."""
    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, K: int, N: int) -> bool:
        return (N % self.block_n == 0 and K % self.splits == 0 and (K // self.splits) % self.block_k == 0
                and all(v & (v - 1) == 0 for v in (self.block_n, self.block_k, self.splits)))


def _gemv_kernel(*refs, block_k: int, silu_gate: bool):
    # x_ref [T, Kc]: this split's chunk of x (with silu_gate: of the gate, then up_ref the same chunk of up);
    # w_ref [Kc, BN]: this (split, column block)'s tile of w; o_ref [T, BN]: the product or this split's partial
    x_ref, up_ref, w_ref, o_ref = refs if silu_gate else (refs[0], None, *refs[1:])
    T, BN = o_ref.shape
    M = MAX_TOKENS
    rows = jax.lax.broadcasted_iota(jnp.int32, (M, block_k), 0) < T  # the padding rows are never read

    def x_tile(k):
        if not silu_gate:
            return plgpu.load(x_ref.at[pl.ds(0, M), pl.ds(k, block_k)], mask=rows, other=0.0)
        g = plgpu.load(x_ref.at[pl.ds(0, M), pl.ds(k, block_k)], mask=rows, other=0.0).astype(jnp.float32)
        u = plgpu.load(up_ref.at[pl.ds(0, M), pl.ds(k, block_k)], mask=rows, other=0.0).astype(jnp.float32)
        return (g * jax.nn.sigmoid(g) * u).astype(w_ref.dtype)

    def step(i, acc):
        k = pl.multiple_of(i * block_k, block_k)
        w = w_ref[pl.ds(k, block_k), :]
        # f32 weights keep f32 products (Triton's default would round them to TF32)
        return acc + plgpu.dot(x_tile(k), w, allow_tf32=w.dtype != jnp.float32)  # (M, BN) f32

    acc = jax.lax.fori_loop(0, w_ref.shape[0] // block_k, step, jnp.zeros((M, BN), jnp.float32))
    out_rows = jax.lax.broadcasted_iota(jnp.int32, (M, BN), 0) < T
    plgpu.store(o_ref.at[pl.ds(0, M), :], acc.astype(o_ref.dtype), mask=out_rows)


def _check(x, w, tuning: GemvTuning, silu_gate: bool):
    want = 3 if silu_gate else 2
    if x.ndim != want or (silu_gate and x.shape[1] != 2):
        raise ValueError(f"want x [T, {'2, ' if silu_gate else ''}K], got {x.shape}")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"want w [K={x.shape[-1]}, N], got {w.shape}")
    if not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"gemv takes 1..{MAX_TOKENS} rows, got {x.shape[0]}")
    if not tuning.fits(*w.shape):
        raise ValueError(f"{tuning} does not tile w {w.shape}: N % block_n, (K / splits) % block_k, powers of 2")


@functools.partial(jax.jit, static_argnames=("tuning", "silu_gate", "interpret"))
def gemv(x, w, *, tuning: GemvTuning = GemvTuning(), silu_gate: bool = False, interpret: bool = False):
    """Args:
      x: [T, K] activations (T <= 16), or with silu_gate [T, 2, K] gate/up rows: the product is then
        silu(x[:, 0]) * x[:, 1], rounded to w's dtype, times w.
      w: [K, N] weights.
    Returns:
      [T, N] in x's dtype when tuning.splits == 1, else f32[splits, T, N] partial sums over K chunks.
    """
    _check(x, w, tuning, silu_gate)
    T, K, N, S = x.shape[0], w.shape[0], w.shape[1], tuning.splits
    Kc = K // S
    x_specs, xs = [pl.BlockSpec((T, Kc), lambda n, s: (0, s))], (x,)  # split s's chunk of every row
    if silu_gate:  # [T, 2K]: gate columns, then up columns; split s reads chunk s of each
        xs = (x.reshape(T, 2 * K),) * 2
        x_specs.append(pl.BlockSpec((T, Kc), lambda n, s: (0, S + s)))
    w_spec = pl.BlockSpec((Kc, tuning.block_n), lambda n, s: (s, n))  # split s's rows of column block n
    if S == 1:
        out_spec, out_shape = pl.BlockSpec((T, tuning.block_n), lambda n, s: (0, n)), (T, N)
        out_dtype = x.dtype
    else:  # one f32 partial per split
        out_spec, out_shape = pl.BlockSpec((None, T, tuning.block_n), lambda n, s: (s, 0, n)), (S, T, N)
        out_dtype = jnp.float32
    return pl.pallas_call(
        functools.partial(_gemv_kernel, block_k=tuning.block_k, silu_gate=silu_gate),
        grid=(N // tuning.block_n, S),
        in_specs=[*x_specs, w_spec],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
        interpret=interpret,
        name="gemv_silu" if silu_gate else "gemv",
    )(*xs, w)


def gemv_reference(x, w, *, splits: int = 1, silu_gate: bool = False):
    """Pure jnp: the same contract as gemv (partials over equal K chunks when splits > 1)."""
    if silu_gate:
        g, u = x[:, 0].astype(jnp.float32), x[:, 1].astype(jnp.float32)
        x = (g * jax.nn.sigmoid(g) * u).astype(w.dtype)
    if splits == 1:
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    T, K = x.shape
    return jnp.einsum("TSk,SkN->STN", x.reshape(T, splits, K // splits), w.reshape(splits, K // splits, -1),
                      preferred_element_type=jnp.float32)  # (S, T, N)
