"""Lower a jitted function for an H100 on a CPU-only host.

The Pallas Triton lowering builds the Triton IR in Python, so running it against an abstract "NVIDIA H100"
device catches unsupported ops and non-power-of-2 tiles before any GPU time is spent. It does not run
Triton's own passes (layout, shared memory, registers): those happen when XLA compiles on the GPU.
"""

import jax
from jax.sharding import AbstractDevice, AbstractMesh


def lower_for_h100(fn, *avals) -> str:
    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def lower_decode_for_h100(kernel, group: int, head_dim: int, block_size: int) -> str:
    """A paged decode kernel (3 sequences, 2 kv heads, bf16) lowered for an H100."""
    import jax.numpy as jnp
    A = jax.ShapeDtypeStruct
    q = A((3, 2 * group, head_dim), jnp.bfloat16)
    k = A((2, 40, block_size, head_dim), jnp.bfloat16)
    return lower_for_h100(kernel, q, k, k, A((3, 9), jnp.int32), A((3,), jnp.int32))
