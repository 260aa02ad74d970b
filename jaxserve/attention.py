"""Attention over the paged KV cache behind a small backend interface.

A backend does two things per layer: write the step's new K/V into their cache slots, and attend
the step's queries over the cache. The XLA backend (pure jnp, `pallas_kernels.reference`) runs
everywhere and is the reference; the Pallas GPU backend plugs in with the same two methods.
`pallas_kernels.select` picks one for the platform.

Metadata is an explicit pytree argument of the jitted step (never global state):
  slot_mapping   i32[T]      cache slot of each new token (block * block_size + offset); padding -> null block 0
  positions      i32[T]      absolute position of each token (rope, causal mask)
  token_seq_ids  i32[T]      row of each token in the sequence axis (padding tokens -> a padding row)
  block_tables   i32[B, P]   pages of each sequence (padding entries -> null block 0)
  seq_lens       i32[B]      context length incl. this step's tokens (0 for padding rows)
  query_start_loc i32[B + 1] cu_q_lens: sequence b's tokens are [qsl[b], qsl[b+1]) on the token axis
  decode_only    static bool every sequence has exactly one new token and T == B (the decode kernel applies)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AttentionMetadata:
    slot_mapping: jax.Array
    positions: jax.Array
    token_seq_ids: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    decode_only: bool = struct.field(pytree_node=False, default=False)


class AttentionBackend(Protocol):
    name: str

    def write_kv(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 meta: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """k, v: [T, Hkv, D] -> caches [Hkv, num_blocks, block_size, D] with the new slots written."""

    def attend(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, meta: AttentionMetadata,
               scale: float) -> jax.Array:
        """q: [T, Hq, D] -> [T, Hq, D], causal over each sequence's cached context."""

    def fused_decode(self, qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     meta: AttentionMetadata, scale: float) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """A decode step's RoPE, KV write and attention from the QKV matmul's output qkv [T, Hkv, G + 2, D]
        (cos/sin f32[T, D/2]) -> (out [T, Hq, D], k_cache, v_cache); None: the caller does them one by one."""

    def add_rms_norm(self, x: jax.Array, d: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
        """(x + d, w * rmsnorm(x + d)) for x, d [T, hidden]: the residual add and the next sublayer's norm."""


@dataclasses.dataclass(frozen=True)
class XlaBackend:
    """Pure-jnp paged attention: the CPU path and the numerical reference for the kernels.

    Every step, decode included, goes through the ragged reference: its page loop stops at the
    longest context in the batch, so the block-table width (max_model_len / block_size) costs
    nothing, and one compiled shape per token bucket serves decode and prefill alike.
    """

    name: str = "xla"
    has_decode_kernel: bool = False

    def write_kv(self, k_cache, v_cache, k, v, meta):
        from jaxserve.pallas_kernels.reference import kv_write_reference
        return kv_write_reference(k_cache, v_cache, k, v, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta, scale):
        from jaxserve.pallas_kernels.reference import ragged_attention_reference
        return ragged_attention_reference(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                          meta.query_start_loc, meta.token_seq_ids, meta.positions, scale)

    def fused_decode(self, qkv, cos, sin, k_cache, v_cache, meta, scale):
        return None  # XLA fuses what it can of the unfused path

    def add_rms_norm(self, x, d, w, eps):
        from jaxserve.pallas_kernels.add_rms_norm import add_rms_norm_reference
        return add_rms_norm_reference(x, d, w, eps=eps)


@dataclasses.dataclass(frozen=True)
class PallasBackend:
    """Pallas GPU kernels: paged decode for decode-only steps, ragged prefill over pages otherwise.

    "pallas_mosaic" runs decode steps with the Mosaic GPU kernel (Hopper, bf16/f16), and prefill steps with the
    Mosaic prefill kernel when prefill_warpgroups > 0 (1 or 2 compute warpgroups per tile; 3: FA3's layout), else
    with the Triton one; "pallas_triton" uses the Triton kernels throughout."""

    name: str = "pallas_triton"
    has_decode_kernel: bool = True
    interpret: bool = False  # the Pallas interpreter: the same kernels end to end on CPU (tests)
    prefill_warpgroups: int = 0  # pallas_mosaic only: 0 = Triton prefill
    # Decode steps' RoPE + KV write + q groups in one kernel, and residual add + RMSNorm in one kernel
    # (pallas_kernels/rope_kv_write.py, add_rms_norm.py); False keeps XLA's small kernels (an A/B switch,
    # JAXSERVE_FUSE_SMALL_OPS=0).
    fuse_small_ops: bool = True
    # Decode steps of at least this many (sequence, kv head) items take the persistent Mosaic decode kernel
    # (select.MOSAIC_DECODE_PERSISTENT_MIN_ITEMS; JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS overrides it for A/B runs,
    # 0 = never).
    decode_persistent_min_items: int = 0

    def write_kv(self, k_cache, v_cache, k, v, meta):
        from jaxserve.pallas_kernels.kv_write import kv_write_pallas
        from jaxserve.pallas_kernels.select import kv_write_backend
        # By measurement on GPUs: Pallas for small steps, jax-triton for large ones where it imports.
        if not self.interpret and kv_write_backend("gpu", k.shape[0]) == "jax_triton":
            from jaxserve.pallas_kernels.kv_write_triton import kv_write_triton
            return kv_write_triton(k_cache, v_cache, k, v, meta.slot_mapping)
        return kv_write_pallas(k_cache, v_cache, k, v, meta.slot_mapping, interpret=self.interpret)

    def fused_decode(self, qkv, cos, sin, k_cache, v_cache, meta, scale):
        T, Hkv, C, D = qkv.shape
        if not (self.fuse_small_ops and meta.decode_only) or D & (D - 1):
            return None
        from jaxserve.pallas_kernels.select import kv_write_backend
        if not self.interpret and kv_write_backend("gpu", T) == "jax_triton":
            return None  # a decode step this large writes K/V faster with the jax-triton kernel (write_kv)
        from jaxserve.pallas_kernels import paged_decode_mgpu as mgpu
        from jaxserve.pallas_kernels.paged_decode import decode_group_rows, paged_decode
        from jaxserve.pallas_kernels.rope_kv_write import rope_kv_write
        G = C - 2
        q_like = jax.ShapeDtypeStruct((T, Hkv * G, D), qkv.dtype)
        if self.name == "pallas_mosaic" and mgpu.supports(q_like, k_cache):
            kernel, rows = mgpu.paged_decode_mgpu, mgpu.decode_group_rows(G)
        else:
            kernel, rows = paged_decode, decode_group_rows(G)
        q4, k_cache, v_cache = rope_kv_write(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping,
                                             group_padded=rows, interpret=self.interpret)
        extra = {}
        if kernel is mgpu.paged_decode_mgpu:
            from jaxserve.pallas_kernels.select import mosaic_decode_tuning
            extra["tuning"] = mosaic_decode_tuning(T, Hkv, self.decode_persistent_min_items)
        out = kernel(q4, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale=scale, group=G,
                     interpret=self.interpret, **extra)
        return out, k_cache, v_cache

    def add_rms_norm(self, x, d, w, eps):
        from jaxserve.pallas_kernels import add_rms_norm as arn
        if self.fuse_small_ops and arn.supports(x.shape[-1]):
            return arn.add_rms_norm(x, d, w, eps=eps, interpret=self.interpret)
        return arn.add_rms_norm_reference(x, d, w, eps=eps)

    def attend(self, q, k_cache, v_cache, meta, scale):
        from jaxserve.pallas_kernels import paged_decode, ragged_prefill
        if meta.decode_only and self.name == "pallas_mosaic":
            from jaxserve.pallas_kernels import paged_decode_mgpu as mgpu
            if mgpu.supports(q, k_cache):  # bf16/f16, head dim a multiple of 64; else the Triton kernel
                from jaxserve.pallas_kernels.select import mosaic_decode_tuning
                return mgpu.paged_decode_mgpu(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale=scale,
                                              tuning=mosaic_decode_tuning(q.shape[0], k_cache.shape[0],
                                                                          self.decode_persistent_min_items),
                                              interpret=self.interpret)
        if meta.decode_only:
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale=scale,
                                interpret=self.interpret)
        if self.name == "pallas_mosaic" and self.prefill_warpgroups:
            from jaxserve.pallas_kernels import paged_decode_mgpu as mgpu
            from jaxserve.pallas_kernels import ragged_prefill_mgpu as pmgpu
            if mgpu.supports(q, k_cache):
                return pmgpu.ragged_prefill_mgpu(
                    q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale=scale,
                    tuning=pmgpu.prefill_tuning(self.prefill_warpgroups, q.shape[0], k_cache),
                    interpret=self.interpret)
        return ragged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              scale=scale, interpret=self.interpret)


