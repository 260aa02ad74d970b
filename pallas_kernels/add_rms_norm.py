"""Residual add and RMSNorm in one kernel: s = x + d, n = w * rmsnorm(s).

Design note. Each Llama layer adds a sublayer's output to the residual stream and normalises the sum for the
next sublayer, twice. XLA compiles each pair to two ~1.7 us kernels at batch 1 on the H100 (a loop fusion for
the add, a reduction fusion for the norm; docs/PERF.md, session 5) even though the norm only reads what the add
wrote. One program per token row reads x and d once and writes both the sum (the residual stream) and the
normalised row, in `models.llama.rms_norm`'s arithmetic: the sum rounded to the stream's dtype, normalised in
f32, cast back, then scaled by w (so the kernel matches the unfused path to the reduction order).

Split-K partials. At batch 1 XLA computes the o-projection and the down projection as split-K GEMVs: partial
sums in f32, then a reduction kernel (~1.6 us) that the fusion after them used to absorb, but a custom call
cannot. So d may also be [S, T, D] f32 partials (models.llama's decode path asks for them): the kernel sums
them, rounds the sum to x's dtype as XLA's reduction would, and adds it, so no reduction kernel is left.
Pallas with the Triton lowering; the hidden size must be a power of 2 (a whole row is one vector), which holds
for Llama-3 (4096, 8192) and Qwen2.5-7B (3584 does not: it keeps XLA's pair, as does SmolLM2's 576).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def supports(hidden_size: int) -> bool:
    return hidden_size >= 16 and hidden_size & (hidden_size - 1) == 0


def _add_rms_norm_kernel(
    x_ref,  # [D]   residual row t
    d_ref,  # [D]   the sublayer's output row t, or [S, D] its split-K partials
    w_ref,  # [D]   norm weight
    s_ref,  # [D]   out: x + d (the new residual row)
    n_ref,  # [D]   out: w * rmsnorm(x + d)
    *, eps: float,
):
    d = d_ref[...].astype(jnp.float32)
    if d.ndim == 2:  # partials: their sum, rounded to the stream's dtype (the GEMV's own output dtype)
        d = jnp.sum(d, axis=0).astype(s_ref.dtype).astype(jnp.float32)
    s = (x_ref[...].astype(jnp.float32) + d).astype(s_ref.dtype)
    s_ref[...] = s
    sf = s.astype(jnp.float32)
    sf = sf * jax.lax.rsqrt(jnp.mean(sf * sf) + eps)
    n_ref[...] = (w_ref[...].astype(jnp.float32) * sf.astype(n_ref.dtype).astype(jnp.float32)).astype(n_ref.dtype)


def _check(x, d, w):
    if x.ndim != 2 or not ((d.shape == x.shape and d.dtype == x.dtype) or (d.ndim == 3 and d.shape[1:] == x.shape)):
        raise ValueError(f"want x [T, D] and d of its shape and dtype, or [S, T, D] partials; got {x.dtype}{x.shape} "
                         f"and {d.dtype}{d.shape}")
    if d.ndim == 3 and d.shape[0] & (d.shape[0] - 1):
        raise ValueError(f"the number of partials must be a power of 2 (Triton's vectors), got {d.shape[0]}")
    if w.shape != (x.shape[1],):
        raise ValueError(f"want w [{x.shape[1]}], got {w.shape}")
    if not supports(x.shape[1]):
        raise ValueError(f"hidden size must be a power of 2 >= 16 (one row is one vector), got {x.shape[1]}")


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(x, d, w, *, eps: float, num_warps: int = 4, interpret: bool = False):
    """Args:
      x: [num_tokens, hidden] residual stream; d: the same shape and dtype (a sublayer's output), or
        [S, num_tokens, hidden] split-K partials of it (any float dtype, summed in f32).
      w: [hidden] RMSNorm weight. eps: RMSNorm epsilon.
    Returns:
      (x + d, w * rmsnorm(x + d)), both [num_tokens, hidden] in x.dtype.
    """
    _check(x, d, w)
    T, D = x.shape
    row = pl.BlockSpec((None, D), lambda t: (t, 0))
    d_spec = row if d.ndim == 2 else pl.BlockSpec((d.shape[0], None, D), lambda t: (0, t, 0))
    return pl.pallas_call(
        functools.partial(_add_rms_norm_kernel, eps=eps),
        grid=(T,),
        in_specs=[row, d_spec, pl.BlockSpec((D,), lambda t: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, d, w)


def add_rms_norm_reference(x, d, w, *, eps: float):
    """Pure jnp, as models.llama: s = x + d in x's dtype, then w * rms_norm(s). [S, T, D] partials d are summed
    in f32 and rounded to x's dtype first."""
    if d.ndim == 3:
        d = jnp.sum(d.astype(jnp.float32), axis=0).astype(x.dtype)
    s = x + d
    sf = s.astype(jnp.float32)
    sf = sf * jax.lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    return s, w * sf.astype(s.dtype)
