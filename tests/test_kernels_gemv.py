"""The skinny-matmul kernel (pallas_kernels/gemv.py) against numpy products, interpreted on CPU and lowered for an
H100 here (compiled and timed on a GPU by scripts/bench_gemv.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_for_h100
from jaxserve.pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference
from jaxserve.pallas_kernels.gemv import MAX_TOKENS, GemvTuning, gemv, gemv_reference

A = jax.ShapeDtypeStruct
f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


def _effective_x(x, w, silu_gate):
    """float64 numpy [T, K]: x, or silu(gate) * up rounded to w's dtype (as the unfused model stores it)."""
    x = np.asarray(x, np.float64)
    if silu_gate:
        g, u = x[:, 0], x[:, 1]
        x = f32(jnp.asarray(g / (1 + np.exp(-g)) * u, w.dtype)).astype(np.float64)
    return x


@pytest.mark.parametrize("T,splits,silu_gate,dtype", [
    (1, 1, False, jnp.bfloat16), (5, 1, True, jnp.bfloat16), (16, 4, True, jnp.bfloat16), (5, 2, False, jnp.float32)])
def test_gemv_matches_numpy(T, splits, silu_gate, dtype):
    rng = np.random.default_rng(T * 10 + splits)
    K, N = 512, 192
    x = jnp.asarray(rng.standard_normal((T, 2, K) if silu_gate else (T, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) * K ** -0.5, dtype)
    tune = GemvTuning(block_n=64, block_k=64, splits=splits)
    got = gemv(x, w, tuning=tune, silu_gate=silu_gate, interpret=True)
    xe, w64 = _effective_x(x, w, silu_gate), np.asarray(w, np.float64)
    want = xe @ w64
    if splits == 1:
        assert got.shape == (T, N) and got.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 2 ** -7 * np.abs(want).max()  # one bf16 rounding of the output
    else:  # f32 partials: partial s is the product of K chunk s
        assert got.shape == (splits, T, N) and got.dtype == jnp.float32
        tol = 1e-3 if dtype == jnp.bfloat16 else 1e-5
        for s, chunk in enumerate(np.split(np.arange(K), splits)):
            np.testing.assert_allclose(f32(got[s]), xe[:, chunk] @ w64[chunk], atol=tol, rtol=0)
        got = np.sum(f32(got), axis=0)
    np.testing.assert_allclose(f32(got), want, atol=tol, rtol=0)
    ref = gemv_reference(x, w, splits=splits, silu_gate=silu_gate)  # the jnp reference keeps the same contract
    np.testing.assert_allclose(f32(ref if splits == 1 else np.sum(f32(ref), 0)), want, atol=tol, rtol=0)


def test_partials_feed_add_rms_norm():
    """What the model does with the o and down projections: add_rms_norm sums the partials, rounds the sum to the
    stream's dtype and adds it, as if XLA had reduced them first."""
    rng = np.random.default_rng(0)
    K, D = 256, 128
    x = jnp.asarray(rng.standard_normal((8, D)), jnp.bfloat16)
    a = jnp.asarray(rng.standard_normal((8, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((K, D)) * K ** -0.5, jnp.bfloat16)
    nw = jnp.asarray(rng.standard_normal(D), jnp.bfloat16)
    parts = gemv(a, w, tuning=GemvTuning(block_n=64, block_k=64, splits=4), interpret=True)
    s, n = add_rms_norm(x, parts, nw, eps=1e-5, interpret=True)
    d = jnp.asarray(np.asarray(a, np.float64) @ np.asarray(w, np.float64), jnp.bfloat16)  # the product, rounded once
    s_ref, n_ref = add_rms_norm_reference(x, d, nw, eps=1e-5)
    assert np.array_equal(f32(s), f32(s_ref))
    np.testing.assert_allclose(f32(n), f32(n_ref), atol=2e-2)


def test_bad_shapes_raise():
    x, w = jnp.zeros((MAX_TOKENS + 1, 256), jnp.bfloat16), jnp.zeros((256, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        gemv(x, w, interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        gemv(x[:8], w, tuning=GemvTuning(block_n=96), interpret=True)
    with pytest.raises(ValueError, match="does not tile"):
        gemv(x[:8], w, tuning=GemvTuning(block_n=64, block_k=128, splits=4), interpret=True)  # K chunk 64 < 128
    with pytest.raises(ValueError, match=r"want x \[T, 2, K\]"):
        gemv(x[:8], w, silu_gate=True, interpret=True)


@pytest.mark.parametrize("K,N,tune,silu_gate", [
    (4096, 6144, GemvTuning(block_n=64, block_k=256, num_warps=8, num_stages=4), False),  # QKV, best on the H100
    (4096, 4096, GemvTuning(block_n=64, block_k=64, splits=4, num_warps=8, num_stages=4), False),  # o
    (14336, 4096, GemvTuning(block_n=256, block_k=64, splits=8, num_warps=2), True),  # down, reading gate/up
    (576, 1728, GemvTuning(block_n=64, block_k=64), False),  # SmolLM2 QKV (N not a power of 2)
])
def test_lowers_for_h100(K, N, tune, silu_gate):
    x = A((8, 2, K) if silu_gate else (8, K), jnp.bfloat16)
    text = lower_for_h100(lambda x, w: gemv(x, w, tuning=tune, silu_gate=silu_gate), x, A((K, N), jnp.bfloat16))
    assert "gemv" in text
