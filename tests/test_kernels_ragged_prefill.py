"""Pallas ragged prefill (interpret mode on CPU) vs the jnp reference; tolerance f32 2e-5, bf16 2e-2."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_for_h100
from kernel_cases import INTERPRET, check_prefill, mixed_prefill_case
from jaxserve.pallas_kernels import PrefillTuning, ragged_attention_reference, ragged_prefill
from jaxserve.pallas_kernels.ragged_prefill import work_items


def _mixed_case(rng, group, head_dim, block_size, dtype=np.float32):
    return mixed_prefill_case(rng, group, head_dim, block_size, dtype)


def _check(c, tuning, dtype=np.float32, scale=None):
    check_prefill(ragged_prefill, ragged_attention_reference, c, dtype, scale=scale, tuning=tuning)


@pytest.mark.parametrize("group,head_dim,block_size,tuning", [
    (1, 64, 16, PrefillTuning(block_q=16, pages_per_compute_block=2)),
    (3, 128, 32, PrefillTuning(block_q=4, pages_per_compute_block=1)),
    (4, 64, 64, PrefillTuning(block_q=8)),
    (7, 64, 16, PrefillTuning(block_q=2, pages_per_compute_block=4)),
    (8, 128, 128, PrefillTuning(block_q=4)),
])
def test_ragged_prefill(group, head_dim, block_size, tuning):
    c = _mixed_case(np.random.default_rng(group * 3 + block_size), group, head_dim, block_size)
    _check(c, tuning, scale=0.15)


def test_ragged_prefill_bf16_default_tuning():
    c = _mixed_case(np.random.default_rng(2), 4, 64, 16, dtype=jnp.bfloat16)
    _check(c, PrefillTuning(), dtype=jnp.bfloat16)


def test_work_items():
    cu = jnp.array([0, 5, 5, 6, 15], jnp.int32)  # q lens 5, 0, 1, 9
    seq_lens = jnp.array([5, 0, 10, 20], jnp.int32)
    seq, q0, nq, pos0 = (np.asarray(x) for x in work_items(cu, seq_lens, block_q=4, num_items=8))
    np.testing.assert_array_equal(seq[:6], [0, 0, 2, 3, 3, 3])
    np.testing.assert_array_equal(q0[:6], [0, 4, 5, 6, 10, 14])
    np.testing.assert_array_equal(nq, [4, 1, 1, 4, 4, 1, 0, 0])
    np.testing.assert_array_equal(pos0[:6], [0, 4, 9, 11, 15, 19])


def test_ragged_prefill_errors():
    q = jnp.zeros((6, 8, 64))
    k = jnp.zeros((2, 5, 16, 64))
    bt = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="cu_q_lens"):
        ragged_prefill(q, k, k, bt, lens, jnp.zeros((2,), jnp.int32), interpret=INTERPRET)
    with pytest.raises(ValueError, match="multiple"):
        ragged_prefill(jnp.zeros((6, 5, 64)), k, k, bt, lens, jnp.zeros((3,), jnp.int32), interpret=INTERPRET)
    with pytest.raises(ValueError, match="powers of 2"):
        ragged_prefill(q, k, k, bt, lens, jnp.zeros((3,), jnp.int32), tuning=PrefillTuning(block_q=3),
                       interpret=INTERPRET)


@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (3, 128, 128), (8, 128, 16)])
def test_ragged_prefill_lowers_to_triton(group, head_dim, block_size):
    A = jax.ShapeDtypeStruct
    q = A((100, 2 * group, head_dim), jnp.bfloat16)
    k = A((2, 40, block_size, head_dim), jnp.bfloat16)
    text = lower_for_h100(ragged_prefill, q, k, k, A((5, 9), jnp.int32), A((5,), jnp.int32), A((6,), jnp.int32))
    assert "xla.gpu.triton" in text


@pytest.mark.slow
@pytest.mark.parametrize("group,block_size", list(itertools.product([1, 3, 4, 7, 8], [16, 32, 64, 128])))
def test_ragged_prefill_sweep(group, block_size):
    head_dim = 64 if (group + block_size.bit_length()) % 2 else 128  # alternate to keep CI time down
    _check(_mixed_case(np.random.default_rng(0), group, head_dim, block_size), PrefillTuning())
