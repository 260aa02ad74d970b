"""kv_write (XLA scatter), kv_write_pallas (interpret mode on CPU, compiled on a GPU) and kv_write_triton (GPU
with jax_triton only) agree exactly with kv_write_reference on every slot they own; unowned slots stay NaN."""

import jax
import jax.numpy as jnp
import numpy as np
from kernel_cases import INTERPRET
import pytest

from gpu_lowering import lower_for_h100
from jaxserve.pallas_kernels import kv_write, kv_write_pallas, kv_write_reference
from jaxserve.pallas_kernels import kv_write_triton as kvt
from jaxserve.pallas_kernels.select import kv_write_backend

ON_GPU = jax.default_backend() == "gpu"
needs_triton = pytest.mark.skipif(not kvt.triton_available(), reason="needs a GPU with triton and jax_triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_write_pallas_matches_xla(dtype):
    rng = np.random.default_rng(0)
    Hkv, N, S, D, T = 2, 6, 16, 64, 12
    k = jnp.asarray(rng.standard_normal((Hkv, N, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((Hkv, N, S, D)), dtype)
    k_new = jnp.asarray(rng.standard_normal((T, Hkv, D)), dtype)
    v_new = jnp.asarray(rng.standard_normal((T, Hkv, D)), dtype)
    slots = rng.permutation(np.arange(S, N * S))[:T].astype(np.int32)
    slots[-3:] = [0, 0, 5]  # padding tokens -> null block
    want_k, want_v = kv_write(k, v, k_new, v_new, slots)
    got_k, got_v = kv_write_pallas(k.copy(), v.copy(), k_new, v_new, slots, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(got_k[:, 1:]), np.asarray(want_k[:, 1:]))
    np.testing.assert_array_equal(np.asarray(got_v[:, 1:]), np.asarray(want_v[:, 1:]))
    np.testing.assert_array_equal(np.asarray(want_k[:, slots[0] // S, slots[0] % S]), np.asarray(k_new[0]))


def test_kv_write_errors():
    k = jnp.zeros((2, 4, 16, 64))
    with pytest.raises(ValueError, match="k_new"):
        kv_write(k, k, jnp.zeros((3, 2, 32)), jnp.zeros((3, 2, 32)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write(k, k, jnp.zeros((3, 2, 64)), jnp.zeros((3, 2, 64)), jnp.zeros((3,), jnp.float32))


def test_kv_write_pallas_lowers_to_triton():
    A = jax.ShapeDtypeStruct
    pages = A((8, 50, 16, 128), jnp.bfloat16)
    new = A((33, 8, 128), jnp.bfloat16)
    assert "xla.gpu.triton" in lower_for_h100(kv_write_pallas, pages, pages, new, new, A((33,), jnp.int32))


IMPLS = {
    "pallas": lambda *a: kv_write_pallas(*a, interpret=INTERPRET),
    "triton": kvt.kv_write_triton,
    "triton_bt16": lambda *a: kvt.kv_write_triton(*a, block_tokens=16),  # 3 programs a head, the last partial
}
_IMPL_PARAMS = [pytest.param(name, marks=[pytest.mark.gpu, needs_triton] if name.startswith("triton") else [])
                for name in IMPLS]


def _nan_case(rng, dtype, D, Hkv=2, N=9, S=16, T=37, pad=5):
    """NaN pages; T - pad tokens to distinct slots outside the null block, then `pad` padding tokens -> slot 0."""
    k = jnp.full((Hkv, N, S, D), jnp.nan, dtype)
    v = jnp.full((Hkv, N, S, D), jnp.nan, dtype)
    k_new = jnp.asarray(rng.standard_normal((T, Hkv, D)), dtype)
    v_new = jnp.asarray(rng.standard_normal((T, Hkv, D)), dtype)
    slots = rng.permutation(np.arange(S, N * S))[:T].astype(np.int32)
    slots[T - pad:] = 0
    return k, v, k_new, v_new, jnp.asarray(slots)


@pytest.mark.parametrize("impl", _IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kv_write_matches_reference_nan_pages(impl, dtype, D):
    rng = np.random.default_rng(D)
    k, v, k_new, v_new, slots = _nan_case(rng, dtype, D)
    Hkv, N, S, _ = k.shape
    slots_np = np.asarray(slots)
    pad = int(np.sum(slots_np == 0))
    want = kv_write_reference(k, v, k_new, v_new, slots)
    got = IMPLS[impl](k.copy(), v.copy(), k_new, v_new, slots)  # copies: the kernels donate the cache
    for g, w, new in zip(got, want, (k_new, v_new)):
        g, w, new = (np.asarray(x.astype(jnp.float32)) for x in (g, w, new))
        np.testing.assert_array_equal(g[:, 1:], w[:, 1:])  # written rows, and NaN wherever nothing was written
        np.testing.assert_array_equal(g.reshape(Hkv, N * S, D)[:, slots_np[:-pad]], new[:-pad].transpose(1, 0, 2))
        assert np.isnan(g[:, 0, 1:]).all()  # null block: only slot 0 was written ...
        # ... by the padding tokens, which race: each element comes from one of them (on a GPU the racing
        # programs' stores interleave, so the row may mix them; seen on the H100 with the Pallas write)
        pads = new[np.flatnonzero(slots_np == 0)]  # (n_pad, Hkv, D)
        assert (g[None, :, 0, 0] == pads).any(axis=0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="buffer donation is only checked on a GPU")
@pytest.mark.parametrize("impl", _IMPL_PARAMS[:2])
def test_kv_write_in_place(impl):
    """Donated and aliased: the returned caches are the argument buffers, not copies."""
    k, v, k_new, v_new, slots = _nan_case(np.random.default_rng(1), jnp.bfloat16, 128)
    ptrs = (k.unsafe_buffer_pointer(), v.unsafe_buffer_pointer())
    got = IMPLS[impl](k, v, k_new, v_new, slots)
    assert (got[0].unsafe_buffer_pointer(), got[1].unsafe_buffer_pointer()) == ptrs


def test_kv_write_triton_without_triton():
    """The module imports everywhere; off a GPU triton_available() is False and calls fail with a clear error
    (shape errors first, as kv_write's)."""
    if not ON_GPU:
        assert not kvt.triton_available()
    k = jnp.zeros((2, 4, 16, 64))
    with pytest.raises(ValueError, match="k_new"):
        kvt.kv_write_triton(k, k, jnp.zeros((3, 2, 32)), jnp.zeros((3, 2, 32)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        kvt.kv_write_triton(k, k, jnp.zeros((3, 2, 64)), jnp.zeros((3, 2, 64)), jnp.zeros((3,), jnp.float32))
    if not kvt.triton_available():
        with pytest.raises(RuntimeError, match="jax_triton"):
            kvt.kv_write_triton(k, k.copy(), jnp.zeros((3, 2, 64)), jnp.zeros((3, 2, 64)), jnp.zeros((3,), jnp.int32))


def test_kv_write_triton_launch_config():
    # Llama-3-8B (8 kv heads, d=128): >= 512 programs while tokens allow, 8 elements a thread, at most 8 warps.
    assert [kvt.launch_config(T, 8, 128) for T in (1, 64, 256, 2048, 8192)] == [
        (1, 1), (1, 1), (4, 2), (16, 8), (64, 8)]
    assert kvt.launch_config(8192, 8, 128, block_tokens=4) == (4, 2)
    assert kvt.launch_config(100, 2, 80, block_tokens=16) == (16, 8)  # d=80 runs as 128, masked
    with pytest.raises(ValueError, match="power of 2"):
        kvt.launch_config(64, 8, 128, block_tokens=12)


def test_kv_write_backend():
    """By the H100 measurement: XLA off GPUs; on GPUs Pallas for small writes, jax-triton for large ones
    where it imports (else Pallas); overrides are checked."""
    for platform in ("cpu", "tpu"):
        assert kv_write_backend(platform, 8192) == kv_write_backend(platform, 64, "auto") == "xla"
    for platform in ("gpu", "cuda"):
        assert kv_write_backend(platform, 64, triton_ok=True) == "pallas_triton"
        assert kv_write_backend(platform, 1024, triton_ok=True) == "pallas_triton"
        assert kv_write_backend(platform, 2048, triton_ok=True) == "jax_triton"
        assert kv_write_backend(platform, 8192, triton_ok=False) == "pallas_triton"
    assert kv_write_backend("gpu", 8192) in ("jax_triton", "pallas_triton")  # probes jax_triton
    assert kv_write_backend("cpu", 64, "xla") == "xla"
    assert kv_write_backend("gpu", 64, "jax_triton") == "jax_triton"
    assert kv_write_backend("cuda", 8192, "pallas_triton") == "pallas_triton"
    with pytest.raises(ValueError, match="unknown"):
        kv_write_backend("gpu", 64, "cuda_graph")
    with pytest.raises(ValueError, match="GPU"):
        kv_write_backend("cpu", 64, "jax_triton")
