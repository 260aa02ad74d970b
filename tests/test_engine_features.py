"""Sampling features end to end on SmolLM2 (the shared engine of conftest): seeds, n > 1, stop strings and
ids, max_tokens, logprobs and prompt logprobs against HF's logits, the offline LLM's API, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_greedy_equal, assert_idle, drive, new_id

from jaxserve.sampling_params import SamplingParams


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ids(smol_ref, name) -> dict:
    return {"prompt_token_ids": smol_ref[name]["prompt_ids"]}


# ------------------------------------------------------------------------------------------------ seeds
def test_seeded_sampling_is_batch_independent(smol_llm, smol_ref):
    sp = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    a = smol_llm.generate(ids(smol_ref, "plain"), sp, use_tqdm=False)[0].outputs[0].token_ids
    b = smol_llm.generate(ids(smol_ref, "plain"), sp, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and len(a) == 16
    others = [SamplingParams(temperature=1.0, seed=7, max_tokens=16), SamplingParams(temperature=1.0, max_tokens=9),
              SamplingParams(temperature=0, max_tokens=12)]
    prompts = [ids(smol_ref, n) for n in ("code", "chinese", "chat_france")]
    outs = smol_llm.generate(prompts[:2] + [ids(smol_ref, "plain")] + prompts[2:], others[:2] + [sp] + others[2:],
                             use_tqdm=False)
    assert outs[2].outputs[0].token_ids == a
    c = smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(temperature=0.8, top_p=0.95, seed=4321,
                                                                 max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert c[0].outputs[0].token_ids != a  # another seed: another draw (16 tokens at T=0.8 never all agree)


# ---------------------------------------------------------------------------------------------- n > 1
def test_n_samples_share_prompt_blocks(smol_engine, smol_ref):
    """n=3 over a 20-token prompt: block 0 (full) stays shared; block 1 (partial, written by every sample)
    is copied on write for two of them, the last writer keeps the original: 4 blocks, not 6."""
    rid = new_id("n3")
    seen = []

    def on_step(engine, step, so):
        reqs = [r for r in engine.scheduler.requests.values() if r.request_id.split("#")[0] == rid]
        if len(reqs) == 3 and all(len(r.block_ids) == 2 and r.num_computed_tokens > 20 for r in reqs):
            bm = engine.block_manager
            assert len({r.block_ids[0] for r in reqs}) == 1 and bm.ref_counts[reqs[0].block_ids[0]] == 3
            assert len({r.block_ids[1] for r in reqs}) == 3
            assert sum(1 for c in bm.ref_counts if c) == 4
            assert bm.num_allocatable_blocks - bm.num_free_blocks == 4
            seen.append(step)

    sp = SamplingParams(n=3, temperature=1.0, seed=99, max_tokens=10, ignore_eos=True)
    out = drive(smol_engine, {0: [(rid, ids(smol_ref, "plain"), sp)]}, on_step=on_step)[rid]
    assert seen, "never saw the 3 samples running together"
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # 3 seeds, 10 tokens at T=1: they differ
    assert_idle(smol_engine)


def test_n_samples_greedy_all_equal_reference(smol_llm, smol_ref):
    out = smol_llm.generate(ids(smol_ref, "code"), SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True),
                            use_tqdm=False)[0]
    p = smol_ref["code"]
    for c in out.outputs:
        assert_greedy_equal(c.token_ids, p["greedy_ids"], p["greedy_margin"], "n=2 greedy")


# ------------------------------------------------------------------------------------------ stopping
# Greedy text of "plain": " there lived a fox named Felix.\n\nFelix was a very smart fox. He had a big ..."
@pytest.mark.parametrize("stop, include, want_text, want_reason", [
    (["fox"], False, " there lived a ", "fox"),
    (["fox"], True, " there lived a fox", "fox"),
    (["ed a f"], False, " there liv", "ed a f"),  # spans three tokens: " lived", " a", " fox"
    (["Felix", "lived"], False, " there ", "lived"),  # the earliest stop wins, not the first listed
    (["\n\nFelix was"], True, " there lived a fox named Felix.\n\nFelix was", "\n\nFelix was"),
])
def test_stop_strings(smol_llm, smol_ref, stop, include, want_text, want_reason):
    sp = SamplingParams(temperature=0, max_tokens=32, stop=stop, include_stop_str_in_output=include)
    c = smol_llm.generate(ids(smol_ref, "plain"), sp, use_tqdm=False)[0].outputs[0]
    assert c.text == want_text
    assert c.finish_reason == "stop" and c.stop_reason == want_reason
    if not include:
        assert all(s not in c.text for s in stop)
    # generation stopped at the token completing the stop string
    full = smol_llm.get_tokenizer().decode(c.token_ids)
    assert want_reason in full and want_reason not in smol_llm.get_tokenizer().decode(c.token_ids[:-1])


def test_stop_string_absent_keeps_full_text(smol_llm, smol_ref):
    c = smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(temperature=0, max_tokens=32, stop=["zebra"]),
                          use_tqdm=False)[0].outputs[0]
    assert c.text == smol_ref["plain"]["greedy_text"] and c.finish_reason == "length" and c.stop_reason is None


def test_stop_token_ids(smol_llm, smol_ref):
    want = smol_ref["plain"]["greedy_ids"]  # [665 ' there', 4161 ' lived', 253 ' a', 16438 ' fox', ...]
    c = smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[16438]),
                          use_tqdm=False)[0].outputs[0]
    assert c.token_ids == want[:4]  # the stop id is the last token, as vLLM
    assert c.finish_reason == "stop" and c.stop_reason == 16438
    assert c.text == " there lived a"  # ... but its text is not (include_stop_str_in_output=False)


def test_max_tokens_finish_reason_length(smol_llm, smol_ref):
    c = smol_llm.generate(ids(smol_ref, "code"), SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert c.outputs[0].token_ids == smol_ref["code"]["greedy_ids"][:5]
    assert c.outputs[0].finish_reason == "length" and c.outputs[0].stop_reason is None and c.finished


# ------------------------------------------------------------------------------------------- logprobs
def test_logprobs_match_hf(smol_llm, smol_ref):
    """The first generated token's logprob and top-5 come from the last prompt position's logits: HF's."""
    names = list(smol_ref)
    sp = SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True)
    outs = smol_llm.generate([ids(smol_ref, n) for n in names], sp, use_tqdm=False)
    tok = smol_llm.get_tokenizer()
    for name, o in zip(names, outs):
        c = o.outputs[0]
        ref_lp = log_softmax(smol_ref[name]["last_logits"][-1])
        first = c.token_ids[0]
        assert first == smol_ref[name]["greedy_ids"][0]
        d = c.logprobs[0]
        assert abs(d[first].logprob - ref_lp[first]) < 1e-3 and d[first].rank == 1
        top5 = np.argsort(-ref_lp)[:5]
        assert set(d) == set(top5.tolist())
        for r, t in enumerate(top5, 1):
            assert abs(d[int(t)].logprob - ref_lp[t]) < 1e-3 and d[int(t)].rank == r
            assert d[int(t)].decoded_token == tok.decode([int(t)], skip_special_tokens=False)
        assert len(c.logprobs) == 3 and all(c.logprobs[i][c.token_ids[i]].rank == 1 for i in range(3))
        assert abs(c.cumulative_logprob - sum(c.logprobs[i][c.token_ids[i]].logprob for i in range(3))) < 1e-5


