"""On-device batched sampling with per-row parameters (vLLM semantics).

Design note
-----------
The runner gathers one logits row per sequence that samples this step (`S` rows, padded to a bucket)
and calls `sample(logits f32[S, V], md)`. `SamplingMetadata.build(rows, pad_to)` turns each row's
`SamplingParams` and token history into fixed-shape numpy arrays on the host; the only things that
change the compiled program are the shapes (S and the bucketed widths below) and `SamplerFlags`, a
small frozen dataclass stored as a *static* field of the metadata pytree, so it lands in the treedef
and hence the jit cache key of `sample` or of any jitted step that takes `md` as an argument.
Features no row uses are traced out (all-greedy batches do no RNG, no sort, no softmax over V).

Per row, in order (vLLM v1 order):
  1. logit_bias (sparse ids/values) -> min_tokens (stop ids set to -inf while the row has produced
     fewer than min_tokens) -> penalties: repetition on tokens in prompt or output (positive
     logits divided, negative multiplied), then frequency * count + presence * (count > 0)
     subtracted for output tokens only (OpenAI). Counts are built on device by scatter-add
     from -1-padded id arrays: [S, V] int32 twice, fine for S of a few hundred.
  2. greedy rows (temperature == 0) take argmax of these logits, exactly.
  3. others: / temperature -> top-k -> top-p -> min-p -> `jax.random.categorical` (Gumbel-max).
     top-k alone uses `lax.top_k` with a power-of-two k bucket; any top-p needs the whole row
     sorted (`lax.top_k(x, V)`, O(V log V) per row: the most expensive op here, ~the cost of
     one small matmul for V=128k). Ties at a top-k/top-p cutoff are all kept. min-p keeps
     tokens whose probability is >= min_p * the top probability, i.e. exp(x - max) >= min_p.
  4. Logprobs (vLLM v1 default) are log_softmax of the RAW logits, before bias, penalties and
     temperature: the sampled token's logprob, its rank (1 = best) and the top-N (N is 0 or
     MAX_LOGPROBS, one compiled shape; rows slice what they asked for on the host).

Randomness: row key = fold_in(key(seed), number of tokens the row has generated). `key(seed)`
is the threefry2x32 key with data [seed >> 32, seed & 0xffffffff] (seed taken mod 2**64),
which equals `jax.random.PRNGKey(seed)` for 0 <= seed < 2**32. Sampling is row-local, so a seeded
row draws the same tokens whatever else is in the batch and whatever row it sits in. The
engine picks a random seed for requests with `seed=None`, and distinct seeds for n > 1 samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams

_MIN_WIDTH = 8  # smallest bucket for the sparse id arrays and the top-k bucket


def _bucket(n: int) -> int:
    """0 stays 0 (feature off: zero-width arrays); else the next power of two >= max(n, 8)."""
    return 0 if n <= 0 else max(_MIN_WIDTH, 1 << (n - 1).bit_length())


class SamplingRow(NamedTuple):
    """What the runner passes per sampled row (a plain 4-tuple works too)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far; its length is the key's step
    seed: int  # resolved by the engine (never None)


@dataclass(frozen=True)
class SamplerFlags:
    """Static switches (part of the jit cache key); each off means that code is not traced."""

    all_greedy: bool = True
    top_k: int = 0  # 0: no sampled row uses top-k; else a bucket >= the largest row top_k
    top_p: bool = False
    min_p: bool = False
    penalties: bool = False
    logit_bias: bool = False
    min_tokens: bool = False
    num_logprobs: int = 0  # 0 or MAX_LOGPROBS
    logprobs: bool = False  # any row wants its sampled token's logprob (False: skip the [S, V] log_softmax)


