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
