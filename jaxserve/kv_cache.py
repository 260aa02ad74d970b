"""KV cache pages on the device: sizing, allocation, block copies (copy-on-write) and swap.

Layout: a tuple over layers of (k, v), each [num_kv_heads, num_blocks, block_size, head_dim] (the
layout of jax's bundled paged attention). Block 0 is the null page padding points at.

Sizing (nano-vllm's rule): after the weights are loaded and a profiling step has run at the
largest token bucket, the KV cache gets what is left of `gpu_memory_utilization` of the device:
  blocks = (util * device bytes - peak bytes in use) / bytes per block (all layers, k and v).
On CPU there are no memory statistics: `kv_cache_memory` bytes if given, else min(4 GiB, 25% of
available host memory) (the stated rule). `num_gpu_blocks_override` wins over both.
Tensor/pipeline parallel: the budget is that of the fullest device, and a block's bytes are counted
per device (its stage's layers, num_kv_heads / tp heads: parallel.ParallelPlan.kv_bytes_per_block).
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.arch import ArchConfig

log = logging.getLogger(__name__)
CPU_DEFAULT_MAX = 4 << 30


def bytes_per_block(arch: ArchConfig, block_size: int, dtype, num_kv_heads: int | None = None) -> int:
    heads = num_kv_heads or arch.num_kv_heads
    return 2 * arch.num_layers * heads * block_size * arch.head_dim * jnp.dtype(dtype).itemsize


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 << 30


# XLA's all-reduce kernels (the collective-kernel thunks a tensor-parallel decode step runs) each allocate their own
# scratch in collective memory, outside JAX's allocator, once per compiled program, and keep it as long as the
# program lives. Measured (docs/PERF.md, session 14, call 61): dummy Llama-3-70B at TP=4 on 4 x H200 grew by ~968 MB
# per warmed program of 161 all-reduces, ~6 MiB each, until the device was full and the warm-up failed with
# "Failed to allocate Scratch 1 for all-reduce". JAXSERVE_COLLECTIVE_SCRATCH_MIB overrides the figure (0: none).
COLLECTIVE_SCRATCH_MIB_PER_ALL_REDUCE = 6.0
# What a device needs outside JAX's allocator besides that: the CUDA context, cuBLAS and NCCL workspaces.
OUTSIDE_POOL_BASE = 2 << 30


def collective_scratch_bytes(num_programs: int, all_reduces_per_program: int) -> int:
    """Device bytes the collective kernels of `num_programs` compiled step programs keep outside JAX's allocator."""
    mib = float(os.environ.get("JAXSERVE_COLLECTIVE_SCRATCH_MIB", COLLECTIVE_SCRATCH_MIB_PER_ALL_REDUCE))
    return int(num_programs * all_reduces_per_program * mib * (1 << 20))


