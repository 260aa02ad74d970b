"""Pallas paged decode (interpret mode on CPU) vs the jnp reference; tolerance f32 2e-5, bf16 2e-2."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_decode_for_h100
from kernel_cases import DECODE_SWEEP, INTERPRET, check_decode, decode_case
from jaxserve.pallas_kernels import DecodeTuning, paged_decode, paged_decode_reference


def _decode_case(rng, group, head_dim, block_size, dtype=np.float32):
    return decode_case(rng, group, head_dim, block_size, dtype)


def _check(q, c, tuning, dtype=np.float32, scale=None):
    check_decode(paged_decode, paged_decode_reference, q, c, dtype, scale=scale, tuning=tuning)


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
    assert "xla.gpu.triton" in lower_decode_for_h100(paged_decode, group, head_dim, block_size)


@pytest.mark.slow
@pytest.mark.parametrize("group,block_size,head_dim,splits", DECODE_SWEEP)
def test_paged_decode_sweep(group, block_size, head_dim, splits):
    q, c = _decode_case(np.random.default_rng(0), group, head_dim, block_size)
    _check(q, c, DecodeTuning(num_splits=splits))
