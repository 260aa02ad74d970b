"""RoPE, the KV-cache write and the decode kernels' grouped q in one kernel (decode steps).

Design note. A batch-1 decode step of Llama-3-8B spends 5.19 ms in its matmuls and 0.62 ms in ten ~1.5 us
kernels per layer (docs/PERF.md, session 5). Four of them sit between the QKV matmul and the decode kernel:
XLA slices k and v out of the fused QKV output, rotates k (a slice fusion and a concatenate fusion), rotates
q into the zero-padded [B, Hkv, Gp, D] groups the decode kernels read (a pad fusion), and the KV write copies
k and v into their slots. Each moves a few KB; each costs a launch. This kernel does all four from the QKV
matmul's output as it lies in memory: one program per (token t, kv head h) reads that head's G + 2 rows
(G query heads, k, v), rotates the query rows and k in f32 with the step's cos/sin (the same for every layer,
which XLA computes once after inlining the layers), writes q's group rows (zero rows up to Gp) and stores k and
v into the token's slot, the cache aliased input -> output. The rotation is `models.llama.apply_rope`'s
arithmetic; a fused multiply-add may round it differently, by at most one ulp (the tests' tolerance).
Pallas with the Triton lowering: every load and store is a power-of-2 vector of D/2 or D elements; the G + 2
rows of a head are indexed one by one, so any G works (SmolLM2's 3, Qwen2.5-7B's 7).
Used for decode-only steps (T = batch <= max_num_seqs) on GPUs; prefill steps keep XLA's RoPE and the write
kernels of kv_write.py, whose per-token grid is measured there. Measured: docs/PERF.md (session 6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _rotate(x1, x2, cos, sin, dtype):
    """Half-split RoPE of one row (HF's rotate_half) in f32, as models.llama.apply_rope."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _rope_kv_write_kernel(
    slot_ref,  # i32[1]          cache slot of token t
    cos_ref,  # f32[D/2]         token t's cos(position * inv_freq)
    sin_ref,  # f32[D/2]
    qkv_ref,  # [G + 2, D]       token t, kv head h: rows 0..G-1 its query heads, row G its k, row G+1 its v
    k_in_ref,  # [N, S, D]       aliased to k_out_ref (the write goes through the output)
    v_in_ref,  # [N, S, D]
    q_ref,  # [Gp, D]            token t, kv head h: rotated query rows, zero rows G..Gp-1
    k_out_ref,  # [N, S, D]      kv head h's page pool
    v_out_ref,  # [N, S, D]
):
    del k_in_ref, v_in_ref
    G, Gp, D = qkv_ref.shape[0] - 2, q_ref.shape[0], qkv_ref.shape[1]
    half = D // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    cos, sin = cos_ref[...], sin_ref[...]
    for g in range(G):
        a, b = _rotate(qkv_ref[g, lo], qkv_ref[g, hi], cos, sin, q_ref.dtype)
        q_ref[g, lo] = a
        q_ref[g, hi] = b
    for g in range(G, Gp):
        q_ref[g, :] = jnp.zeros((D,), q_ref.dtype)
    S = k_out_ref.shape[1]
    slot = slot_ref[0]
    page, off = slot // S, slot % S
    a, b = _rotate(qkv_ref[G, lo], qkv_ref[G, hi], cos, sin, k_out_ref.dtype)
    k_out_ref[page, off, lo] = a
    k_out_ref[page, off, hi] = b
    v_out_ref[page, off, :] = qkv_ref[G + 1, :].astype(v_out_ref.dtype)


