"""Llama-family decoder (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2) as Flax modules over a paged KV cache.

Flax API: `flax.linen`. A serving engine wants a pure function `apply(params, inputs) -> outputs`
with the weights as a plain pytree it can build tensor by tensor from safetensors, shard with
`NamedSharding`, donate around and restore from orbax; Linen gives exactly that (no object state
to split/merge each step, as NNX would need around `jit`). Layers are unrolled in Python, not
`nn.scan`-ed: on the H100 the same matmuls ran 2.9x slower under `lax.scan` over stacked layer
weights (../shared/reference/h100_facts.md), and unrolling lets each layer's cache buffer be
donated and updated in place.

Runtime weight layout (fused at load, gpt-fast style), letters: T tokens, D hidden, K kv heads,
G query heads per kv head, H = K*G query heads, E head dim, I intermediate, V vocab:
  embed   [V, D]            wqkv [D, K, G+2, E] (per kv head: its G query heads, then k, then v)
  wo      [H, E, D]         w_gate_up [D, 2, I]   w_down [I, D]   lm_head [D, V] (absent if tied)
Grouping q/k/v by kv head keeps each tensor-parallel shard's q, k and v together when the K axis
is split. The tensor-parallel partition spec of every weight is declared where the weight is.
Mistral/Qwen2 differ only by config (Qwen2: qkv bias); sliding windows are refused by the loader.

Tensor parallelism (jaxserve/parallel.py, docs/PARALLEL.md): the forward runs inside `jax.shard_map`
with per-shard weights. With `tp_axis` set, `_param` declares each weight's local shape (its TP
dims divided by the axis size), attention runs on the shard's own kv heads, one `psum` follows wo
and one w_down (Megatron: two all-reduces per layer), and the logits are computed on the shard's
vocab slice and all-gathered. Pipeline stages are the same module over a layer range
(`layer_start`/`layer_end`): the first stage embeds token ids, later ones take hidden states, the
last one returns logits.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxserve.attention import AttentionBackend, AttentionMetadata
from jaxserve.models.arch import ArchConfig

TP = "tp"  # mesh axis name for tensor parallelism
_init = nn.initializers.normal(0.02)


def _param(mod: nn.Module, name: str, shape: tuple, spec: P, init=_init, dtype=jnp.float32):
    """A weight with its tensor-parallel partition spec (read back by `abstract_params`).

    `shape` is the global shape; inside shard_map (`mod.tp_axis` set) the local shard's shape is
    declared instead, so flax's shape check holds for per-shard weights.
    """
    if mod.tp_axis is not None:
        n = jax.lax.axis_size(mod.tp_axis)
        shape = tuple(d // n if ax == TP else d for d, ax in zip(shape, tuple(spec) + (None,) * len(shape)))
    return mod.param(name, nn.with_partitioning(init, tuple(spec)), shape, dtype)


def _all_reduce(x: jax.Array, axis: str | None) -> jax.Array:
    return x if axis is None else jax.lax.psum(x, axis)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # As transformers: normalise in f32, cast back, then scale.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin f32[T, E/2] of the angles positions * inv_freq (the same for every layer of a step)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # (T, E/2)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, N, E] rotated by rope_cos_sin's angles (half-split layout, as HF `rotate_half`)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, E/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (T, N, E/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend
    tp_axis: str | None = None  # set inside shard_map: this shard's kv heads, psum after wo

    @nn.compact
    def __call__(self, x, kv, meta: AttentionMetadata):
        c = self.cfg
        K, G, E = c.num_kv_heads, c.q_per_kv, c.head_dim
        wqkv = _param(self, "wqkv", (c.hidden_size, K, G + 2, E), P(None, TP, None, None), dtype=self.dtype)
        wo = _param(self, "wo", (K * G, E, c.hidden_size), P(TP, None, None), dtype=self.dtype)
        qkv = jnp.einsum("TD,DKCE->TKCE", x, wqkv)  # (T, K, G+2, E)
        if c.qkv_bias:
            qkv = qkv + _param(self, "bqkv", (K, G + 2, E), P(TP, None, None), nn.initializers.zeros, self.dtype)
        T = x.shape[0]
        cos, sin = rope_cos_sin(meta.positions, c.rope_inv_freq())
        fused = self.backend.fused_decode(qkv, cos, sin, kv[0], kv[1], meta, E ** -0.5)
        if fused is not None:  # decode step on a GPU: RoPE, KV write and attention in two kernels
            out, k_cache, v_cache = fused
        else:
            q = qkv[:, :, :G].reshape(T, -1, E)  # (T, H, E): head h = k*G + g, HF's GQA order (local under TP)
            k, v = qkv[:, :, G], qkv[:, :, G + 1]  # (T, K, E)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = self.backend.write_kv(kv[0], kv[1], k, v, meta)
            out = self.backend.attend(q, k_cache, v_cache, meta, E ** -0.5)  # (T, H, E)
        h = jnp.einsum("THE,HED->TD", out.astype(self.dtype), wo)  # (T, D): partial sum under TP
        return _all_reduce(h, self.tp_axis), (k_cache, v_cache)


class Mlp(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype
    tp_axis: str | None = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        w_gu = _param(self, "w_gate_up", (c.hidden_size, 2, c.intermediate_size), P(None, None, TP), dtype=self.dtype)
        w_down = _param(self, "w_down", (c.intermediate_size, c.hidden_size), P(TP, None), dtype=self.dtype)
        gu = jnp.einsum("TD,DCI->TCI", x, w_gu)  # (T, 2, I)
        h = jnp.einsum("TI,ID->TD", nn.silu(gu[:, 0]) * gu[:, 1], w_down)  # (T, D): partial sum under TP
        return _all_reduce(h, self.tp_axis)


class DecoderLayer(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend
    tp_axis: str | None = None

    @nn.compact
    def __call__(self, x, pending, kv, meta):
        """(x, pending, kv) -> (x, pending, kv). The residual stream is x + pending: a layer leaves its MLP output
        unadded, so that the next layer adds it together with its norm (backend.add_rms_norm: one kernel on
        GPUs), as the attention output is added with the MLP's norm. The first layer gets zeros (x + 0 is x)."""
        c = self.cfg
        ones = nn.initializers.ones
        attn_norm = _param(self, "attn_norm", (c.hidden_size,), P(None), ones, self.dtype)
        mlp_norm = _param(self, "mlp_norm", (c.hidden_size,), P(None), ones, self.dtype)
        attn = Attention(c, self.dtype, self.backend, self.tp_axis, name="attn")
        x, n = self.backend.add_rms_norm(x, pending, attn_norm, c.rms_norm_eps)
        h, kv = attn(n, kv, meta)
        x, n = self.backend.add_rms_norm(x, h, mlp_norm, c.rms_norm_eps)
        return x, Mlp(c, self.dtype, self.tp_axis, name="mlp")(n), kv