@struct.dataclass
class SamplingMetadata:
    """Per-row arrays, S = padded rows. Padding rows are greedy with every feature neutral.

    Width-0 arrays mean the feature is off (its flag is False). Id arrays are -1 padded.
    """

    temperature: jax.Array  # f32[S], 0 = greedy
    top_k: jax.Array  # i32[S], 0 = off
    top_p: jax.Array  # f32[S], 1 = off
    min_p: jax.Array  # f32[S], 0 = off
    presence_penalty: jax.Array  # f32[S]
    frequency_penalty: jax.Array  # f32[S]
    repetition_penalty: jax.Array  # f32[S], 1 = off
    seed: jax.Array  # u32[S, 2], threefry key data [hi, lo] of the row's seed
    step: jax.Array  # i32[S], tokens generated so far (folded into the key)
    prompt_ids: jax.Array  # i32[S, Lp] (Lp = 0 unless flags.penalties)
    output_ids: jax.Array  # i32[S, Lo] (Lo = 0 unless flags.penalties)
    bias_ids: jax.Array  # i32[S, K]
    bias_values: jax.Array  # f32[S, K]
    stop_ids: jax.Array  # i32[S, M]: eos + stop ids to block; all -1 once min_tokens is reached
    flags: SamplerFlags = struct.field(pytree_node=False, default=SamplerFlags())

    @classmethod
    def build(cls, rows: Sequence[SamplingRow | tuple], pad_to: int) -> SamplingMetadata:
        """Host-side numpy build from (params, prompt_ids, output_ids, seed) rows, padded to `pad_to`.

        Called every step for every sampled row, so the per-row Python is one cached tuple of the
        row's scalar parameters (`SamplingParams.sampler_row`), its output length and its seed; the
        columns, the flags and the padding are numpy. Token-list features (penalties, logit_bias,
        min_tokens) walk their rows only when some row uses them."""
        n = len(rows)
        if n > pad_to:
            raise ValueError(f"pad_to ({pad_to}) must be >= the number of rows ({n})")
        params = [r[0] for r in rows]
        # (temperature, top_k, top_p, min_p, presence, frequency, repetition, min_tokens, logprobs, has_bias)
        stat = np.zeros((pad_to, 10), np.float64)
        stat[:, 2] = stat[:, 6] = 1.0  # padding rows: greedy, every feature neutral
        stat[:, 8] = -1.0
        if n:
            stat[:n] = [p.sampler_row for p in params]
        out_len = np.zeros(pad_to, np.int64)
        out_len[:n] = [len(r[2]) for r in rows]
        sampled = stat[:n, 0] > 0
        mt_rows = np.flatnonzero(out_len[:n] < stat[:n, 7])  # still under min_tokens: stop ids blocked
        stops = [[] for _ in range(n)]
        for i in mt_rows:
            p = params[i]
            stops[i] = sorted(set(p.all_stop_token_ids) | set(p.stop_token_ids))  # engine params hold both
        penalties = bool(n) and bool(((stat[:n, 4] != 0) | (stat[:n, 5] != 0) | (stat[:n, 6] != 1)).any())
        flags = SamplerFlags(
            all_greedy=not sampled.any(),
            top_k=_bucket(int(stat[:n, 1][sampled].max(initial=0))),
            top_p=bool((stat[:n, 2][sampled] < 1.0).any()),
            min_p=bool((stat[:n, 3][sampled] > 0.0).any()),
            penalties=penalties,
            logit_bias=bool(stat[:n, 9].any()),
            min_tokens=any(stops),
            num_logprobs=MAX_LOGPROBS if (stat[:n, 8] > 0).any() else 0,
            logprobs=bool((stat[:n, 8] >= 0).any()),
        )

        def ragged(lists, width, dtype=np.int32, fill=-1):  # (S, width), -1 padded
            out = np.full((pad_to, width), fill, dtype)
            for i, xs in enumerate(lists if width else []):  # width 0: feature off
                out[i, :len(xs)] = xs
            return out

        seeds = np.zeros(pad_to, np.uint64)
        seeds[:n] = [r[3] % (1 << 64) for r in rows]
        seed = np.stack([seeds >> np.uint64(32), seeds & np.uint64(0xFFFFFFFF)], axis=1).astype(np.uint32)
        lp = _bucket(max((len(r[1]) for r in rows), default=0)) if penalties else 0
        lo = _bucket(int(out_len.max(initial=0))) if penalties else 0
        if flags.logit_bias:
            biases = [sorted((p.logit_bias or {}).items()) for p in params]
            k = _bucket(max(map(len, biases), default=0))
        else:
            biases, k = [], 0
        f32 = np.float32
        return cls(
            temperature=stat[:, 0].astype(f32), top_k=stat[:, 1].astype(np.int32), top_p=stat[:, 2].astype(f32),
            min_p=stat[:, 3].astype(f32), presence_penalty=stat[:, 4].astype(f32),
            frequency_penalty=stat[:, 5].astype(f32), repetition_penalty=stat[:, 6].astype(f32),
            seed=seed,
            step=out_len.astype(np.int32),
            prompt_ids=ragged([r[1] for r in rows], lp),
            output_ids=ragged([r[2] for r in rows], lo),
            bias_ids=ragged([[t for t, _ in b] for b in biases], k),
            bias_values=ragged([[v for _, v in b] for b in biases], k, np.float32, 0.0),
            stop_ids=ragged(stops, _bucket(max(map(len, stops), default=0))),
            flags=flags,
        )


@struct.dataclass
class SamplerOutput:
    token_ids: jax.Array  # i32[S]
    logprob: jax.Array  # f32[S], raw-logits logprob of the sampled token
    top_ids: jax.Array  # i32[S, N], N = flags.num_logprobs
    top_logprobs: jax.Array  # f32[S, N]
    ranks: jax.Array  # i32[S], rank of the sampled token among raw logprobs (1 = best)


def _ids_or_drop(ids: jax.Array, v: int) -> jax.Array:
    """-1 padding -> v (out of range), so scatters with mode='drop' skip it (jnp wraps negatives)."""
    return jnp.where(ids < 0, v, ids)