def get_backend(name: str = "auto", prefill_warpgroups: int | None = None) -> AttentionBackend:
    """`auto`: the platform's best (pallas_kernels.select); `xla`, `pallas_triton`, `pallas_mosaic` force one.
    prefill_warpgroups (pallas_mosaic): 0 = Triton prefill, 1 or 2 = the Mosaic prefill kernel with that many
    compute warpgroups per tile, 3 = its FA3 layout (ragged_prefill_mgpu.prefill_tuning); None = the measured
    default (select.MOSAIC_PREFILL_WARPGROUPS)."""
    from jaxserve.pallas_kernels import select
    choice = select.device_attention_backend(override=None if name == "auto" else name)
    if prefill_warpgroups is not None and prefill_warpgroups not in select.MOSAIC_PREFILL_CHOICES:
        raise ValueError(f"mosaic prefill warpgroups must be one of {select.MOSAIC_PREFILL_CHOICES}, "
                         f"got {prefill_warpgroups}")
    if choice == "xla":
        return XlaBackend()
    fuse = os.environ.get("JAXSERVE_FUSE_SMALL_OPS", "1") != "0"
    if choice != "pallas_mosaic":
        return PallasBackend(name=choice, fuse_small_ops=fuse)
    persistent = select.MOSAIC_DECODE_PERSISTENT_MIN_ITEMS
    if env := os.environ.get("JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS", "").strip():
        try:
            persistent = int(env)
        except ValueError:
            raise ValueError(f"JAXSERVE_DECODE_PERSISTENT_MIN_ITEMS must be an integer (0 = never take the "
                             f"persistent decode kernel), got {env!r}") from None
    wg = select.MOSAIC_PREFILL_WARPGROUPS if prefill_warpgroups is None else prefill_warpgroups
    return PallasBackend(name=choice, prefill_warpgroups=wg, fuse_small_ops=fuse,
                         decode_persistent_min_items=persistent)


def dummy_metadata(num_tokens: int, num_seqs: int, pages_per_seq: int, decode_only: bool = False) -> AttentionMetadata:
    """All-padding metadata of the given bucket shape (warm-up, shape inference)."""
    z = lambda *s: jnp.zeros(s, jnp.int32)  # noqa: E731
    return AttentionMetadata(slot_mapping=z(num_tokens), positions=z(num_tokens), token_seq_ids=z(num_tokens),
                             block_tables=z(num_seqs, pages_per_seq), seq_lens=z(num_seqs),
                             query_start_loc=z(num_seqs + 1), decode_only=decode_only)
