"""pure-jnp references (the engine's CPU/XLA attention) vs a float64 numpy loop."""

import numpy as np
import pytest
import jax.numpy as jnp

from kernel_cases import make_case, numpy_attention, tol
from jaxserve.pallas_kernels import reference as ref

# (group, head_dim, block_size): GQA 1/3/4/7/8, head dims 64/128, block sizes 16..128.
SHAPES = [(1, 64, 16), (3, 128, 32), (4, 64, 64), (7, 64, 128), (8, 128, 16)]


@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
def test_decode_reference_vs_numpy(group, head_dim, block_size):
    rng = np.random.default_rng(group * 1000 + block_size)
    S = block_size
    # context lengths: 1, odd, exactly on a block boundary, one past it, and a padding row (seq_len 0)
    ctx = [0, 2 * S - 1, S - 1, 3 * S - 2, 5]
    c = make_case(rng, num_kv_heads=2, group=group, head_dim=head_dim, block_size=S, ctx_lens=ctx + [0],
                  q_lens=[1] * len(ctx) + [0])
    scale = 0.3
    q = np.zeros((len(ctx) + 1, c.q.shape[1], head_dim), np.float32)
    q[:len(ctx)] = c.q
    got = ref.paged_decode_reference(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, scale=scale)
    want = numpy_attention(c, scale)
    np.testing.assert_allclose(np.asarray(got)[:len(ctx)], want, **tol(np.float32))
    np.testing.assert_array_equal(np.asarray(got)[-1], 0.0)  # seq_len 0 row: zeros, not NaN


@pytest.mark.parametrize("group,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("pages_per_iter", [1, 3])
def test_ragged_reference_vs_numpy(group, head_dim, block_size, pages_per_iter):
    rng = np.random.default_rng(group * 7 + block_size + pages_per_iter)
    S = block_size
    # prefill from empty, prefix hit ending on a block boundary, chunked continuation, decode row, odd lengths
    c = make_case(rng, num_kv_heads=2, group=group, head_dim=head_dim, block_size=S,
                  ctx_lens=[0, S, 2 * S + 3, 7, 0], q_lens=[S + 5, 3, S, 1, 2 * S], pad_tokens=3)
    got = ref.ragged_attention_reference(c.q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, c.cu_q_lens,
                                         c.token_seq_ids, c.positions, pages_per_iter=pages_per_iter)
    want = numpy_attention(c, 1 / np.sqrt(head_dim))
    np.testing.assert_allclose(np.asarray(got), want, **tol(np.float32))


def test_references_bf16():
    rng = np.random.default_rng(5)
    c = make_case(rng, num_kv_heads=2, group=4, head_dim=64, block_size=16, ctx_lens=[0, 20], q_lens=[17, 1],
                  dtype=jnp.bfloat16)
    got = ref.ragged_attention_reference(c.q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, c.cu_q_lens,
                                         c.token_seq_ids, c.positions)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_attention(c, 0.125), **tol(jnp.bfloat16))


def test_kv_write_reference_vs_numpy():
    rng = np.random.default_rng(0)
    Hkv, N, S, D, T = 2, 7, 16, 64, 11
    k = rng.standard_normal((Hkv, N, S, D)).astype(np.float32)
    v = rng.standard_normal((Hkv, N, S, D)).astype(np.float32)
    k_new = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    v_new = rng.standard_normal((T, Hkv, D)).astype(np.float32)
    slots = rng.permutation(np.arange(S, N * S))[:T].astype(np.int32)
    slots[-2:] = [0, 3]  # padding tokens land in the null block
    got_k, got_v = ref.kv_write_reference(k, v, k_new, v_new, slots)
    want_k, want_v = k.copy(), v.copy()
    for t in range(T - 2):
        want_k[:, slots[t] // S, slots[t] % S] = k_new[t]
        want_v[:, slots[t] // S, slots[t] % S] = v_new[t]
    got_k, got_v = np.asarray(got_k), np.asarray(got_v)
    np.testing.assert_array_equal(got_k[:, 1:], want_k[:, 1:])  # block 0 content is unspecified
    np.testing.assert_array_equal(got_v[:, 1:], want_v[:, 1:])