def _counts(ids: jax.Array, v: int) -> jax.Array:
    """i32[S, L] ids (-1 padded) -> i32[S, V] occurrence counts, by scatter-add."""
    rows = jnp.arange(ids.shape[0])[:, None]  # (S, 1)
    return jnp.zeros((ids.shape[0], v), jnp.int32).at[rows, _ids_or_drop(ids, v)].add(1, mode="drop")


def process_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Step 1 of the note: logit_bias, min_tokens mask, penalties. f32[S, V] -> f32[S, V]."""
    f, (s, v) = md.flags, logits.shape
    x = jnp.asarray(logits, jnp.float32)
    rows = jnp.arange(s)[:, None]  # (S, 1)
    if f.logit_bias:
        x = x.at[rows, _ids_or_drop(md.bias_ids, v)].add(md.bias_values, mode="drop")
    if f.min_tokens:
        x = x.at[rows, _ids_or_drop(md.stop_ids, v)].set(-jnp.inf, mode="drop")
    if f.penalties:
        out = _counts(md.output_ids, v)  # (S, V)
        seen = (out + _counts(md.prompt_ids, v)) > 0
        r = md.repetition_penalty[:, None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        x = x - md.frequency_penalty[:, None] * out - md.presence_penalty[:, None] * (out > 0)
    return x


def _truncate(x: jax.Array, md: SamplingMetadata) -> jax.Array:
    """top-k -> top-p -> min-p on temperature-scaled logits: excluded tokens become -inf."""
    f, v = md.flags, x.shape[1]
    if f.top_k or f.top_p:
        n = v if f.top_p else min(f.top_k, v)  # static; n = V is a full per-row sort
        vals = lax.top_k(x, n)[0]  # (S, n) descending
        if f.top_k:
            on = ((md.top_k > 0) & (md.top_k < v))[:, None]  # (S, 1); top_k <= n when on
            kth = jnp.take_along_axis(vals, jnp.clip(md.top_k - 1, 0, n - 1)[:, None], axis=1)
            kth = jnp.where(on, kth, -jnp.inf)  # (S, 1)
            vals = jnp.where(vals < kth, -jnp.inf, vals)
            x = jnp.where(x < kth, -jnp.inf, x)
        if f.top_p:
            probs = jax.nn.softmax(vals, axis=-1)  # (S, V) sorted
            ahead = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
            p = md.top_p[:, None]
            # p >= 1 keeps all: the float cumsum can reach 1.0 before the tail ends.
            n_keep = jnp.sum((ahead < p) | (p >= 1.0), axis=-1)  # (S,) >= 1: the best has 0 ahead
            cut = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=1)  # (S, 1)
            x = jnp.where(x < cut, -jnp.inf, x)
    if f.min_p:
        top = jnp.max(x, axis=-1, keepdims=True)  # (S, 1)
        x = jnp.where(jnp.exp(x - top) < md.min_p[:, None], -jnp.inf, x)
    return x


def row_keys(md: SamplingMetadata) -> jax.Array:
    """Per-row typed keys: fold_in(key(seed), step)."""
    base = jax.random.wrap_key_data(md.seed, impl="threefry2x32")  # (S,) keys
    return jax.vmap(jax.random.fold_in)(base, md.step)


@jax.jit
def sample(logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """Sample one token per row. logits f32[S, V] (any float dtype), md built for the same S.

    Compiles once per (S, V, array widths, md.flags).
    """
    f = md.flags
    x = process_logits(logits, md)
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)  # (S,) greedy rows: exact argmax
    if not f.all_greedy:
        greedy = md.temperature <= 0.0
        t = jnp.where(greedy, 1.0, md.temperature)[:, None]  # (S, 1), no 0-division
        y = _truncate(x / t, md)
        drawn = jax.vmap(jax.random.categorical)(row_keys(md), y).astype(jnp.int32)  # (S,)
        tokens = jnp.where(greedy, tokens, drawn)

    if not f.logprobs:  # nobody asked: no log_softmax over the vocabulary on the hot path
        zero = jnp.zeros(tokens.shape, jnp.float32)
        return SamplerOutput(token_ids=tokens, logprob=zero, top_ids=jnp.zeros((tokens.shape[0], 0), jnp.int32),
                             top_logprobs=jnp.zeros((tokens.shape[0], 0), jnp.float32),
                             ranks=jnp.zeros(tokens.shape, jnp.int32))
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (S, V) raw-logit logprobs
    tok_lp = jnp.take_along_axis(lp, tokens[:, None], axis=1)  # (S, 1)
    ranks = 1 + jnp.sum(lp > tok_lp, axis=-1, dtype=jnp.int32)  # (S,)
    top_lp, top_ids = lax.top_k(lp, f.num_logprobs)  # (S, N)
    return SamplerOutput(token_ids=tokens, logprob=tok_lp[:, 0], top_ids=top_ids.astype(jnp.int32),
                         top_logprobs=top_lp, ranks=ranks)