def kv_memory_budget(devices, gpu_memory_utilization: float, kv_cache_memory: int | None,
                     activation_bytes: int | None = None, outside_pool_bytes: int = 0) -> tuple[int, str]:
    """Bytes the KV cache may take on each device, and how that number was reached.

    activation_bytes: what the largest forward needs besides its inputs, by XLA's memory analysis
    (`ModelRunner.profile_run`). Given, the budget is the limit less the bytes in use now and that figure;
    else less the allocator's peak, which also holds compile-time scratch (XLA's autotuning) and so differs
    between a cold start and a warm one.
    outside_pool_bytes: device memory that will be allocated outside JAX's allocator later (the collective kernels'
    scratch, `collective_scratch_bytes`). What of it does not fit beside the allocator's share (less
    OUTSIDE_POOL_BASE) comes off the budget. Measured on 2 x H200 (docs/PERF.md, session 15): that leaves the
    bytes free inside JAX's allocator, which still takes its whole share as it grows, not outside it, so it
    gives the collectives no room. What does is a smaller share: engine_builder.collective_pool_fraction lowers
    it before JAX starts, after which nothing is left to take off here (where the user set the share, this still
    applies)."""
    if kv_cache_memory:
        return int(kv_cache_memory), "--kv-cache-memory"
    # Several devices (tensor/pipeline parallel): the one with the least free memory bounds them all.
    def used(st: dict) -> int:
        if activation_bytes is not None:
            return st.get("bytes_in_use", 0) + activation_bytes
        return max(st.get("peak_bytes_in_use", 0), st.get("bytes_in_use", 0))

    stats = min((d.memory_stats() or {} for d in devices), key=lambda st: st.get("bytes_limit", 0) - used(st))
    if not stats or "bytes_limit" not in stats:
        return min(CPU_DEFAULT_MAX, _host_available() // 4), "CPU rule: min(4 GiB, 25% of available memory)"
    # JAX's allocator was given util * device memory (platform.init_platform); the limit is that share.
    limit = stats["bytes_limit"]
    peak = used(stats)
    # Headroom for what the profiling forward does not allocate: the sampler's [S, V] temporaries, XLA's
    # autotuning scratch for shapes compiled later, block copies and swap staging.
    reserve = max(1 << 30, int(0.03 * limit))
    what = "in use + largest forward's memory analysis" if activation_bytes is not None else "peak after profiling"
    why = (f"{gpu_memory_utilization:.0%} of device memory minus {peak / 2**30:.2f} GiB ({what}) and "
           f"{reserve / 2**30:.1f} GiB headroom")
    excess = 0
    if outside_pool_bytes:
        outside = limit / gpu_memory_utilization - limit  # the device's memory beyond the allocator's share
        excess = max(0, int(outside_pool_bytes - max(0.0, outside - OUTSIDE_POOL_BASE)))
        excess = 0 if excess < 64 << 20 else excess  # the share's own rounding (engine_builder lowered it to fit)
        why += (f", and {excess / 2**30:.2f} GiB left free for the collective kernels' scratch "
                f"({outside_pool_bytes / 2**30:.2f} GiB estimated)") if excess else ""
    return max(0, int(limit - peak - reserve - excess)), why


def memory_summary(devices) -> str:
    """One line of each device's allocator state: in use, peak, and the largest free block (what the next large
    allocation, a layer's pages, can take at most). Empty where the runtime keeps no statistics (CPU)."""
    parts = []
    for d in devices:
        st = d.memory_stats() or {}
        if "bytes_in_use" not in st:
            continue
        g = lambda k: f"{st[k] / 2**30:.2f}" if k in st else "?"  # noqa: E731
        parts.append(f"{d.platform}:{d.id} in use {g('bytes_in_use')} GiB, peak {g('peak_bytes_in_use')} GiB, "
                     f"largest free block {g('largest_free_block_bytes')} GiB of {g('bytes_limit')} GiB")
    return "; ".join(parts)


def pipeline_slack(num_blocks: int, layers_per_stage: int) -> int:
    """Pages to leave unallocated on pipeline-parallel engines: one layer's k (or v) page array per device.

    Measured (docs/PERF.md, session 17; 2 x H100 and 2 x H200, Llama-3-8B at PP=2): engines sized by the allocator's
    peak with 2.1-3.8 GiB of headroom failed their warm-up when a stage's step asked for one more allocation of
    exactly one page array's size (1.89 and 3.33 GiB), while those whose profiling peak had left 0.6-0.9 GiB more
    passed. XLA's memory analysis shows every page output aliased to its donated input. Our reading, not verified:
    the failing engines had logged the allocator running out while the pages themselves were allocated (their pool
    grows in regions and a page array must fit one), and a step cannot reuse a page array whose allocation failed,
    so it asks for a new one. This slack avoids that; engine_builder._allocate_pages backs off where it still
    happens. Single-stage engines never showed it."""
    return -(-num_blocks // (2 * layers_per_stage)) if num_blocks > 0 else 0


def round_blocks(num_blocks: int, quantum: int = 32) -> int:
    """Blocks rounded down to a multiple of `quantum` from 1024 blocks up (under 3.2% less), so that a few
    bytes more or less in use at start-up give the same cache shape, and the same compiled programs."""
    return num_blocks - num_blocks % quantum if num_blocks >= 1024 else num_blocks


def abstract(arch: ArchConfig, num_blocks: int, block_size: int, dtype, sharding=None, num_kv_heads=None):
    """The pages per layer as shapes with their shardings only ((k, v) per layer): what `allocate` makes, so
    that programs compiled ahead of time for these are the ones the allocated pages take.
    `sharding`: one for every layer, or a list of one per layer (pipeline stages)."""
    heads = num_kv_heads or arch.num_kv_heads
    shape = (heads, num_blocks, block_size, arch.head_dim)
    per_layer = list(sharding) if isinstance(sharding, (list, tuple)) else [sharding] * arch.num_layers
    # Committed to a device even without a sharding: a step's outputs (the updated pages) are committed, and jit
    # keys its cache on committedness, so uncommitted fresh pages made warm-up compile its first shape for inputs
    # no real step has; that shape then compiled again at its first real use (seconds of stall on a GPU).
    per_layer = [jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sh is None else sh for sh in per_layer]
    return tuple((jax.ShapeDtypeStruct(shape, dtype, sharding=sh),) * 2 for sh in per_layer)


def allocate(arch: ArchConfig, num_blocks: int, block_size: int, dtype, sharding=None, num_kv_heads=None):
    """Zeroed pages per layer, as `abstract` describes them."""
    specs = abstract(arch, num_blocks, block_size, dtype, sharding, num_kv_heads)
    makes = {}
    for k, _ in specs:
        if k.sharding not in makes:
            makes[k.sharding] = jax.jit(lambda k=k: jnp.zeros(k.shape, k.dtype), out_shardings=k.sharding)
    return tuple((makes[k.sharding](), makes[v.sharding]()) for k, v in specs)


def pad_ids(ids, fill: int = 0) -> np.ndarray:
    """i32 ids padded to a power of two with `fill` (the null block), so block copies and swaps compile
    once per size class instead of once per count while serving. Copying block 0 onto itself is a no-op."""
    n = max(1, len(ids))
    out = np.full(1 << (n - 1).bit_length(), fill, np.int32)
    out[:len(ids)] = ids
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_blocks(kv_caches, src: jax.Array, dst: jax.Array):
    """Copy pages src[i] -> dst[i] in every layer (copy-on-write). src, dst: i32[n]."""
    return jax.tree.map(lambda c: c.at[:, dst].set(c[:, src]), kv_caches)


@jax.jit
def gather_blocks(kv_caches, ids: jax.Array):
    """-> per layer (k, v) of [heads, n, block_size, head_dim]: the pages to swap out."""
    return jax.tree.map(lambda c: c[:, ids], kv_caches)


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_blocks(kv_caches, ids: jax.Array, pages):
    return jax.tree.map(lambda c, p: c.at[:, ids].set(p), kv_caches, pages)


class HostSwapSpace:
    """Host-memory pages for preempted requests' KV (vLLM's --swap-space), numpy, same layout."""

    def __init__(self, arch: ArchConfig, num_blocks: int, block_size: int, dtype, num_kv_heads=None):
        heads = num_kv_heads or arch.num_kv_heads
        shape = (arch.num_layers, 2, heads, num_blocks, block_size, arch.head_dim)
        self.pages = np.zeros(shape, dtype=jnp.dtype(dtype))
        self.num_blocks = num_blocks

    @staticmethod
    def blocks_for(swap_space_gib: float, arch: ArchConfig, block_size: int, dtype) -> int:
        return int(swap_space_gib * (1 << 30)) // bytes_per_block(arch, block_size, dtype)

    def swap_out(self, kv_caches, mapping: list[tuple[int, int]]) -> None:
        n = len(mapping)
        dev = pad_ids([d for d, _ in mapping])
        host = np.array([h for _, h in mapping], np.int32)
        pages = jax.device_get(gather_blocks(kv_caches, jnp.asarray(dev)))
        for layer, (k, v) in enumerate(pages):
            self.pages[layer, 0][:, host] = k[:, :n]
            self.pages[layer, 1][:, host] = v[:, :n]

    def swap_in(self, kv_caches, mapping: list[tuple[int, int]]):
        # Padding entries read host block 0 and write the device null block 0 (never read unmasked).
        host = pad_ids([h for h, _ in mapping])
        dev = jnp.asarray(pad_ids([d for _, d in mapping]))
        pages = tuple((self.pages[layer, 0][:, host], self.pages[layer, 1][:, host])
                      for layer in range(self.pages.shape[0]))
        return scatter_blocks(kv_caches, dev, pages)
