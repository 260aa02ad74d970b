"""Writing new tokens' K/V into the paged cache.

Design note. The write is T * Hkv * D elements scattered to whole rows of the cache: pure data movement with
no reuse. XLA's scatter on the flattened slot axis ([Hkv, N * S, D], a free reshape of the cache) writes each
row with contiguous D-element stores and, with the cache donated, updates it in place; it serves the XLA backend
(CPU). On the H100 it reached only 15% of the copy rate at 8192 tokens (docs/PERF.md, session 3), so GPUs use the
Pallas version (one program per token and kv head, the cache aliased input -> output; fastest below 2048 tokens)
or the jax-triton one (kv_write_triton.py; fastest from 2048), as select.kv_write_backend picks. Padding tokens'
slots lie in the null block 0; their writes race with each other harmlessly (on a GPU a row there may mix them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.pallas_kernels.reference import kv_write_reference


def _check(k_pages, v_pages, k_new, v_new, slot_mapping):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"want k/v pages [Hkv, N, S, D] of one shape, got {k_pages.shape} and {v_pages.shape}")
    Hkv, _, _, D = k_pages.shape
    T = slot_mapping.shape[0]
    if k_new.shape != (T, Hkv, D) or v_new.shape != (T, Hkv, D):
        raise ValueError(f"want k_new/v_new [{T}, {Hkv}, {D}], got {k_new.shape} and {v_new.shape}")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[num_tokens], got {slot_mapping.dtype}{slot_mapping.shape}")


def kv_write(k_pages, v_pages, k_new, v_new, slot_mapping):
    """XLA scatter (the XLA backend's write). Donate k_pages/v_pages in the caller's jit for an in-place update.

    Args:
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim].
      k_new, v_new: [num_tokens, num_kv_heads, head_dim].
      slot_mapping: i32[num_tokens], slot = block * block_size + offset; padding tokens -> block 0.
    Returns:
      (k_pages, v_pages) with the new rows written.
    """
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    return kv_write_reference(k_pages, v_pages, k_new, v_new, slot_mapping)


def _kv_write_kernel(
    slot_ref,  # i32[1]        cache slot of token t
    k_new_ref,  # [D]          token t, kv head h
    v_new_ref,  # [D]
    k_in_ref,  # [N, S, D]     aliased to k_out_ref (unused: the write goes through the output)
    v_in_ref,  # [N, S, D]
    k_out_ref,  # [N, S, D]    kv head h's page pool
    v_out_ref,  # [N, S, D]
):
    del k_in_ref, v_in_ref
    S = k_out_ref.shape[1]
    slot = slot_ref[0]
    k_out_ref[slot // S, slot % S, :] = k_new_ref[...].astype(k_out_ref.dtype)
    v_out_ref[slot // S, slot % S, :] = v_new_ref[...].astype(v_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def kv_write_pallas(k_pages, v_pages, k_new, v_new, slot_mapping, *, interpret: bool = False):
    """Pallas (Triton lowering) version of kv_write; same arguments. Donates and aliases the cache."""
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    Hkv, N, S, D = k_pages.shape
    T = slot_mapping.shape[0]
    pool = pl.BlockSpec((None, N, S, D), lambda t, h: (h, 0, 0, 0))  # kv head h's page pool
    return pl.pallas_call(
        _kv_write_kernel,
        grid=(T, Hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (t,)),  # slot_mapping: element t
            pl.BlockSpec((None, None, D), lambda t, h: (t, h, 0)),  # k_new: row (t, h)
            pl.BlockSpec((None, None, D), lambda t, h: (t, h, 0)),  # v_new: row (t, h)
            pool,  # k_pages (aliased to output 0)
            pool,  # v_pages (aliased to output 1)
        ],
        out_specs=[pool, pool],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_write",
    )(slot_mapping, k_new, v_new, k_pages, v_pages)
