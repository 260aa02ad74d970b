"""Mosaic GPU paged decode vs the jnp reference.

On CPU the kernel runs in Mosaic GPU's interpreter (which has no wgmma, so the two products run as jnp dots;
the TMA ring, barriers, masks and splits are the kernel's own code) and is lowered to Mosaic GPU IR for an
H100. On a Hopper GPU the same tests run compiled. Tolerance: bf16 2e-2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_decode_for_h100
from kernel_cases import DECODE_SWEEP, INTERPRET, check_decode, decode_case
from jaxserve.pallas_kernels import paged_decode_reference
from jaxserve.pallas_kernels.paged_decode_mgpu import MosaicDecodeTuning, paged_decode_mgpu, work_starts

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


# The persistent kernel: 7 sequences x 2 kv heads = 14 items (one a padding row) over 1 worker (the ring runs
# across every item boundary), 3 workers (runs of 4-5 items) and 50 asked (capped to one worker per item).
@pytest.mark.parametrize("group,head_dim,block_size,tuning", [
    (4, 128, 16, MosaicDecodeTuning(workers=3, keys_per_step=64, num_stages=2)),
    (3, 64, 32, MosaicDecodeTuning(workers=1)),
    (1, 64, 16, MosaicDecodeTuning(workers=50, num_stages=1)),
    (7, 128, 64, MosaicDecodeTuning(workers=2, keys_per_step=128, num_stages=3)),
    (8, 64, 128, MosaicDecodeTuning(workers=-1)),
])
def test_paged_decode_mgpu_persistent(group, head_dim, block_size, tuning):
    q, c = _case(np.random.default_rng(group + block_size), group, head_dim, block_size)
    _check(q, c, tuning, scale=0.2)


def test_paged_decode_mgpu_persistent_skips_empty_rows():
    """Padding rows (length 0) between and after real ones: the copy cursor steps over their items (they have
    no pages to copy) without losing its place, and their outputs are zeros."""
    from kernel_cases import make_case
    lens = [0, 37, 0, 0, 16, 5, 0, 70, 0]
    rng = np.random.default_rng(5)
    c = make_case(rng, num_kv_heads=2, group=4, head_dim=64, block_size=16, ctx_lens=[max(n - 1, 0) for n in lens],
                  q_lens=[1 if n else 0 for n in lens], dtype=jnp.bfloat16)
    q = rng.standard_normal((len(lens), 8, 64)).astype(jnp.bfloat16)
    for workers in (1, 2, 5):
        got = paged_decode_mgpu(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, interpret=INTERPRET,
                                tuning=MosaicDecodeTuning(workers=workers, keys_per_step=64, num_stages=2))
        want = paged_decode_reference(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
        np.testing.assert_array_equal(got[np.asarray(lens) == 0], 0.0)


def test_paged_decode_mgpu_persistent_worker_with_no_items():
    """One long sequence outweighs a worker's share: the cut points fall inside its item, so a worker's run is
    empty (start == end). That worker stores nothing and the others' outputs are complete."""
    from kernel_cases import make_case
    rng = np.random.default_rng(9)
    c = make_case(rng, num_kv_heads=1, group=4, head_dim=64, block_size=16, ctx_lens=[299, 0, 0], q_lens=[1, 1, 1],
                  dtype=jnp.bfloat16)
    q = rng.standard_normal((3, 4, 64)).astype(jnp.bfloat16)
    starts = np.asarray(work_starts(c.seq_lens, 1, 64, 3))
    assert (np.diff(starts) == 0).any()  # the case this test is for
    got = paged_decode_mgpu(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens, interpret=INTERPRET,
                            tuning=MosaicDecodeTuning(workers=3, keys_per_step=64, num_stages=2))
    want = paged_decode_reference(q, c.k_pages, c.v_pages, c.block_tables, c.seq_lens)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_tuning_halves_keys_where_one_stage_does_not_fit():
    """head_dim 256 at 128 keys: one ring stage + the fixed tiles pass the shared-memory budget, so the automatic
    key count halves; an explicit one that cannot fit, and a block size that forbids fewer keys, are errors."""
    from jaxserve.pallas_kernels import paged_decode_mgpu as pm
    for workers in (0, -1):
        t = MosaicDecodeTuning(workers=workers).resolve(256, 8, 128, 16, 256, 2)
        assert t.keys_per_step == 64
        assert pm._smem_bytes(64, t.num_stages, 256, 2, bool(workers)) <= pm._SMEM_BUDGET
    with pytest.raises(ValueError, match="does not fit shared memory"):
        MosaicDecodeTuning(keys_per_step=128).resolve(256, 8, 128, 16, 256, 2)
    k = jnp.zeros((2, 5, 128, 256), jnp.bfloat16)
    assert not pm.supports(jnp.zeros((2, 4, 256), jnp.bfloat16), k)  # block 128 needs 128 keys: the Triton kernel
    assert pm.supports(jnp.zeros((2, 4, 256), jnp.bfloat16), jnp.zeros((2, 5, 16, 256), jnp.bfloat16))


def test_work_starts_balances_steps():
    """Against a hand loop: item i (sequence i // Hkv) costs steps + 1 and goes to the worker whose share of the
    total its running cost starts in; every item is taken once, in order."""
    lens = np.array([1, 300, 0, 129, 2048, 64, 65, 0], np.int32)
    Hkv, T = 3, 64
    cost = np.repeat(-(-lens // T) + 1, Hkv)
    total, before = cost.sum(), np.cumsum(cost) - cost
    for W in (1, 2, 5, 24, 40):
        got = np.asarray(work_starts(jnp.asarray(lens), Hkv, T, W))
        owner = [min(w for w in range(W) if before[i] < (w + 1) * total // W) for i in range(len(cost))]
        want = [sum(1 for o in owner if o < w) for w in range(W + 1)]
        np.testing.assert_array_equal(got, want)
        assert got[0] == 0 and got[-1] == len(cost) and (np.diff(got) >= 0).all()


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
    p = MosaicDecodeTuning(workers=-1, num_splits=4).resolve(256, 8, 128, 16, 128, 2)
    assert (p.num_splits, p.keys_per_step, p.num_stages) == (1, 128, 2)  # 2 x 64 KiB ring + 64 KiB
    from jaxserve.pallas_kernels.paged_decode_mgpu import _num_sms
    assert p.workers == _num_sms()  # one per SM (132 on an H100; the CPU stand-in says 132 too)
    assert MosaicDecodeTuning(workers=-1).resolve(3, 2, 9, 16, 64, 2).workers == 6  # no more workers than items


@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (4, 128, 16), (7, 128, 128), (4, 256, 16)])
def test_paged_decode_mgpu_lowers_for_h100(group, head_dim, block_size):
    assert "mosaic_gpu" in lower_decode_for_h100(paged_decode_mgpu, group, head_dim, block_size)
    persistent = functools.partial(paged_decode_mgpu, tuning=MosaicDecodeTuning(workers=-1))
    assert "mosaic_gpu" in lower_decode_for_h100(persistent, group, head_dim, block_size)
