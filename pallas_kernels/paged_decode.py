"""Paged decode attention (one query token per sequence) in Pallas, Triton lowering.

Design note.
- One program per (sequence b, kv head h, split s). It owns all G query heads that share kv head h, padded to
  Gp = max(16, next_pow2(G)) rows: Triton's dot needs M >= 16, and each K/V byte is then read once for the
  whole group (GQA costs no extra traffic). Decode is bound by KV bytes, so the padded rows are free.
- K/V stay in the cache layout [Hkv, N, S, D]; the BlockSpec hands the program kv head h's whole page pool
  and the kernel gathers `pages_per_compute_block` pages per step by page id (a pointer gather in Triton).
  Loads are masked past seq_len, so tail slots and unused pages are never read (they may hold garbage/NaN).
- Split-K: the sequence's own chunks (not the padded table) are divided evenly among `num_splits` programs,
  so short and long sequences in one batch both spread their work. Each split writes its normalised partial
  output and log-sum-exp; a small jnp merge rescales by exp(lse_s - max lse). With one split the kernel
  writes the final output directly and the merge is skipped. Splits are chosen in tuning.py to fill ~2
  programs per SM: at batch 1 x 8 kv heads a single split would leave most of an H100 idle.
- The scale multiplies the f32 logits (not q), so bf16 q is not rounded twice.
Measurements: pending the lead's GPU run of scripts/bench_kernels.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.pallas_kernels import tuning as tuning_lib
from jaxserve.pallas_kernels.checks import check_paged_args
from jaxserve.pallas_kernels.reference import _MIN_FINITE, default_scale


def _decode_kernel(
    bt_ref,  # i32[P']         block table row of sequence b (P' = P rounded up to pages_per_compute_block)
    len_ref,  # i32[1]         context length of sequence b
    q_ref,  # [Gp, D]          query heads of kv head h (rows >= G are zero)
    k_ref,  # [N, S, D]        kv head h's whole page pool
    v_ref,  # [N, S, D]
    o_ref,  # [Gp, D]          this split's normalised output (f32 when merged later)
    lse_ref,  # f32[Gp]        this split's log-sum-exp (-inf when the split is empty)
    *, scale: float, ppcb: int, num_splits: int, precision,
):
    split = pl.program_id(2)
    S = k_ref.shape[1]
    Gp, D = q_ref.shape
    K = ppcb * S  # keys per step
    seq_len = len_ref[0]
    n_chunks = pl.cdiv(pl.cdiv(seq_len, S), ppcb)
    per_split = pl.cdiv(n_chunks, num_splits)
    c0 = split * per_split
    c1 = jnp.minimum(c0 + per_split, n_chunks)
    q = q_ref[...]
    key_in_chunk = jnp.arange(ppcb)[:, None, None] * S + jnp.arange(S)[None, :, None]  # (ppcb, S, 1)
    slot_idx = jnp.broadcast_to(jnp.arange(S)[None, :, None], (ppcb, S, D))  # (ppcb, S, D)
    dim_idx = jnp.broadcast_to(jnp.arange(D)[None, None, :], (ppcb, S, D))  # (ppcb, S, D)

    def body(c, carry):
        m, l, acc = carry  # f32[Gp], f32[Gp], f32[Gp, D]
        ids = bt_ref[pl.ds(c * ppcb, ppcb)]  # i32[ppcb]
        start = c * K
        load_mask = jnp.broadcast_to(start + key_in_chunk < seq_len, (ppcb, S, D))
        # Gather by full integer indices (pointer gather in Triton; the interpreter rejects mixed int/slice).
        idx = (jnp.broadcast_to(ids[:, None, None], (ppcb, S, D)), slot_idx, dim_idx)
        k = plgpu.load(k_ref.at[idx], mask=load_mask, other=0.0).reshape(K, D)  # (K, D)
        v = plgpu.load(v_ref.at[idx], mask=load_mask, other=0.0).reshape(K, D)  # (K, D)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # (Gp, K) f32
        valid = (start + jnp.arange(K) < seq_len)[None, :]  # (1, K)
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # (Gp, K)
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l, acc

    init = (jnp.full((Gp,), _MIN_FINITE, jnp.float32), jnp.zeros((Gp,), jnp.float32),
            jnp.zeros((Gp, D), jnp.float32))
    m, l, acc = lax.fori_loop(c0, c1, body, init)
    nonempty = l > 0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)


def _decode_call(q4, k_pages, v_pages, block_tables, seq_lens, *, scale, tune: tuning_lib.DecodeTuning,
                 interpret: bool):
    """q4 [B, Hkv, Gp, D] -> (o [splits, B, Hkv, Gp, D], lse f32[splits, B, Hkv, Gp])."""
    B, Hkv, Gp, D = q4.shape
    _, N, S, _ = k_pages.shape
    ppcb, splits = tune.pages_per_compute_block, tune.num_splits
    P = block_tables.shape[1]
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # a chunk may run past P; pads = page 0
    P2 = block_tables.shape[1]
    out_dtype = q4.dtype if splits == 1 else jnp.float32
    precision = lax.Precision.HIGHEST if q4.dtype == jnp.float32 else None  # no TF32 for f32 callers
    kernel = functools.partial(_decode_kernel, scale=scale, ppcb=ppcb, num_splits=splits, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(B, Hkv, splits),
        in_specs=[
            pl.BlockSpec((None, P2), lambda b, h, s: (b, 0)),  # block_tables: row b
            pl.BlockSpec((1,), lambda b, h, s: (b,)),  # seq_lens: element b
            pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),  # q: group of kv head h
            pl.BlockSpec((None, N, S, D), lambda b, h, s: (h, 0, 0, 0)),  # k_pages: kv head h's pool
            pl.BlockSpec((None, N, S, D), lambda b, h, s: (h, 0, 0, 0)),  # v_pages: kv head h's pool
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (s, b, h, 0, 0)),  # o: split s
            pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (s, b, h, 0)),  # lse: split s
        ],
        out_shape=[jax.ShapeDtypeStruct((splits, B, Hkv, Gp, D), out_dtype),
                   jax.ShapeDtypeStruct((splits, B, Hkv, Gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=tune.num_warps, num_stages=tune.num_stages),
        interpret=interpret,
        name=f"paged_decode_ppcb{ppcb}_splits{splits}",
    )(block_tables, seq_lens, q4, k_pages, v_pages)


def merge_splits(o, lse):
    """Log-sum-exp merge of split-K partials: o [splits, ..., D] normalised, lse f32[splits, ...] -> [..., D]."""
    m = jnp.max(lse, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # every split empty (seq_len 0)
    w = jnp.exp(lse - m)  # (splits, ...); empty splits weigh 0
    den = jnp.sum(w, axis=0)
    return jnp.sum(w[..., None] * o.astype(jnp.float32), axis=0) / jnp.where(den == 0, 1.0, den)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "group", "interpret"))
def paged_decode(q, k_pages, v_pages, block_tables, seq_lens, *, scale: float | None = None,
                 tuning: tuning_lib.DecodeTuning = tuning_lib.DEFAULT_DECODE, group: int | None = None,
                 interpret: bool = False):
    """Paged GQA decode attention.

    Args:
      q: [batch, num_q_heads, head_dim] (one new token per sequence); or, with `group` given, already in the
        kernel's padded groups [batch, num_kv_heads, decode_group_rows(group), head_dim] (rope_kv_write's q).
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim]; block 0 is the null page.
      block_tables: i32[batch, pages_per_seq]; entries past a sequence's pages may be anything in range.
      seq_lens: i32[batch] context length including the new token; 0 (padding row) gives zeros.
      scale: softmax scale, default 1/sqrt(head_dim).
      tuning: DecodeTuning; 0 fields are picked from the shapes.
      group: query heads per kv head when q comes grouped (None: q is [batch, num_q_heads, head_dim]).
      interpret: run the Pallas interpreter (CPU tests).
    Returns:
      [batch, num_q_heads, head_dim] in q.dtype.
    """
    q3 = ungrouped_shape(q, k_pages, group, decode_group_rows)
    check_paged_args(q3, k_pages, v_pages, block_tables, "B")
    return grouped_decode(_decode_call, q, k_pages, v_pages, block_tables, seq_lens, scale=scale, tuning=tuning,
                          group_padded=decode_group_rows(q3.shape[1] // k_pages.shape[0]), interpret=interpret,
                          group=group)


def decode_group_rows(group: int) -> int:
    """Rows per kv head of this kernel's q groups: Triton's dot needs M >= 16."""
    return max(16, tuning_lib.next_pow2(group))


def ungrouped_shape(q, k_pages, group: int | None, group_rows) -> jax.ShapeDtypeStruct:
    """q's [B, Hq, D] shape (for the argument checks) whether q is plain or grouped [B, Hkv, Gp, D]."""
    if group is None:
        return jax.ShapeDtypeStruct(q.shape, q.dtype)
    Hkv = k_pages.shape[0]
    if q.ndim != 4 or q.shape[1] != Hkv or q.shape[2] != group_rows(group):
        raise ValueError(f"grouped q must be [B, {Hkv}, {group_rows(group)}, D] for group {group}, got {q.shape}")
    return jax.ShapeDtypeStruct((q.shape[0], Hkv * group, q.shape[3]), q.dtype)


