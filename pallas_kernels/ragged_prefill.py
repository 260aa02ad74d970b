"""Ragged paged prefill attention in Pallas, Triton lowering: flat-packed new tokens of many sequences,
causal within the new tokens, attending each sequence's earlier cached pages as well.

Design note.
- Work items. The flat token axis is cut per sequence into tiles of `block_q` tokens, so a tile never spans two
  sequences. The (sequence, tile) list is built in jnp before the call (cumsum + searchsorted over cu_q_lens,
  O(B + T/block_q) work) and padded to the static bound W = cdiv(T, block_q) + B; surplus items have no rows
  and return at once. The grid is (W, Hkv). A prefix-cache hit or a later chunk of a chunked prefill is just a
  tile whose first position is > 0; a decode row is a tile with one token, so mixed batches need no second
  kernel (the dedicated decode kernel is still better for pure decode steps: it splits K and wastes no rows).
- Rows. A tile holds block_q tokens x the Gp = next_pow2(G) query heads of one kv head, laid out token-major
  ([Hkv, T * Gp, D] after one transpose in the wrapper), so K/V of a page are read once per tile for the whole
  group and the dot has block_q * Gp rows (>= 16 as Triton's dot needs).
- Keys. The tile walks its sequence's pages from 0 to its last query position, `pages_per_compute_block` pages
  per step, gathering them by page id with loads masked past the last needed key (tail slots may be garbage).
  The causal mask is key_pos <= query_pos per row; padding rows and heads are masked on store.
- The wrapper pads q by block_q tokens so a tile's row slice never runs off the array (the interpreter would
  clamp and shift a slice that does).
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
from jaxserve.pallas_kernels.checks import check_ragged_args
from jaxserve.pallas_kernels.reference import _MIN_FINITE, default_scale


def _prefill_kernel(
    seq_ref,  # i32[1]        sequence of this work item
    q0_ref,  # i32[1]         flat index of the tile's first token
    nq_ref,  # i32[1]         real tokens in the tile (0 for surplus items)
    pos0_ref,  # i32[1]       absolute position of the tile's first token
    bt_ref,  # i32[B, P']     block tables (P' = P rounded up to pages_per_compute_block)
    q_ref,  # [(T + bq) * Gp, D]   kv head h's query rows, token-major
    k_ref,  # [N, S, D]       kv head h's whole page pool
    v_ref,  # [N, S, D]
    o_ref,  # [(T + bq) * Gp, D]   output rows, token-major
    *, scale: float, bq: int, gp: int, ppcb: int, precision,
):
    S = k_ref.shape[1]
    D = q_ref.shape[1]
    R = bq * gp  # rows per tile
    K = ppcb * S  # keys per step
    seq, q0, nq, pos0 = seq_ref[0], q0_ref[0], nq_ref[0], pos0_ref[0]
    row_tok = jnp.arange(R) // gp  # (R,) token of each row within the tile
    row_ok = row_tok < nq  # (R,)
    row_pos = pos0 + row_tok  # (R,) absolute query position
    num_keys = pos0 + nq  # keys 0 .. last query position
    n_chunks = jnp.where(nq > 0, pl.cdiv(pl.cdiv(num_keys, S), ppcb), 0)
    rows = pl.ds(q0 * gp, R)
    q = plgpu.load(q_ref.at[rows, :], mask=jnp.broadcast_to(row_ok[:, None], (R, D)), other=0.0)  # (R, D)
    key_in_chunk = jnp.arange(ppcb)[:, None, None] * S + jnp.arange(S)[None, :, None]  # (ppcb, S, 1)
    slot_idx = jnp.broadcast_to(jnp.arange(S)[None, :, None], (ppcb, S, D))  # (ppcb, S, D)
    dim_idx = jnp.broadcast_to(jnp.arange(D)[None, None, :], (ppcb, S, D))  # (ppcb, S, D)

    def body(c, carry):
        m, l, acc = carry  # f32[R], f32[R], f32[R, D]
        ids = bt_ref[seq, pl.ds(c * ppcb, ppcb)]  # i32[ppcb]
        start = c * K
        load_mask = jnp.broadcast_to(start + key_in_chunk < num_keys, (ppcb, S, D))
        idx = (jnp.broadcast_to(ids[:, None, None], (ppcb, S, D)), slot_idx, dim_idx)
        k = plgpu.load(k_ref.at[idx], mask=load_mask, other=0.0).reshape(K, D)  # (K, D)
        v = plgpu.load(v_ref.at[idx], mask=load_mask, other=0.0).reshape(K, D)  # (K, D)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # (R, K) f32
        causal = (start + jnp.arange(K))[None, :] <= row_pos[:, None]  # (R, K)
        s = jnp.where(causal, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])  # (R, K)
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l, acc

    init = (jnp.full((R,), _MIN_FINITE, jnp.float32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, D), jnp.float32))
    _, l, acc = lax.fori_loop(0, n_chunks, body, init)
    o = acc / jnp.where(l > 0, l, 1.0)[:, None]
    plgpu.store(o_ref.at[rows, :], o.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok[:, None], (R, D)))


def work_items(cu_q_lens, seq_lens, *, block_q: int, num_items: int):
    """Per-sequence query tiles of the flat token axis.

    Returns (seq, q0, nq, pos0), each i32[num_items]: the tile's sequence, first flat token, number of real
    tokens (0 for surplus items) and absolute position of its first token.
    """
    B = seq_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # (B,)
    tiles = (q_lens + block_q - 1) // block_q  # (B,)
    tile_end = jnp.cumsum(tiles)  # (B,)
    w = jnp.arange(num_items, dtype=jnp.int32)
    # compare_all: one fusion. The default method is a loop of log2(B) steps, a while loop on the GPU whose trip
    # count goes back to the host at every step (and this runs once per layer).
    seq = jnp.minimum(jnp.searchsorted(tile_end, w, side="right", method="compare_all"), B - 1).astype(jnp.int32)
    j = w - (tile_end[seq] - tiles[seq])  # tile index within its sequence
    live = w < tile_end[-1]
    nq = jnp.where(live, jnp.clip(q_lens[seq] - j * block_q, 0, block_q), 0)
    q0 = jnp.where(live, cu_q_lens[seq] + j * block_q, 0)
    pos0 = jnp.where(live, seq_lens[seq] - q_lens[seq] + j * block_q, 0)
    return seq, q0.astype(jnp.int32), nq.astype(jnp.int32), pos0.astype(jnp.int32)


def _prefill_call(q_rows, k_pages, v_pages, block_tables, items, *, scale, bq, gp,
                  tune: tuning_lib.PrefillTuning, interpret: bool):
    """q_rows [Hkv, (T + bq) * Gp, D] -> o [Hkv, (T + bq) * Gp, D]."""
    Hkv, TR, D = q_rows.shape
    _, N, S, _ = k_pages.shape
    B, P2 = block_tables.shape
    W = items[0].shape[0]
    precision = lax.Precision.HIGHEST if q_rows.dtype == jnp.float32 else None
    kernel = functools.partial(_prefill_kernel, scale=scale, bq=bq, gp=gp, ppcb=tune.pages_per_compute_block,
                               precision=precision)
    item_spec = pl.BlockSpec((1,), lambda w, h: (w,))  # one work item's scalar
    return pl.pallas_call(
        kernel,
        grid=(W, Hkv),
        in_specs=[
            item_spec, item_spec, item_spec, item_spec,  # seq, q0, nq, pos0
            pl.BlockSpec((B, P2), lambda w, h: (0, 0)),  # block_tables: whole (row chosen in-kernel)
            pl.BlockSpec((None, TR, D), lambda w, h: (h, 0, 0)),  # q rows of kv head h (tile sliced in-kernel)
            pl.BlockSpec((None, N, S, D), lambda w, h: (h, 0, 0, 0)),  # k_pages: kv head h's pool
            pl.BlockSpec((None, N, S, D), lambda w, h: (h, 0, 0, 0)),  # v_pages: kv head h's pool
        ],
        out_specs=pl.BlockSpec((None, TR, D), lambda w, h: (h, 0, 0)),  # o rows of kv head h (masked store)
        out_shape=jax.ShapeDtypeStruct((Hkv, TR, D), q_rows.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tune.num_warps, num_stages=tune.num_stages),
        interpret=interpret,
        name=f"ragged_prefill_bq{bq}_gp{gp}_ppcb{tune.pages_per_compute_block}",
    )(*items, block_tables, q_rows, k_pages, v_pages)


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "interpret"))
def ragged_prefill(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, *, scale: float | None = None,
                   tuning: tuning_lib.PrefillTuning = tuning_lib.DEFAULT_PREFILL, interpret: bool = False):
    """Causal paged attention for flat-packed new tokens (prefill, chunked prefill, prefix hits, mixed batches).

    The new tokens' K/V must already be written into the pages (kv_write first).

    Args:
      q: [num_tokens, num_q_heads, head_dim]; sequence b's tokens are q[cu_q_lens[b]:cu_q_lens[b+1]], at
        positions seq_lens[b] - q_len_b + i. Tokens at or past cu_q_lens[-1] are padding (zero output).
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim]; block 0 is the null page.
      block_tables: i32[batch, pages_per_seq].
      seq_lens: i32[batch] context length including the new tokens (0 for padding rows).
      cu_q_lens: i32[batch + 1] query_start_loc, non-decreasing, cu_q_lens[0] = 0.
      scale: softmax scale, default 1/sqrt(head_dim).
      tuning: PrefillTuning; 0 fields are picked from the shapes.
      interpret: run the Pallas interpreter (CPU tests).
    Returns:
      [num_tokens, num_q_heads, head_dim] in q.dtype.
    """
    B = seq_lens.shape[0]
    check_ragged_args(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens)
    T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    Gp = tuning_lib.next_pow2(G)
    scale = default_scale(D) if scale is None else scale
    P = block_tables.shape[1]
    tune = tuning.resolve(Gp, S, P, D, k_pages.dtype.itemsize)
    bq, ppcb = tune.block_q, tune.pages_per_compute_block
    if bq & (bq - 1) or ppcb & (ppcb - 1) or bq * Gp < 16:
        raise ValueError(f"block_q {bq} and pages_per_compute_block {ppcb} must be powers of 2, block_q * Gp >= 16")
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # a chunk may run past P; pads = page 0
    items = work_items(cu_q_lens, seq_lens, block_q=bq, num_items=pl.cdiv(T, bq) + B)
    q4 = jnp.pad(q.reshape(T, Hkv, G, D), ((0, bq), (0, 0), (0, Gp - G), (0, 0)))  # (T + bq, Hkv, Gp, D)
    q_rows = q4.transpose(1, 0, 2, 3).reshape(Hkv, (T + bq) * Gp, D)  # (Hkv, (T + bq) * Gp, D) token-major
    o = _prefill_call(q_rows, k_pages, v_pages, block_tables, items, scale=scale, bq=bq, gp=Gp, tune=tune,
                      interpret=interpret)
    o = o.reshape(Hkv, T + bq, Gp, D)[:, :T, :G].transpose(1, 0, 2, 3).reshape(T, Hq, D)  # (T, Hq, D)
    return jnp.where((jnp.arange(T) < cu_q_lens[-1])[:, None, None], o, jnp.zeros((), o.dtype))
