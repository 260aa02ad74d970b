"""kv_write (XLA scatter) and kv_write_pallas (interpret mode) agree exactly on every owned slot."""

import jax
import jax.numpy as jnp
import numpy as np
from kernel_cases import INTERPRET
import pytest

from gpu_lowering import lower_for_h100
from jaxserve.pallas_kernels import kv_write, kv_write_pallas


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