def group_queries(q, k_pages, seq_lens, *, scale, group: int | None, group_padded: int):
    """-> (q groups [B, Hkv, Gp, D] with zero rows past G, G, scale): q [B, Hq, D] padded into groups, or taken as
    it is when `group` says it comes grouped; seq_lens checked; scale defaulted to 1/sqrt(head_dim)."""
    Hkv, _, _, D = k_pages.shape
    B = q.shape[0]
    if seq_lens.shape != (B,) or seq_lens.dtype != jnp.int32:
        raise ValueError(f"seq_lens must be i32[{B}], got {seq_lens.dtype}{seq_lens.shape}")
    scale = default_scale(D) if scale is None else scale
    if group is not None:
        return q, group, scale
    G = q.shape[1] // Hkv
    return jnp.pad(q.reshape(B, Hkv, G, D), ((0, 0), (0, 0), (0, group_padded - G), (0, 0))), G, scale


def grouped_decode(call, q, k_pages, v_pages, block_tables, seq_lens, *, scale, tuning, group_padded: int,
                   interpret: bool, group: int | None = None):
    """The part both decode kernels share: q [B, Hq, D] -> groups [B, Hkv, Gp, D] (zero rows past G), the
    kernel `call` (-> per-split outputs and lse), the split merge, and back to [B, Hq, D] in q.dtype.
    With `group` given, q comes grouped already ([B, Hkv, Gp, D], zero rows past G, as rope_kv_write makes it),
    which saves the pad."""
    Hkv, _, S, D = k_pages.shape
    B = q.shape[0]
    q, G, scale = group_queries(q, k_pages, seq_lens, scale=scale, group=group, group_padded=group_padded)
    tune = tuning.resolve(B, Hkv, block_tables.shape[1], S, D, k_pages.dtype.itemsize)
    o, lse = call(q, k_pages, v_pages, block_tables, seq_lens, scale=scale, tune=tune, interpret=interpret)
    o = o[0] if tune.num_splits == 1 else merge_splits(o, lse)  # (B, Hkv, Gp, D)
    return o[:, :, :G].reshape(B, Hkv * G, D).astype(q.dtype)