def _check(qkv, cos, sin, k_pages, v_pages, slot_mapping, group_padded):
    if qkv.ndim != 4:
        raise ValueError(f"want qkv [T, Hkv, G + 2, D], got {qkv.shape}")
    T, Hkv, C, D = qkv.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[0] != Hkv or k_pages.shape[3] != D:
        raise ValueError(f"want k/v pages [{Hkv}, N, S, {D}] of one shape, got {k_pages.shape} and {v_pages.shape}")
    if C < 3:
        raise ValueError(f"want at least one query row besides k and v in qkv's third axis, got {C}")
    if D % 2 or D & (D - 1):
        raise ValueError(f"head dim must be a power of 2 (the kernel's vectors), got {D}")
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"want cos/sin f32[{T}, {D // 2}], got {cos.shape} and {sin.shape}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[{T}], got {slot_mapping.dtype}{slot_mapping.shape}")
    if group_padded < C - 2:
        raise ValueError(f"group_padded ({group_padded}) must hold the {C - 2} query heads of a kv head")


@functools.partial(jax.jit, static_argnames=("group_padded", "interpret"), donate_argnums=(3, 4))
def rope_kv_write(qkv, cos, sin, k_pages, v_pages, slot_mapping, *, group_padded: int, interpret: bool = False):
    """Rotate q and k, write k and v into the cache, and lay q out in the decode kernels' padded groups.

    Args:
      qkv: [num_tokens, num_kv_heads, G + 2, head_dim], the QKV matmul's output: per kv head its G query heads,
        then k, then v (head dim a power of 2).
      cos, sin: f32[num_tokens, head_dim / 2], the tokens' cos/sin(position * inv_freq).
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim]; donated, updated in place.
      slot_mapping: i32[num_tokens], slot = block * block_size + offset; padding tokens -> block 0.
      group_padded: rows per kv head in the q output (>= G); rows past G are zero.
      interpret: run the Pallas interpreter (CPU tests).
    Returns:
      (q [num_tokens, num_kv_heads, group_padded, head_dim] in qkv.dtype, k_pages, v_pages).
    """
    _check(qkv, cos, sin, k_pages, v_pages, slot_mapping, group_padded)
    T, Hkv, C, D = qkv.shape
    _, N, S, _ = k_pages.shape
    pool = pl.BlockSpec((None, N, S, D), lambda t, h: (h, 0, 0, 0))  # kv head h's page pool
    row = pl.BlockSpec((None, D // 2), lambda t, h: (t, 0))
    return pl.pallas_call(
        _rope_kv_write_kernel,
        grid=(T, Hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (t,)),  # slot_mapping: element t
            row,  # cos
            row,  # sin
            pl.BlockSpec((None, None, C, D), lambda t, h: (t, h, 0, 0)),  # qkv: token t, kv head h
            pool,  # k_pages (aliased to output 1)
            pool,  # v_pages (aliased to output 2)
        ],
        out_specs=[pl.BlockSpec((None, None, group_padded, D), lambda t, h: (t, h, 0, 0)), pool, pool],
        out_shape=[jax.ShapeDtypeStruct((T, Hkv, group_padded, D), qkv.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={4: 1, 5: 2},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="rope_kv_write",
    )(slot_mapping, cos, sin, qkv, k_pages, v_pages)


def rope_kv_write_reference(qkv, cos, sin, k_pages, v_pages, slot_mapping, *, group_padded: int):
    """Pure jnp: the unfused path's arithmetic (RoPE as models.llama.apply_rope, kv_write_reference, jnp.pad)."""
    from jaxserve.pallas_kernels.reference import kv_write_reference
    _check(qkv, cos, sin, k_pages, v_pages, slot_mapping, group_padded)
    G = qkv.shape[2] - 2

    def rope(x):  # (T, N, D)
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)

    q = rope(qkv[:, :, :G].reshape(qkv.shape[0], -1, qkv.shape[3])).reshape(qkv.shape[:2] + (G, qkv.shape[3]))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, group_padded - G), (0, 0)))
    k_pages, v_pages = kv_write_reference(k_pages, v_pages, rope(qkv[:, :, G]), qkv[:, :, G + 1], slot_mapping)
    return q, k_pages, v_pages
