"""Mosaic GPU paged decode vs the jnp reference.

On CPU the kernel runs in Mosaic GPU's interpreter (which has no wgmma, so the two products run as jnp dots;
the TMA ring, barriers, masks and splits are the kernel's own code) and is lowered to Mosaic GPU IR for an
H100. On a Hopper GPU the same tests run compiled. Tolerance: bf16 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_decode_for_h100
from kernel_cases import DECODE_SWEEP, INTERPRET, check_decode, decode_case
from jaxserve.pallas_kernels import paged_decode_reference
from jaxserve.pallas_kernels.paged_decode_mgpu import MosaicDecodeTuning, paged_decode_mgpu

if not INTERPRET and getattr(jax.devices()[0], "compute_capability", "") != "9.0":
    pytest.skip("Mosaic GPU kernels are Hopper-only", allow_module_level=True)


def _case(rng, group, head_dim, block_size):
    return decode_case(rng, group, head_dim, block_size, jnp.bfloat16, long_pages=9)


def _check(q, c, tuning, scale=None):
    check_decode(paged_decode_mgpu, paged_decode_reference, q, c, jnp.bfloat16, scale=scale, tuning=tuning)


@pytest.mark.parametrize("group,head_dim,block_size,tuning", [
    (1, 64, 16, MosaicDecodeTuning()),
    (3, 128, 32, MosaicDecodeTuning(num_splits=3)),
    (4, 128, 16, MosaicDecodeTuning(num_splits=2, keys_per_step=128, num_stages=2)),
    (7, 64, 64, MosaicDecodeTuning(num_splits=1, num_stages=1)),
    (8, 128, 128, MosaicDecodeTuning(num_splits=4)),  # more splits than most sequences' steps
])
def test_paged_decode_mgpu(group, head_dim, block_size, tuning):
    q, c = _case(np.random.default_rng(group + block_size), group, head_dim, block_size)
    _check(q, c, tuning, scale=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("group,block_size,head_dim,splits", DECODE_SWEEP)
def test_paged_decode_mgpu_sweep(group, block_size, head_dim, splits):
    q, c = _case(np.random.default_rng(0), group, head_dim, block_size)
    _check(q, c, MosaicDecodeTuning(num_splits=splits))


def test_paged_decode_mgpu_errors():
    k = jnp.zeros((2, 5, 16, 64), jnp.bfloat16)
    bt = jnp.zeros((2, 3), jnp.int32)
    lens = jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="bf16/f16"):
        paged_decode_mgpu(jnp.zeros((2, 8, 64)), k.astype(jnp.float32), k.astype(jnp.float32), bt, lens)
    with pytest.raises(ValueError, match="multiple of 64"):
        paged_decode_mgpu(jnp.zeros((2, 4, 64), jnp.bfloat16), k, k, bt, lens,
                          tuning=MosaicDecodeTuning(keys_per_step=48))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 64"):
        k32 = jnp.zeros((2, 5, 16, 32), jnp.bfloat16)
        paged_decode_mgpu(jnp.zeros((2, 4, 32), jnp.bfloat16), k32, k32, bt, lens)


def test_tuning_fits_shared_memory_and_fills_sms():
    t = MosaicDecodeTuning().resolve(1, 8, 128, 16, 128, 2)  # batch 1, ctx 2048: small keys, many splits
    assert t.keys_per_step == 64 and t.num_splits == 16
    t = MosaicDecodeTuning().resolve(256, 8, 128, 16, 128, 2)
    assert t.keys_per_step == 128 and t.num_splits == 1 and t.num_stages == 2  # 4 asked, 2 fit
    assert MosaicDecodeTuning().resolve(8, 8, 128, 16, 128, 2).num_splits == 2
    big = MosaicDecodeTuning(keys_per_step=256, num_stages=8).resolve(1, 8, 128, 128, 128, 2)
    assert big.num_stages * 2 * 256 * 128 * 2 + 64 * 128 * 6 <= 220 * 1024 and big.num_stages >= 1


@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (4, 128, 16), (7, 128, 128)])
def test_paged_decode_mgpu_lowers_for_h100(group, head_dim, block_size):
    assert "mosaic_gpu" in lower_decode_for_h100(paged_decode_mgpu, group, head_dim, block_size)