# JAXSERVE_TRACE_LAYER_ONCE=0 calls the Flax submodules instead (an A/B switch for measurements).
TRACE_LAYER_ONCE = os.environ.get("JAXSERVE_TRACE_LAYER_ONCE", "1") != "0"


@functools.cache
def _layer_fn(cfg: ArchConfig, dtype, backend: AttentionBackend, tp_axis: str | None):
    """A decoder layer as a jitted function of (its weights, x, its KV pages, meta).

    The forward calls it once per layer. jax traces it once per step shape and reuses that trace (and its
    lowering) for every layer, where calling the Flax submodules traced all of them: at a warm start, with
    every program found in the persistent compilation cache, tracing the unrolled layers was most of the
    ~1 s each step shape took. XLA inlines the calls, so the compiled program is the unrolled one."""
    layer = DecoderLayer(cfg, dtype, backend, tp_axis)

    def run(params, x, pending, kv, meta):
        return layer.apply({"params": params}, x, pending, kv, meta)
    return jax.jit(run)


class LlamaForCausalLM(nn.Module):
    """forward(token_ids i32[T], kv_caches, meta, logits_indices i32[S]) -> (logits f32[S, V], kv_caches).

    kv_caches: a tuple over layers of (k, v), each [K, num_blocks, block_size, E]; returned updated.
    logits_indices picks the token rows whose next-token logits are needed (may repeat a row).
    A pipeline stage runs layers [layer_start, layer_end) only, with kv_caches of those layers: a
    stage that does not start at layer 0 takes hidden states x [T, D] instead of token ids, and one
    that does not end at the last layer returns x [T, D] instead of logits.
    """

    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend
    tp_axis: str | None = None  # mesh axis of tensor parallelism, set when run inside shard_map
    layer_start: int = 0
    layer_end: int | None = None  # None: the last layer

    @nn.compact
    def __call__(self, inputs, kv_caches, meta: AttentionMetadata, logits_indices):
        c = self.cfg
        end = c.num_layers if self.layer_end is None else self.layer_end
        first, last = self.layer_start == 0, end == c.num_layers
        # The embedding is gathered (one row per token), so replicated rows cost no bandwidth.
        if first or (last and c.tie_word_embeddings):
            embed = _param(self, "embed", (c.vocab_size, c.hidden_size), P(None, None), dtype=self.dtype)
        x = embed[inputs] if first else inputs  # (T, D)
        # The residual stream is x + pending (DecoderLayer). Zeros, not None, for the first layer: one traced
        # layer serves all (_layer_fn).
        new_caches, pending = [], jnp.zeros_like(x)
        for j, i in enumerate(range(self.layer_start, end)):
            if self.is_initializing() or not TRACE_LAYER_ONCE:  # declares the weights (init, abstract_params)
                x, pending, kv = DecoderLayer(c, self.dtype, self.backend, self.tp_axis, name=f"layers_{i}")(
                    x, pending, kv_caches[j], meta)
            else:  # one traced layer, called once per layer's weights (see _layer_fn)
                x, pending, kv = _layer_fn(c, self.dtype, self.backend, self.tp_axis)(
                    self.variables["params"][f"layers_{i}"], x, pending, kv_caches[j], meta)
            new_caches.append(kv)
        if not last:
            return x + pending, tuple(new_caches)
        x = x[logits_indices] + pending[logits_indices]
        final_norm = _param(self, "final_norm", (c.hidden_size,), P(None), nn.initializers.ones, self.dtype)
        h = rms_norm(x, final_norm, c.rms_norm_eps)  # (S, D)
        if c.tie_word_embeddings:
            head = embed  # replicated: under TP each shard takes its own vocab slice
            if self.tp_axis is not None:
                n = c.vocab_size // jax.lax.axis_size(self.tp_axis)
                head = jax.lax.dynamic_slice_in_dim(embed, jax.lax.axis_index(self.tp_axis) * n, n, axis=0)
            logits = jnp.einsum("SD,VD->SV", h, head)
        else:
            lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), P(None, TP), dtype=self.dtype)
            logits = jnp.einsum("SD,DV->SV", h, lm_head)  # (S, V / tp) under TP
        logits = logits.astype(jnp.float32)
        if self.tp_axis is not None:  # the one collective outside the layers: gather the vocab slices
            logits = jax.lax.all_gather(logits, self.tp_axis, axis=1, tiled=True)  # (S, V)
        return logits, tuple(new_caches)


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM


def abstract_params(model: nn.Module, num_blocks: int = 2, block_size: int = 16):
    """(shapes pytree of jax.ShapeDtypeStruct, partition-spec pytree) without allocating anything."""
    from jaxserve.attention import dummy_metadata
    c = model.cfg
    page = jax.ShapeDtypeStruct((c.num_kv_heads, num_blocks, block_size, c.head_dim), model.dtype)
    kv = tuple((page, page) for _ in range(c.num_layers))
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    init = lambda kv, tok: model.init(jax.random.key(0), tok, kv, dummy_metadata(1, 1, 1), tok)  # noqa: E731
    boxed = jax.eval_shape(init, kv, one)["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, boxed,
                          is_leaf=lambda b: isinstance(b, nn.Partitioned))
    return shapes, specs
