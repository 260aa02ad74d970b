"""Shared builders for the kernel tests: random paged caches with NaN in every page and slot no sequence owns,
permuted block tables, and a dumb numpy loop oracle independent of the jnp references."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np

# Interpret the kernels on CPU (CI); compile them for real when the tests run on a GPU.
INTERPRET = jax.devices()[0].platform == "cpu"
if not INTERPRET:
    # XLA's GPU default for f32 dots is TF32; the references must be exact f32 to be oracles.
    jax.config.update("jax_default_matmul_precision", "highest")


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [T, Hq, D] flat new tokens (T includes padding tokens)
    k_pages: np.ndarray  # [Hkv, N, S, D], NaN where no sequence owns the slot (page 0 included)
    v_pages: np.ndarray
    block_tables: np.ndarray  # i32[B, P]
    seq_lens: np.ndarray  # i32[B]
    cu_q_lens: np.ndarray  # i32[B + 1]
    token_seq_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]; padding tokens -> slots of block 0


def make_case(rng, *, num_kv_heads, group, head_dim, block_size, ctx_lens, q_lens, dtype=np.float32,
              pad_tokens=0, extra_pages=3, extra_table_cols=1) -> Case:
    """ctx_lens[b] cached tokens + q_lens[b] new tokens per sequence; new tokens' K/V are already in the pages."""
    Hkv, G, D, S = num_kv_heads, group, head_dim, block_size
    seq_lens = np.asarray(ctx_lens, np.int32) + np.asarray(q_lens, np.int32)
    B = len(seq_lens)
    pages_needed = [math.ceil(n / S) for n in seq_lens]
    P = max(max(pages_needed), 1) + extra_table_cols
    N = 1 + sum(pages_needed) + extra_pages
    k = np.full((Hkv, N, S, D), np.nan, np.float32)
    v = np.full((Hkv, N, S, D), np.nan, np.float32)
    free = list(rng.permutation(np.arange(1, N)))
    bt = np.zeros((B, P), np.int32)
    for b in range(B):
        for j in range(pages_needed[b]):
            bt[b, j] = free.pop()
            used = min(S, seq_lens[b] - j * S)
            k[:, bt[b, j], :used] = rng.standard_normal((Hkv, used, D))
            v[:, bt[b, j], :used] = rng.standard_normal((Hkv, used, D))
        for j in range(pages_needed[b], P):  # unused table entries point at NaN pages (null or unowned)
            bt[b, j] = rng.choice([0] + free) if free else 0
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(cu[-1]) + pad_tokens
    seq_ids = np.zeros(T, np.int32)
    pos = np.zeros(T, np.int32)
    slots = rng.integers(0, S, size=T).astype(np.int32)  # padding: somewhere in block 0
    for b in range(B):
        for i in range(q_lens[b]):
            t = cu[b] + i
            seq_ids[t] = b
            pos[t] = ctx_lens[b] + i
            slots[t] = bt[b, pos[t] // S] * S + pos[t] % S
    q = rng.standard_normal((T, Hkv * G, D)).astype(np.float32)
    cast = lambda x: x.astype(dtype)
    return Case(cast(q), cast(k), cast(v), bt, seq_lens, cu, seq_ids, pos, slots)


def numpy_attention(case: Case, scale: float) -> np.ndarray:
    """Token-by-token, key-by-key float64 loop. Returns [T, Hq, D] (zeros for padding tokens)."""
    q = case.q.astype(np.float64)
    k = case.k_pages.astype(np.float64)
    v = case.v_pages.astype(np.float64)
    T, Hq, D = q.shape
    Hkv, _, S, _ = k.shape
    G = Hq // Hkv
    out = np.zeros((T, Hq, D))
    for t in range(int(case.cu_q_lens[-1])):
        b, p = case.token_seq_ids[t], case.positions[t]
        pages = case.block_tables[b, np.arange(p + 1) // S]
        slots = np.arange(p + 1) % S
        for h in range(Hq):
            keys = k[h // G, pages, slots]  # (p+1, D)
            vals = v[h // G, pages, slots]
            logits = keys @ q[t, h] * scale
            w = np.exp(logits - logits.max())
            out[t, h] = (w / w.sum()) @ vals
    return out


def tol(dtype):
    """Stated tolerances: f32 kernels agree with f64 loops to ~1e-5 (interpreted on CPU; compiled on a GPU the
    kernels' f32 dots run on TF32 tensor cores, ~1e-3); bf16 inputs to ~2e-2."""
    if np.dtype(dtype) != np.float32:
        return dict(atol=2e-2, rtol=2e-2)
    return dict(atol=2e-5, rtol=2e-5) if INTERPRET else dict(atol=3e-3, rtol=3e-3)


def decode_case(rng, group, head_dim, block_size, dtype=np.float32, num_kv_heads=2, long_pages=7):
    """One new token per sequence: lengths of 1 token, odd, exactly on block boundaries (S, 4S), one past one,
    a long one, and a padding row (0, last)."""
    S = block_size
    lens = [1, S + 3, S, 4 * S, 2 * S + 1, long_pages * S - 5, 0]
    c = make_case(rng, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=S,
                  ctx_lens=[max(n - 1, 0) for n in lens], q_lens=[1 if n else 0 for n in lens], dtype=dtype)
    q = rng.standard_normal((len(lens), num_kv_heads * group, head_dim)).astype(dtype)
    return q, c


def check_decode(kernel, reference, q, c, dtype, **kwargs):
    """kernel(q, pages, tables, lens, **kwargs) against the jnp reference: dtype kept, no NaN from the NaN-filled
    unused pages, within tol(dtype), exact zeros for the padding row."""
    got = kernel(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, interpret=INTERPRET, **kwargs)
    want = reference(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, scale=kwargs.get("scale"))
    assert got.dtype == q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, **tol(dtype))
    np.testing.assert_array_equal(got[-1], 0.0)  # padding row


# Every GQA ratio x block size for the decode sweeps; head dim and split count alternate to keep CI time down.
DECODE_SWEEP = [(g, s, *((64, 1) if (g + s.bit_length()) % 2 else (128, 3)))
                for g, s in itertools.product([1, 3, 4, 7, 8], [16, 32, 64, 128])]


def mixed_prefill_case(rng, group, head_dim, block_size, dtype=np.float32):
    """Prefill from empty; a prefix hit ending on a block boundary; a chunked continuation at an odd offset; a
    decode row; an empty (padding) row; a prompt ending exactly on a block boundary; 5 padding tokens."""
    S = block_size
    return make_case(rng, num_kv_heads=2, group=group, head_dim=head_dim, block_size=S,
                     ctx_lens=[0, S, S + 3, 2 * S - 1, 0, 0], q_lens=[S + 5, 7, S, 1, 0, 2 * S], dtype=dtype,
                     pad_tokens=5)


def check_prefill(kernel, reference, c, dtype, **kwargs):
    """kernel(q, pages, tables, lens, cu_q_lens, **kwargs) against the jnp reference: dtype kept, no NaN from the
    NaN-filled unused pages, within tol(dtype), exact zeros for the padding tokens."""
    got = kernel(c.q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, c.cu_q_lens, interpret=INTERPRET, **kwargs)
    want = reference(c.q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, c.cu_q_lens, c.token_seq_ids,
                     c.positions, scale=kwargs.get("scale"))
    assert got.dtype == c.q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, **tol(dtype))
    np.testing.assert_array_equal(got[int(c.cu_q_lens[-1]):], 0.0)  # padding tokens