def check_plain_prompt_logprobs(plp, p) -> None:
    """prompt_logprobs=1 of the "plain" prompt against HF: argmax at every position, values at the last 3."""
    prompt = p["prompt_ids"]
    assert len(plp) == len(prompt) and plp[0] is None
    for pos in range(1, len(prompt)):
        d = plp[pos]
        assert prompt[pos] in d  # the actual prompt token, with its rank
        top1 = [t for t, lp in d.items() if lp.rank == 1]
        assert top1 == [int(p["argmax"][pos - 1])], f"position {pos}"  # logits at pos-1 predict pos
        assert len(d) == (1 if prompt[pos] == top1[0] else 2)
    L = len(prompt)
    for j in range(3):  # last_logits rows are positions L-4..L-1; rows 0..2 predict tokens L-3..L-1
        ref_lp = log_softmax(p["last_logits"][j])
        pos = L - 3 + j
        assert abs(plp[pos][prompt[pos]].logprob - ref_lp[prompt[pos]]) < 1e-3
        assert plp[pos][prompt[pos]].rank == 1 + int((ref_lp > ref_lp[prompt[pos]]).sum())


def test_prompt_logprobs_match_hf(smol_llm, smol_ref):
    """Also when the prompt's first block is in the prefix cache (cached positions have no logits: such a
    request must not read the cache)."""
    p = smol_ref["plain"]  # 20 tokens: one 32-token step computes all prompt logits
    smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # cache it
    o = smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1),
                          use_tqdm=False)[0]
    check_plain_prompt_logprobs(o.prompt_logprobs, p)
    assert o.num_cached_tokens == 0
    assert o.outputs[0].token_ids == p["greedy_ids"][:2]


