"""Pallas paged decode (interpret mode on CPU) vs the jnp reference; tolerance f32 2e-5, bf16 2e-2."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_for_h100
from kernel_cases import INTERPRET, make_case, tol
from jaxserve.pallas_kernels import DecodeTuning, paged_decode, paged_decode_reference


def _decode_case(rng, group, head_dim, block_size, dtype=np.float32, num_kv_heads=2):
    S = block_size
    # 1 token, odd, exactly on block boundaries (S, 4S), one past one, a long one, and a padding row (0)
    lens = [1, S + 3, S, 4 * S, 2 * S + 1, 7 * S - 5, 0]
    c = make_case(rng, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=S,
                  ctx_lens=[max(n - 1, 0) for n in lens], q_lens=[1 if n else 0 for n in lens], dtype=dtype)
    q = rng.standard_normal((len(lens), num_kv_heads * group, head_dim)).astype(dtype)
    return q, c


def _check(q, c, tuning, dtype=np.float32, scale=None):
    got = paged_decode(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, scale=scale, tuning=tuning,
                       interpret=INTERPRET)
    want = paged_decode_reference(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, scale=scale)
    assert got.dtype == q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, **tol(dtype))
    np.testing.assert_array_equal(got[-1], 0.0)  # padding row


@pytest.mark.parametrize("group,head_dim,block_size,tuning", [
    (1, 64, 16, DecodeTuning()),
    (3, 128, 32, DecodeTuning(num_splits=3, pages_per_compute_block=1)),
    (4, 64, 16, DecodeTuning(num_splits=4, pages_per_compute_block=2)),
    (7, 64, 64, DecodeTuning(num_splits=2)),
    (8, 128, 128, DecodeTuning(num_splits=1)),
    (8, 64, 16, DecodeTuning(num_splits=5, pages_per_compute_block=4)),  # more splits than some seqs' chunks
])
def test_paged_decode(group, head_dim, block_size, tuning):
    q, c = _decode_case(np.random.default_rng(group + block_size), group, head_dim, block_size)
    _check(q, c, tuning, scale=0.2)


def test_paged_decode_bf16():
    q, c = _decode_case(np.random.default_rng(1), 4, 128, 16, dtype=jnp.bfloat16)
    _check(q, c, DecodeTuning(num_splits=2), dtype=jnp.bfloat16)


def test_paged_decode_errors():
    q = jnp.zeros((2, 8, 64))
    k = jnp.zeros((2, 5, 16, 64))
    bt = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode(jnp.zeros((2, 7, 64)), k, k, bt, lens, interpret=INTERPRET)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode(jnp.zeros((2, 8, 32)), k, k, bt, lens, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode(q, k, k, bt.astype(jnp.float32), lens, interpret=INTERPRET)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode(q, k, k, bt, jnp.ones((3,), jnp.int32), interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of 2"):
        paged_decode(q, jnp.zeros((2, 5, 24, 64)), jnp.zeros((2, 5, 24, 64)), bt, lens, interpret=INTERPRET)


@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (7, 128, 128)])
def test_paged_decode_lowers_to_triton(group, head_dim, block_size):
    A = jax.ShapeDtypeStruct
    q = A((3, 2 * group, head_dim), jnp.bfloat16)
    k = A((2, 40, block_size, head_dim), jnp.bfloat16)
    text = lower_for_h100(paged_decode, q, k, k, A((3, 9), jnp.int32), A((3,), jnp.int32))
    assert "xla.gpu.triton" in text


@pytest.mark.slow
@pytest.mark.parametrize("group,block_size", list(itertools.product([1, 3, 4, 7, 8], [16, 32, 64, 128])))
def test_paged_decode_sweep(group, block_size):
    # every GQA ratio x block size; head dim and split count alternate to keep CI time down
    head_dim, splits = (64, 1) if (group + block_size.bit_length()) % 2 else (128, 3)
    q, c = _decode_case(np.random.default_rng(0), group, head_dim, block_size)
    _check(q, c, DecodeTuning(num_splits=splits))
