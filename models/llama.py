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
"""
from __future__ import annotations

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
    """A weight together with its tensor-parallel partition spec (read back by `param_specs`)."""
    return mod.param(name, nn.with_partitioning(init, tuple(spec)), shape, dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # As transformers: normalise in f32, cast back, then scale.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [T, N, E] rotated by angle positions * inv_freq (half-split layout, as HF `rotate_half`)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # (T, E/2)
    cos, sin = jnp.cos(freqs)[:, None, :], jnp.sin(freqs)[:, None, :]  # (T, 1, E/2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (T, N, E/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend

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
        q = qkv[:, :, :G].reshape(T, K * G, E)  # (T, H, E): head h = k*G + g, HF's GQA order
        k, v = qkv[:, :, G], qkv[:, :, G + 1]  # (T, K, E)
        inv_freq = c.rope_inv_freq()
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        k_cache, v_cache = self.backend.write_kv(kv[0], kv[1], k, v, meta)
        out = self.backend.attend(q, k_cache, v_cache, meta, E ** -0.5)  # (T, H, E)
        return jnp.einsum("THE,HED->TD", out.astype(self.dtype), wo), (k_cache, v_cache)


class Mlp(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        w_gu = _param(self, "w_gate_up", (c.hidden_size, 2, c.intermediate_size), P(None, None, TP), dtype=self.dtype)
        w_down = _param(self, "w_down", (c.intermediate_size, c.hidden_size), P(TP, None), dtype=self.dtype)
        gu = jnp.einsum("TD,DCI->TCI", x, w_gu)  # (T, 2, I)
        return jnp.einsum("TI,ID->TD", nn.silu(gu[:, 0]) * gu[:, 1], w_down)


class DecoderLayer(nn.Module):
    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, kv, meta):
        c = self.cfg
        ones = nn.initializers.ones
        attn_norm = _param(self, "attn_norm", (c.hidden_size,), P(None), ones, self.dtype)
        mlp_norm = _param(self, "mlp_norm", (c.hidden_size,), P(None), ones, self.dtype)
        h, kv = Attention(c, self.dtype, self.backend, name="attn")(rms_norm(x, attn_norm, c.rms_norm_eps), kv, meta)
        x = x + h
        x = x + Mlp(c, self.dtype, name="mlp")(rms_norm(x, mlp_norm, c.rms_norm_eps))
        return x, kv


class LlamaForCausalLM(nn.Module):
    """forward(token_ids i32[T], kv_caches, meta, logits_indices i32[S]) -> (logits f32[S, V], kv_caches).

    kv_caches: a tuple over layers of (k, v), each [K, num_blocks, block_size, E]; returned updated.
    logits_indices picks the token rows whose next-token logits are needed (may repeat a row).
    """

    cfg: ArchConfig
    dtype: jnp.dtype
    backend: AttentionBackend

    @nn.compact
    def __call__(self, token_ids, kv_caches, meta: AttentionMetadata, logits_indices):
        c = self.cfg
        # The embedding is gathered (one row per token), so replicated rows cost no bandwidth.
        embed = _param(self, "embed", (c.vocab_size, c.hidden_size), P(None, None), dtype=self.dtype)
        x = embed[token_ids]  # (T, D)
        new_caches = []
        for i in range(c.num_layers):
            x, kv = DecoderLayer(c, self.dtype, self.backend, name=f"layers_{i}")(x, kv_caches[i], meta)
            new_caches.append(kv)
        final_norm = _param(self, "final_norm", (c.hidden_size,), P(None), nn.initializers.ones, self.dtype)
        h = rms_norm(x[logits_indices], final_norm, c.rms_norm_eps)  # (S, D)
        if c.tie_word_embeddings:
            logits = jnp.einsum("SD,VD->SV", h, embed)
        else:
            lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), P(None, TP), dtype=self.dtype)
            logits = jnp.einsum("SD,DV->SV", h, lm_head)
        return logits.astype(jnp.float32), tuple(new_caches)


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