def test_prompt_logprobs_after_preemption(smol_engine, smol_ref):
    """A recompute preemption computes the prompt again: its logprobs replace the first ones, not add to them."""
    from jaxserve.scheduler_output import SchedulerOutput
    p = smol_ref["plain"]
    rid = new_id("plp")
    preempted = []

    def on_step(engine, step, so):
        req = engine.scheduler.requests.get(rid)
        if req is not None and req.num_output_tokens == 1 and not preempted:
            assert engine.scheduler.running == [req]
            engine.scheduler._preempt(SchedulerOutput())  # what running out of blocks does (no swap space)
            preempted.append(req.num_computed_tokens)

    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    o = drive(smol_engine, {0: [(rid, ids(smol_ref, "plain"), sp)]}, on_step=on_step)[rid]
    assert preempted == [0]
    check_plain_prompt_logprobs(o.prompt_logprobs, p)
    assert o.outputs[0].token_ids == p["greedy_ids"][:4]
    assert_idle(smol_engine)


# ---------------------------------------------------------------------------------------------- the API
def test_founding_doc_example(smol_llm):
    outs = smol_llm.generate(["AI 的未来发展"])
    assert len(outs) == 1 and outs[0].prompt == "AI 的未来发展" and outs[0].finished
    c = outs[0].outputs[0]
    assert 1 <= len(c.token_ids) <= 16 and c.finish_reason in ("stop", "length") and isinstance(c.text, str)


def test_generate_preserves_input_order(smol_llm):
    prompts = ["Hello, my name is", "The capital of Italy is", "1, 2, 3,"]
    lens = [12, 5, 1]  # finish in reverse order
    sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    outs = smol_llm.generate(prompts, sps, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == lens


def test_token_id_prompt_forms(smol_llm, smol_ref):
    p = smol_ref["code"]
    sp = SamplingParams(temperature=0, max_tokens=6)
    one = smol_llm.generate(p["prompt_ids"], sp, use_tqdm=False)  # a bare list of ids is one prompt
    many = smol_llm.generate([p["prompt_ids"], smol_ref["plain"]["prompt_ids"]], sp, use_tqdm=False)
    text = smol_llm.generate(smol_ref["code"]["text"], sp, use_tqdm=False)
    assert len(one) == 1 and len(many) == 2
    assert one[0].prompt is None and one[0].prompt_token_ids == p["prompt_ids"]
    assert text[0].prompt_token_ids == p["prompt_ids"]  # the text tokenizes to the reference ids
    for o in (one[0], many[0], text[0]):
        assert o.outputs[0].token_ids == p["greedy_ids"][:6]
    assert many[1].outputs[0].token_ids == smol_ref["plain"]["greedy_ids"][:6]


@pytest.mark.parametrize("prompt, match", [
    ("", "empty"),
    ([], "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ([1] * 128, "max_model_len"),  # max_model_len is 128: no room for an output token
    ([1, 2, 49152], r"\[0, 49152\)"),
    ([1, -3], r"\[0, 49152\)"),
    ([1, 2.5], "token ids"),
])
def test_bad_input_is_value_error_and_leaks_nothing(smol_llm, smol_engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        smol_llm.generate(prompt if not isinstance(prompt, list) else [prompt], use_tqdm=False)
    assert_idle(smol_engine)


def test_bad_max_tokens_for_context(smol_llm, smol_engine, smol_ref):
    with pytest.raises(ValueError, match="max_tokens"):
        smol_llm.generate(ids(smol_ref, "plain"), SamplingParams(max_tokens=120), use_tqdm=False)
    assert_idle(smol_engine)


def test_bad_prompt_in_a_batch_leaks_nothing(smol_llm, smol_engine, smol_ref):
    """The good prompts queued before the bad one must not stay behind in the engine."""
    with pytest.raises(ValueError):
        smol_llm.generate([ids(smol_ref, "plain"), [1, 2, 10**6]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert_idle(smol_engine)
    out = smol_llm.generate(ids(smol_ref, "code"), SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert out[0].outputs[0].token_ids == smol_ref["code"]["greedy_ids"][:3]
