"""Argument checks shared by the public kernel functions (ValueError with the shapes, before any tracing)."""
from __future__ import annotations

import jax.numpy as jnp


def check_paged_args(q, k_pages, v_pages, block_tables, q_axis: str, batch: int | None = None) -> None:
    """q [q_axis, Hq, D]; pages [Hkv, N, S, D] alike; block_tables i32[batch, P] (batch: q's first axis if None);
    block size and head dim powers of 2."""
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"want q [{q_axis}, Hq, D] and pages [Hkv, N, S, D], got {q.shape} and {k_pages.shape}")
    batch = q.shape[0] if batch is None else batch
    _, Hq, D = q.shape
    Hkv, _, S, Dk = k_pages.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    if Dk != D:
        raise ValueError(f"head_dim of q ({D}) and pages ({Dk}) differ")
    if Hq % Hkv:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {Hkv}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be i32[{batch}, pages_per_seq], got {block_tables.dtype}"
                         f"{block_tables.shape}")
    for name, x in (("block_size", S), ("head_dim", D)):
        if x & (x - 1):
            raise ValueError(f"{name} must be a power of 2 for the Triton lowering, got {x}")


def check_ragged_args(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens) -> None:
    """check_paged_args for flat-packed tokens, plus seq_lens i32[B] and cu_q_lens i32[B + 1]."""
    B = seq_lens.shape[0]
    check_paged_args(q, k_pages, v_pages, block_tables, "T", batch=B)
    if seq_lens.dtype != jnp.int32 or cu_q_lens.shape != (B + 1,) or cu_q_lens.dtype != jnp.int32:
        raise ValueError(f"want seq_lens i32[{B}] and cu_q_lens i32[{B + 1}], got {seq_lens.dtype}{seq_lens.shape}"
                         f" and {cu_q_lens.dtype}{cu_q_lens.shape}")
