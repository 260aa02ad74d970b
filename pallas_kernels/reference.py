"""Pure-jnp paged attention: the oracle for the Pallas kernels and the engine's CPU/XLA path.

Design note. These run under `jit` with static shapes, so they are the attention the engine uses on CPU and
on any GPU without a Pallas backend. Letters: B sequences, T flat tokens, Hq = Hkv * G query heads, D head
dim, N pages in the cache, S block (page) size, P pages per sequence, L = P * S.

- Decode (one query token per sequence) gathers each sequence's pages once, [B, Hkv, L, D]: the same bytes
  any decode kernel must read, so XLA's cost is one extra copy of the live KV.
- Ragged (prefill / mixed) cannot gather per sequence cheaply because tokens of different sequences share
  the flat axis; a per-token gather of the whole context would be [T, L, Hkv, D]. Instead a while loop walks
  the pages `pages_per_iter` at a time with an online softmax, gathering for every token only that chunk of
  its own sequence's pages: live memory [T, Hkv, pages_per_iter * S, D], and the loop stops at the longest
  context in the batch rather than at P.
- Every masked key position has its value zeroed, not only its logit: unused pages and slots may hold
  garbage (NaN in the tests), and 0 * NaN is NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf in running maxima, so exp(m_prev - m_new) is never exp(-inf - -inf) = NaN.
_MIN_FINITE = float(jnp.finfo(jnp.float32).min)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _gather_pages(pages: jax.Array, page_ids: jax.Array) -> jax.Array:
    """pages [Hkv, N, S, D], page_ids i32[...] -> [..., Hkv, S, D]."""
    g = pages[:, page_ids]  # (Hkv, ..., S, D)
    return jnp.moveaxis(g, 0, -3)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_decode_reference(q, k_pages, v_pages, block_tables, seq_lens, scale: float | None = None):
    """One query token per sequence against its pages.

    Args:
      q: [batch, num_q_heads, head_dim].
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim].
      block_tables: i32[batch, pages_per_seq].
      seq_lens: i32[batch] context length including the query token; 0 gives a zero output row.
      scale: softmax scale, default 1/sqrt(head_dim).
    Returns:
      [batch, num_q_heads, head_dim] in q.dtype.
    """
    B, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    P = block_tables.shape[1]
    scale = default_scale(D) if scale is None else scale
    k = _gather_pages(k_pages, block_tables).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, P * S, D)  # (B, Hkv, L, D)
    v = _gather_pages(v_pages, block_tables).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, P * S, D)  # (B, Hkv, L, D)
    valid = jnp.arange(P * S)[None, :] < seq_lens[:, None]  # (B, L)
    v = jnp.where(valid[:, None, :, None], v, jnp.zeros((), v.dtype))
    qg = q.reshape(B, Hkv, G, D)
    s = jnp.einsum("BHGD,BHLD->BHGL", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # seq_len 0: all masked
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BHGL,BHLD->BHGD", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.where(l == 0, 1.0, l)
    return o.reshape(B, Hq, D).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_iter"))
def ragged_attention_reference(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, token_seq_ids, positions,
                               scale: float | None = None, pages_per_iter: int = 8):
    """Causal attention of flat-packed new tokens over their sequences' pages (prefill, chunked, mixed).

    The new tokens' K/V must already be written into the pages. Query token t of sequence b = token_seq_ids[t]
    at absolute position positions[t] attends keys 0..positions[t] of that sequence.

    Args:
      q: [num_tokens, num_q_heads, head_dim].
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim].
      block_tables: i32[batch, pages_per_seq].
      seq_lens: i32[batch] context length including the new tokens.
      cu_q_lens: i32[batch + 1] token offsets of each sequence on the flat axis; tokens at or past
        cu_q_lens[-1] are padding and get zero output.
      token_seq_ids: i32[num_tokens] sequence of each token (any valid row for padding tokens).
      positions: i32[num_tokens] absolute position of each token (seq_lens[b] - q_len_b + i).
      scale: softmax scale, default 1/sqrt(head_dim).
      pages_per_iter: pages gathered per loop iteration (static).
    Returns:
      [num_tokens, num_q_heads, head_dim] in q.dtype.
    """
    T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    P = block_tables.shape[1]
    C = min(pages_per_iter, P)
    scale = default_scale(D) if scale is None else scale
    is_real = jnp.arange(T) < cu_q_lens[-1]  # (T,)
    pos = jnp.where(is_real, positions, -1)  # padding tokens see no key
    tables = jnp.pad(block_tables, ((0, 0), (0, -P % C)))[token_seq_ids]  # (T, P')
    qg = q.reshape(T, Hkv, G, D)
    num_iters = (jnp.max(pos) + 1 + C * S - 1) // (C * S)  # chunks up to the furthest query position

    def body(i, carry):
        m, l, acc = carry  # (T, Hkv, G) x2, (T, Hkv, G, D)
        ids = lax.dynamic_slice_in_dim(tables, i * C, C, axis=1)  # (T, C)
        k = _gather_pages(k_pages, ids).transpose(0, 2, 1, 3, 4).reshape(T, Hkv, C * S, D)  # (T, Hkv, K, D)
        v = _gather_pages(v_pages, ids).transpose(0, 2, 1, 3, 4).reshape(T, Hkv, C * S, D)
        key_pos = i * C * S + jnp.arange(C * S)  # (K,)
        valid = key_pos[None, :] <= pos[:, None]  # (T, K) causal; implies key_pos < seq_len
        v = jnp.where(valid[:, None, :, None], v, jnp.zeros((), v.dtype))
        s = jnp.einsum("THGD,THKD->THGK", qg, k, preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("THGK,THKD->THGD", p.astype(v.dtype), v,
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((T, Hkv, G), _MIN_FINITE, jnp.float32), jnp.zeros((T, Hkv, G), jnp.float32),
            jnp.zeros((T, Hkv, G, D), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_iters, body, init)
    o = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return o.reshape(T, Hq, D).astype(q.dtype)


@jax.jit
def kv_write_reference(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Scatter new tokens' K/V into their cache slots.

    Args:
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim].
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: i32[num_tokens] slot = block * block_size + offset; padding tokens point into block 0.
    Returns:
      (k_pages, v_pages) updated (in place when the caller donates them).
    """
    Hkv, N, S, D = k_pages.shape

    def write(pages, new):
        flat = pages.reshape(Hkv, N * S, D)  # (Hkv, N*S, D): a free view, slots contiguous
        flat = flat.at[:, slot_mapping].set(new.transpose(1, 0, 2).astype(pages.dtype), mode="promise_in_bounds")
        return flat.reshape(Hkv, N, S, D)

    return write(k_pages, k_new), write(v_pages, v_new)
