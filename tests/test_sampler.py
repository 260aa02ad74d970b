"""jaxserve.sampler vs independent numpy (float64) references. CPU; seeded, so not flaky."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, example, given, settings, strategies as st
from scipy import stats

from jaxserve.sampler import (SamplerFlags, SamplingMetadata, SamplingRow, _truncate, process_logits,
                              row_keys, sample)
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams as SP

EOS = 3


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_allowed(logits, t, k, p, min_p):
    """numpy reference: mask after temperature -> top-k -> top-p -> min-p, and the final distribution."""
    x = np.asarray(logits, np.float64) / t
    keep = np.ones(x.shape, bool)
    if 0 < k < x.size:  # top_k >= V is no limit
        keep &= x >= np.sort(x)[::-1][k - 1]
    if p < 1.0:
        probs = softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-probs, kind="stable")
        ahead = np.cumsum(probs[order]) - probs[order]
        in_p = np.zeros_like(keep)
        in_p[order[ahead < p]] = True
        keep &= in_p
    if min_p > 0.0:
        probs = softmax(np.where(keep, x, -np.inf))
        keep &= probs >= min_p * probs.max()
    return keep, softmax(np.where(keep, x, -np.inf))


def rows_of(params_list, seeds=None, prompt=(), output=()):
    seeds = range(len(params_list)) if seeds is None else seeds
    return [SamplingRow(p, list(prompt), list(output), s) for p, s in zip(params_list, seeds)]


def test_greedy_rows_are_exact_argmax_when_mixed_with_sampled_rows():
    logits = np.random.default_rng(0).normal(size=(16, 100)).astype(np.float32)
    params = [SP(temperature=0.0) if i % 2 == 0 else SP(temperature=1.3, top_k=7, top_p=0.8)
              for i in range(16)]
    out = sample(logits, SamplingMetadata.build(rows_of(params), 16))
    np.testing.assert_array_equal(np.asarray(out.token_ids)[::2], logits[::2].argmax(-1))
    md = SamplingMetadata.build(rows_of([SP(temperature=0.0)] * 16), 16)
    assert md.flags == SamplerFlags()  # the all-greedy fast path: nothing else traced
    np.testing.assert_array_equal(sample(logits, md).token_ids, logits.argmax(-1))


def _cut_between(values, j):
    """A threshold midway between sorted values j-1 and j, so f32 vs f64 rounding cannot flip it."""
    return float((values[j - 1] + values[j]) / 2)


# (temperature, top_k, which top-p cut (index into sorted cumsum) or None, which min-p cut or None)
CONFIGS = [(1.0, 5, None, None), (0.7, 0, 6, None), (1.5, 0, None, 9), (0.9, 12, 8, None),
           (1.2, 10, 7, 4), (1.0, 0, None, None)]


@pytest.mark.parametrize("t,k,p_cut,m_cut", CONFIGS)
def test_truncation_allowed_set_and_distribution(t, k, p_cut, m_cut):
    v, n = 32, 40_000
    logits = (np.random.default_rng(1).normal(size=v) * 1.5).astype(np.float32)
    # Thresholds from the float64 reference, placed midway between two boundaries.
    top_p = 1.0
    if p_cut:
        keep, probs = ref_allowed(logits, t, k, 1.0, 0.0)
        top_p = _cut_between(np.cumsum(np.sort(probs)[::-1]), p_cut)
    min_p = 0.0
    if m_cut:
        keep, probs = ref_allowed(logits, t, k, top_p, 0.0)
        ratios = np.sort(probs[keep])[::-1] / probs.max()
        min_p = _cut_between(ratios, m_cut)
    keep, ref = ref_allowed(logits, t, k, top_p, min_p)

    params = SP(temperature=t, top_k=k, top_p=top_p, min_p=min_p)
    md = SamplingMetadata.build(rows_of([params] * n, seeds=range(1000, 1000 + n)), n)
    tiled = np.broadcast_to(logits, (n, v))
    # Zero mass outside the allowed set: the truncated logits are -inf exactly there.
    masked = np.asarray(_truncate(jnp.asarray(tiled[:1]) / t, md.replace(
        top_k=md.top_k[:1], top_p=md.top_p[:1], min_p=md.min_p[:1])))
    np.testing.assert_array_equal(np.isfinite(masked[0]), keep)

    counts = np.bincount(np.asarray(sample(tiled, md).token_ids), minlength=v)
    assert not counts[~keep].any(), "sampled a token outside the allowed set"
    assert (counts[ref > 10 / n] > 0).all(), "an allowed token was never sampled"
    assert 0.5 * np.abs(counts / n - ref).sum() < 0.02  # total variation
    big = ref * n >= 5  # chi-square on bins with enough expected count, rest lumped
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(ref[big], ref[~big].sum()) * n
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp).pvalue > 1e-3


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0.3, 2.0), st.sampled_from([0, 0, 1, 3, 20, 40, 100]),
                          st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
                          st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.3])), min_size=4, max_size=4),
       st.integers(0, 2**31 - 1))
# Rows without top-k beside a top-k row, no top-p: the lax.top_k bucket path must leave them alone.
@example([(1.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (1.0, 1, 1.0, 0.0)], 0)
def test_truncation_mask_matches_reference_property(row_params, data_seed):
    v = 48
    logits = (np.random.default_rng(data_seed).normal(size=(4, v)) * 2).astype(np.float32)
    for (t, k, p, m), row in zip(row_params, logits):  # keep thresholds off float boundaries
        probs = np.sort(ref_allowed(row, t, k, 1.0, 0.0)[1])[::-1]
        assume(p == 1.0 or np.abs(np.cumsum(probs) - probs - p).min() > 1e-4)
        keep, probs = ref_allowed(row, t, k, p, 0.0)
        assume(m == 0.0 or np.abs(probs[keep] / probs.max() - m).min() > 1e-4)
    params = [SP(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in row_params]
    md = SamplingMetadata.build(rows_of(params), 4)
    masked = np.asarray(_truncate(jnp.asarray(logits) / md.temperature[:, None], md))
    for i, (t, k, p, m) in enumerate(row_params):
        np.testing.assert_array_equal(np.isfinite(masked[i]), ref_allowed(logits[i], t, k, p, m)[0])


def test_penalties_change_logits_as_hand_computed():
    logits = np.array([[2.0, -1.0, 0.5, -2.0, 3.0, 1.0]] * 3, np.float32)
    rows = [SamplingRow(SP(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
                        [0, 1], [1, 2, 2], 0),
            SamplingRow(SP(frequency_penalty=1.0, presence_penalty=1.0), [4], [5], 0),  # prompt: no
            SamplingRow(SP(), [0, 1, 2], [4, 5], 0)]  # neutral row unchanged
    got = np.asarray(process_logits(logits, SamplingMetadata.build(rows, 3)))
    want = np.array([[2 / 2, -1 * 2 - 0.5 - 0.25, 0.5 / 2 - 2 * 0.5 - 0.25, -2.0, 3.0, 1.0],
                     [2.0, -1.0, 0.5, -2.0, 3.0, 1.0 - 1.0 - 1.0],
                     [2.0, -1.0, 0.5, -2.0, 3.0, 1.0]], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_logit_bias_adds_and_steers_sampling():
    v = 10
    logits = np.zeros((3, v), np.float32)
    params = [SP(temperature=0.0, logit_bias={7: 5.0, 2: -1.5}),
              SP(temperature=1.0, logit_bias={v - 1: 100.0}),  # the last id: not confused with -1 padding
              SP(temperature=0.0)]
    md = SamplingMetadata.build(rows_of(params), 3)
    assert md.flags.logit_bias and md.bias_ids.shape == (3, 8)
    want = np.zeros((3, v), np.float32)
    want[0, 7], want[0, 2], want[1, v - 1] = 5.0, -1.5, 100.0
    np.testing.assert_array_equal(process_logits(logits, md), want)
    np.testing.assert_array_equal(sample(logits, md).token_ids, [7, v - 1, 0])


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    v = 8
    logits = np.tile(np.arange(v, dtype=np.float32), (4, 1))
    logits[:, EOS] = 50.0  # eos is by far the best token
    blocked = SP(temperature=0.0, min_tokens=3, stop_token_ids=[7], all_stop_token_ids={EOS})
    sampled = SP(temperature=1.0, min_tokens=3, all_stop_token_ids={EOS})
    rows = [SamplingRow(blocked, [1], [5, 5], 0),  # 2 < 3 generated: eos and 7 blocked -> 6
            SamplingRow(blocked, [1], [5, 5, 5], 0),  # reached: eos allowed
            SamplingRow(sampled, [1], [], 0), SamplingRow(SP(temperature=0.0), [1], [], 0)]
    md = SamplingMetadata.build(rows, 4)
    assert md.flags.min_tokens
    np.testing.assert_array_equal(md.stop_ids[:, :2], [[EOS, 7], [-1, -1], [EOS, -1], [-1, -1]])
    np.testing.assert_array_equal(np.asarray(sample(logits, md).token_ids)[[0, 1, 3]], [6, EOS, EOS])
    n = 2000
    md = SamplingMetadata.build(rows_of([sampled] * n, prompt=[1]), n)
    assert EOS not in np.asarray(sample(np.broadcast_to(logits[0], (n, v)), md).token_ids)


def test_row_key_is_fold_in_of_prngkey_seed_and_step():
    seeds, steps = [0, 7, 2**32 - 1, 123456], [0, 3, 11, 0]
    rows = [SamplingRow(SP(), [], [0] * n, s) for s, n in zip(seeds, steps)]
    got = jax.random.key_data(row_keys(SamplingMetadata.build(rows, 4)))
    for i, (s, n) in enumerate(zip(seeds, steps)):
        np.testing.assert_array_equal(got[i], jax.random.fold_in(jax.random.PRNGKey(s), n))
    # 64-bit seeds stay distinct from their low 32 bits.
    big = SamplingMetadata.build([SamplingRow(SP(), [], [], 5 + 2**40), SamplingRow(SP(), [], [], 5)], 2)
    assert not np.array_equal(*jax.random.key_data(row_keys(big)))


def test_seeded_row_same_tokens_alone_and_in_mixed_batch():
    v = 64
    rng = np.random.default_rng(3)
    mine = SP(temperature=0.8, top_p=0.9, seed=1234)
    others = [SP(temperature=0.0), SP(temperature=1.0, top_k=5, repetition_penalty=1.3, logprobs=5),
              SP(temperature=0.5, min_p=0.1, logit_bias={1: 2.0}), SP(temperature=1.1, min_tokens=4,
                                                                    all_stop_token_ids={EOS})]
    out_alone, out_mixed = [], []
    for step in range(12):
        logits = rng.normal(size=(8, v)).astype(np.float32) * 2
        mixed_row = 2 + step % 5  # the row moves around the batch
        alone = sample(logits[mixed_row:mixed_row + 1],
                       SamplingMetadata.build([SamplingRow(mine, [1, 2], out_alone, 1234)], 1))
        rows = [SamplingRow(others[i % 4], [9, 9], [4] * (i + step), 99 + i) for i in range(7)]
        rows.insert(mixed_row, SamplingRow(mine, [1, 2], out_mixed, 1234))
        mixed = sample(logits, SamplingMetadata.build(rows, 8))
        out_alone.append(int(alone.token_ids[0]))
        out_mixed.append(int(mixed.token_ids[mixed_row]))
    assert out_alone == out_mixed
    assert len(set(out_alone)) > 3  # it really sampled


def test_logprobs_and_ranks_are_of_raw_logits():
    v = 200
    logits = np.random.default_rng(4).normal(size=(5, v)).astype(np.float32) * 3
    params = [SP(temperature=0.0, logprobs=3), SP(temperature=1.5, logprobs=20, repetition_penalty=1.5),
              SP(temperature=1.0, logit_bias={17: 30.0}), SP(temperature=0.7, top_k=3, logprobs=0),
              SP(temperature=2.0, presence_penalty=2.0, logprobs=1)]
    out = sample(logits, SamplingMetadata.build(rows_of(params, prompt=[1, 2, 3], output=[5, 6]), 5))
    tok = np.asarray(out.token_ids)
    assert tok[2] == 17  # the bias decided the token, yet its logprob is of the raw logits
    ref = log_softmax(logits)
    np.testing.assert_allclose(out.logprob, ref[np.arange(5), tok], atol=1e-5)
    np.testing.assert_array_equal(out.ranks, 1 + (logits > logits[np.arange(5), tok][:, None]).sum(-1))
    assert out.top_ids.shape == (5, MAX_LOGPROBS)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-ref, axis=-1)[:, :MAX_LOGPROBS], atol=1e-5)
    assert out.ranks[0] == 1


def test_jit_with_padding_rows_and_cache_reuse():
    v = 50
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(8, v)).astype(np.float32)
    rows = [SamplingRow(SP(temperature=0.9, top_p=0.95, frequency_penalty=0.3), [1, 2], [3], 11),
            SamplingRow(SP(temperature=0.0), [4], [], 12), SamplingRow(SP(temperature=1.0), [], [], 13)]
    small = sample(logits[:3], SamplingMetadata.build(rows, 3))
    padded = sample(logits, SamplingMetadata.build(rows, 8))
    np.testing.assert_array_equal(padded.token_ids[:3], small.token_ids)
    np.testing.assert_array_equal(padded.token_ids[3:], logits[3:].argmax(-1))  # padding: greedy
    n = sample._cache_size()
    rows2 = [SamplingRow(SP(temperature=0.5, top_p=0.5, presence_penalty=1.0), [7], [8], 1),
             SamplingRow(SP(temperature=0.0), [3, 3], [], 2)]
    sample(rng.normal(size=(8, v)).astype(np.float32), SamplingMetadata.build(rows2, 8))
    assert sample._cache_size() == n  # same shapes and flags: no recompile
    # A runner's jitted step can take md as a plain argument: flags ride in the treedef.
    step = jax.jit(lambda x, md: sample(x, md).token_ids)
    np.testing.assert_array_equal(step(logits, SamplingMetadata.build(rows, 8)), padded.token_ids)


def test_build_buckets_flags_and_padding():
    rows = [SamplingRow(SP(temperature=0.0, repetition_penalty=1.1), list(range(9)), [1, 2, 3], 1),
            SamplingRow(SP(temperature=0.0, top_k=3, top_p=0.5, logprobs=2), [1], [], 2)]
    md = SamplingMetadata.build(rows, 4)
    # Greedy rows' top-k/top-p are moot: only penalties and logprobs are switched on.
    assert md.flags == SamplerFlags(all_greedy=True, penalties=True, num_logprobs=MAX_LOGPROBS, logprobs=True)
    assert md.prompt_ids.shape == (4, 16) and md.output_ids.shape == (4, 8)
    assert md.bias_ids.shape == (4, 0) and md.stop_ids.shape == (4, 0)
    np.testing.assert_array_equal(md.prompt_ids[1], [1] + [-1] * 15)
    np.testing.assert_array_equal(md.step, [3, 0, 0, 0])
    np.testing.assert_array_equal(md.temperature[2:], 0.0)
    np.testing.assert_array_equal(md.repetition_penalty, np.float32([1.1, 1.0, 1.0, 1.0]))
    no_pen = SamplingMetadata.build([SamplingRow(SP(top_k=50), list(range(100)), [1], 3)], 2)
    assert no_pen.flags.top_k == 64 and no_pen.prompt_ids.shape == (2, 0)
    with pytest.raises(ValueError, match="pad_to"):
        SamplingMetadata.build(rows, 1)
