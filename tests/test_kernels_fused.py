"""The fused small-op kernels of decode steps: rope_kv_write (RoPE + KV write + the decode kernels' q groups) and
add_rms_norm (residual add + RMSNorm), against numpy oracles written from transformers' arithmetic, and the
decode kernels fed rope_kv_write's grouped q. Interpreted on CPU, lowered for an H100 here, compiled on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpu_lowering import lower_for_h100
from kernel_cases import INTERPRET, decode_case
from jaxserve.pallas_kernels import paged_decode, paged_decode_reference
from jaxserve.pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference
from jaxserve.pallas_kernels.paged_decode import decode_group_rows
from jaxserve.pallas_kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference

A = jax.ShapeDtypeStruct
f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


def _round(a, dtype):
    return f32(jnp.asarray(a, dtype))


def _rope_case(rng, T, Hkv, G, D, N, S, dtype):
    qkv = rng.standard_normal((T, Hkv, G + 2, D)).astype(np.float32)
    positions = rng.integers(0, 4000, T)
    inv_freq = (1.0 / 500000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32)
    angles = positions[:, None].astype(np.float32) * inv_freq[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    pages = np.full((Hkv, N, S, D), np.nan, np.float32)  # a stray write or read of an unowned slot shows
    slots = rng.permutation(np.arange(S, N * S))[:T].astype(np.int32)
    slots[-2:] = [0, 3]  # padding tokens -> the null block 0
    return jnp.asarray(qkv, dtype), cos, sin, jnp.asarray(pages, dtype), slots


def _rope_oracle(qkv, cos, sin, pages_k, pages_v, slots, Gp, dtype):
    """Numpy, transformers' rotate_half in f32 and a cast, slot by slot."""
    qkv = f32(qkv)
    T, Hkv, C, D = qkv.shape
    G, h = C - 2, D // 2
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    x1, x2 = qkv[..., :h], qkv[..., h:]
    rot = _round(np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1), dtype)  # (T, Hkv, C, D)
    q = np.zeros((T, Hkv, Gp, D), np.float32)
    q[:, :, :G] = rot[:, :, :G]
    k, v = f32(pages_k).copy(), f32(pages_v).copy()
    S = k.shape[2]
    for t in range(T):
        k[:, slots[t] // S, slots[t] % S] = rot[t, :, G]
        v[:, slots[t] // S, slots[t] % S] = qkv[t, :, G + 1]
    return q, k, v


@pytest.mark.parametrize("Hkv,G,D,S,Gp,dtype", [
    (2, 1, 64, 16, 8, jnp.bfloat16),
    (3, 3, 64, 32, 8, jnp.bfloat16),  # SmolLM2's group, the Mosaic kernel's 8 rows
    (2, 4, 128, 16, 16, jnp.bfloat16),  # Llama-3-8B's group, the Triton kernel's 16 rows
    (1, 7, 128, 128, 8, jnp.float32),  # Qwen2.5-7B's group
    (2, 8, 64, 64, 16, jnp.float32),
])
def test_rope_kv_write_matches_oracle(Hkv, G, D, S, Gp, dtype):
    rng = np.random.default_rng(G * 100 + D)
    qkv, cos, sin, pages, slots = _rope_case(rng, 9, Hkv, G, D, 12, S, dtype)
    q, k, v = rope_kv_write(qkv, cos, sin, pages.copy(), pages.copy(), slots, group_padded=Gp, interpret=INTERPRET)
    want_q, want_k, want_v = _rope_oracle(qkv, cos, sin, pages, pages, slots, Gp, dtype)
    assert q.dtype == dtype and q.shape == (9, Hkv, Gp, D)
    # A fused multiply-add may round x1 * cos - x2 * sin differently from numpy's two roundings: one ulp.
    tol = dict(rtol=2.0 ** -8, atol=1e-6) if dtype == jnp.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f32(q), want_q, **tol)  # zero rows past G included
    # every slot a real token owns; block 0 (padding tokens' writes race there) and unowned slots stay NaN
    np.testing.assert_allclose(f32(k)[:, 1:], want_k[:, 1:], **tol)
    np.testing.assert_array_equal(f32(v)[:, 1:], want_v[:, 1:])
    # the jnp reference (the unfused path's arithmetic) agrees too
    ref = rope_kv_write_reference(qkv, cos, sin, pages, pages, slots, group_padded=Gp)
    np.testing.assert_allclose(f32(ref[0]), want_q, **tol)
    np.testing.assert_allclose(f32(ref[1])[:, 1:], want_k[:, 1:], **tol)


def test_rope_kv_write_errors():
    qkv, cos, sin, pages, slots = _rope_case(np.random.default_rng(0), 4, 2, 4, 64, 8, 16, jnp.float32)
    with pytest.raises(ValueError, match="group_padded"):
        rope_kv_write(qkv, cos, sin, pages, pages, slots, group_padded=2)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_kv_write(qkv, cos[:, :16], sin, pages, pages, slots, group_padded=8)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv_write(qkv, cos, sin, pages, pages, slots[:3], group_padded=8)
    with pytest.raises(ValueError, match="power of 2"):
        rope_kv_write(qkv[..., :48], cos[:, :24], sin[:, :24], pages[..., :48], pages[..., :48], slots,
                      group_padded=8)
    with pytest.raises(ValueError, match="pages"):
        rope_kv_write(qkv, cos, sin, pages[:1], pages[:1], slots, group_padded=8)


def test_rope_kv_write_lowers_for_h100():
    bf = jnp.bfloat16
    text = lower_for_h100(lambda *a: rope_kv_write(*a, group_padded=8), A((4, 8, 6, 128), bf), A((4, 64), jnp.float32),
                          A((4, 64), jnp.float32), A((8, 40, 16, 128), bf), A((8, 40, 16, 128), bf), A((4,), jnp.int32))
    assert "xla.gpu.triton" in text


def _norm_oracle(x, d, w, eps, dtype):
    """transformers' LlamaRMSNorm after a bf16 residual add: the sum rounded, normalised in f32, cast, scaled."""
    s = _round(f32(x) + f32(d), dtype)
    n = _round(s / np.sqrt(np.mean(s.astype(np.float64) ** 2, -1, keepdims=True) + eps), dtype)
    return s, _round(f32(w) * n, dtype)


@pytest.mark.parametrize("T,D,dtype", [(1, 4096, jnp.bfloat16), (5, 256, jnp.bfloat16), (3, 64, jnp.float32)])
def test_add_rms_norm_matches_oracle(T, D, dtype):
    rng = np.random.default_rng(D)
    x, d = (jnp.asarray(rng.standard_normal((T, D)) * 3, dtype) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(D) * 0.1 + 1, dtype)
    s, n = add_rms_norm(x, d, w, eps=1e-5, interpret=INTERPRET)
    want_s, want_n = _norm_oracle(x, d, w, 1e-5, dtype)
    np.testing.assert_array_equal(f32(s), want_s)
    # the mean's summation order may move the normalised value across a rounding boundary: at most one ulp
    ulp = 2.0 ** -7 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(f32(n), want_n, rtol=ulp, atol=1e-6)
    rs, rn = add_rms_norm_reference(x, d, w, eps=1e-5)  # eager: each op rounds to dtype, as transformers does
    np.testing.assert_array_equal(f32(rs), want_s)
    np.testing.assert_allclose(f32(rn), want_n, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("S,T,D", [(4, 1, 4096), (2, 5, 256)])
def test_add_rms_norm_sums_split_k_partials(S, T, D):
    """d as [S, T, D] f32 partials (a split-K GEMV's): summed in f32 and rounded to bf16, as XLA's reduction
    kernel would, then added. On CPU XLA may keep that rounded sum in f32 (excess precision, see
    test_pallas_backend_e2e), so each element of s must equal the oracle with d rounded or with d unrounded."""
    rng = np.random.default_rng(S * D)
    bf = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((T, D)) * 3, bf)
    parts = jnp.asarray(rng.standard_normal((S, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(D) * 0.1 + 1, bf)
    s, n = add_rms_norm(x, parts, w, eps=1e-5, interpret=INTERPRET)
    exact = np.asarray(parts, np.float64).sum(0)
    s_rounded, n_rounded = _norm_oracle(x, _round(exact, bf), w, 1e-5, bf)
    s_unrounded, _ = _norm_oracle(x, exact.astype(np.float32), w, 1e-5, bf)
    got = f32(s)
    assert np.all((got == s_rounded) | (got == s_unrounded))
    assert np.mean(got == s_rounded) > 0.5  # not just x + something: the partials' sum
    np.testing.assert_allclose(f32(n), n_rounded, rtol=2.0 ** -6, atol=2.0 ** -5)
    rs, _ = add_rms_norm_reference(x, parts, w, eps=1e-5)
    np.testing.assert_array_equal(f32(rs), s_rounded)
    with pytest.raises(ValueError, match="partials"):
        add_rms_norm(x, parts[:, :, :D // 2], w, eps=1e-5, interpret=INTERPRET)
    with pytest.raises(ValueError, match="power of 2"):
        add_rms_norm(x, jnp.concatenate([parts, parts[:1]]), w, eps=1e-5, interpret=INTERPRET)


def test_add_rms_norm_errors_and_lowering():
    x = jnp.zeros((2, 576), jnp.bfloat16)  # SmolLM2's hidden size: not one vector, XLA's pair serves it
    with pytest.raises(ValueError, match="power of 2"):
        add_rms_norm(x, x, jnp.zeros(576, jnp.bfloat16), eps=1e-5)
    with pytest.raises(ValueError, match="w"):
        add_rms_norm(x[:, :512], x[:, :512], jnp.zeros(256, jnp.bfloat16), eps=1e-5)
    bf = jnp.bfloat16
    assert "xla.gpu.triton" in lower_for_h100(lambda *a: add_rms_norm(*a, eps=1e-5), A((4, 4096), bf),
                                              A((4, 4096), bf), A((4096,), bf))


@pytest.mark.parametrize("mosaic", [False, True])
def test_decode_kernels_take_grouped_q(mosaic):
    """rope_kv_write's q ([B, Hkv, Gp, D], zero rows past G) in the decode kernels equals their plain q."""
    if mosaic and not INTERPRET and getattr(jax.devices()[0], "compute_capability", "") != "9.0":
        pytest.skip("Mosaic GPU kernels are Hopper-only")
    from jaxserve.pallas_kernels import paged_decode_mgpu as mgpu
    G = 3
    q, c = decode_case(np.random.default_rng(5), G, 64, 16, jnp.bfloat16)
    kernel, rows = (mgpu.paged_decode_mgpu, mgpu.decode_group_rows(G)) if mosaic else (paged_decode,
                                                                                       decode_group_rows(G))
    B, Hq, D = q.shape
    q4 = jnp.pad(jnp.asarray(q).reshape(B, 2, G, D), ((0, 0), (0, 0), (0, rows - G), (0, 0)))
    args = (c.k_pages, c.v_pages, c.block_tables, c.seq_lens)
    got = kernel(q4, *args, group=G, interpret=INTERPRET)
    plain = kernel(q, *args, interpret=INTERPRET)
    np.testing.assert_array_equal(f32(got), f32(plain))
    want = paged_decode_reference(q, *args)
    np.testing.assert_allclose(f32(got), f32(want), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="grouped q"):
        kernel(q4[:, :, :G], *args, group=G, interpret=INTERPRET)
