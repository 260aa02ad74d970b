"""The engine on SmolLM2 (LLMEngine.add_request/step): batching, prefix caching, chunked prefill,
preemption (recompute and swap), aborts. Greedy tokens are compared with HF's greedy references, or
with the same request run alone in the engine (no prefix cache), up to the first near-tie (conftest).

All engines have the shapes of conftest.SMOL_FLAGS: 32-token budget, 8 sequences, 128-token context,
23 usable KV blocks of 16 tokens.
"""
from __future__ import annotations

import numpy as np
from conftest import assert_greedy_equal, assert_idle, drive, margins_of, new_id, run_alone

from jaxserve.request import RequestStatus
from jaxserve.sampling_params import SamplingParams


def greedy(max_tokens=32, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def random_prompt(seed: int, n: int) -> list[int]:
    """Deterministic token-id prompt (SmolLM2's vocab is 49152; ids below 1000 are common pieces)."""
    return [1] + np.random.default_rng(seed).integers(200, 20000, n - 1).tolist()


def check_vs_hf(outs: dict, ids_by_rid: dict, smol_ref) -> None:
    for rid, name in ids_by_rid.items():
        p = smol_ref[name]
        assert_greedy_equal(outs[rid].outputs[0].token_ids, p["greedy_ids"], p["greedy_margin"], f"{rid} ({name})")


# ------------------------------------------------------------------------------------------- batching
def test_staggered_batch_equals_hf(smol_engine, smol_ref):
    """Prompts of 11..37 tokens arriving at steps 0, 1, 4, 9: decodes, prefill chunks and admissions mix."""
    names = ["chat_france", "plain", "code", "chinese"]
    rids = {new_id(n): n for n in names}
    arrivals = {}
    for (rid, name), step in zip(rids.items(), (0, 1, 4, 9)):
        arrivals[step] = [(rid, {"prompt_token_ids": smol_ref[name]["prompt_ids"]}, greedy())]
    mixed = []
    before = dict(smol_engine.phases.seconds)
    outs = drive(smol_engine, arrivals, on_step=lambda e, i, so: mixed.append(
        so is not None and len({s.num_new_tokens > 1 for s in so.scheduled}) == 2))
    assert any(mixed), "no step mixed a prefill with decodes"
    check_vs_hf(outs, rids, smol_ref)
    for rid in rids:
        assert len(outs[rid].outputs[0].token_ids) == 32
    assert_idle(smol_engine)
    # the steps' host phases were timed (the engine process's busy-period log line reads them)
    for phase in ("schedule", "prepare", "wait_tokens"):
        assert smol_engine.phases.seconds.get(phase, 0.0) > before.get(phase, 0.0), phase


# ------------------------------------------------------------------------------------- prefix caching
def test_prefix_cache_hits_share_blocks(smol_engine):
    """Three prompts with one 48-token (3-block) prefix: the later two get the first one's blocks."""
    prefix = random_prompt(11, 48)
    prompts = [prefix + random_prompt(100 + i, 8)[1:] for i in range(3)]
    sp = greedy(16)
    alone = [run_alone(smol_engine, p, greedy(16, logprobs=2)).outputs[0] for p in prompts]
    bm = smol_engine.block_manager
    hits0 = bm.prefix_cache_hits
    rids = [new_id("pfx") for _ in prompts]
    checked = []

    def on_step(engine, step, so):
        reqs = [engine.scheduler.requests.get(r) for r in rids]
        if step == 2:  # the 2nd/3rd are admitted at step 2, after the 1st's 3 prefix blocks were cached
            a, b, c = reqs
            assert b.num_cached_tokens == c.num_cached_tokens == 48
            assert a.block_ids[:3] == b.block_ids[:3] == c.block_ids[:3]
            assert all(engine.block_manager.ref_counts[x] == 3 for x in a.block_ids[:3])
            assert not set(a.block_ids[3:]) & set(b.block_ids[3:]) and not set(b.block_ids[3:]) & set(c.block_ids[3:])
            checked.append(True)

    # The 1st prompt (56 tokens) takes 2 steps at a 32-token budget; its first 3 blocks are cached after step 1.
    outs = drive(smol_engine, {0: [(rids[0], prompts[0], sp)], 2: [(r, p, sp) for r, p in zip(rids[1:], prompts[1:])]},
                 on_step=on_step)
    assert checked
    assert bm.prefix_cache_hits - hits0 >= 2 * 48
    for rid, a in zip(rids, alone):
        assert_greedy_equal(outs[rid].outputs[0].token_ids, a.token_ids, margins_of(a), rid)
        assert outs[rid].num_cached_tokens == (0 if rid == rids[0] else 48)
    assert_idle(smol_engine)


# ------------------------------------------------------------------------------------- chunked prefill
def test_chunked_prefill_beside_decodes(smol_engine, smol_ref):
    """A 100-token prompt arrives while two requests decode: it is prefilled in chunks that share the
    32-token budget with the decodes, and every request's tokens equal its solo run."""
    long = random_prompt(7, 100)
    alone_long = run_alone(smol_engine, long, greedy(12, logprobs=2)).outputs[0]
    rids = {new_id("dec"): "plain", new_id("dec"): "code"}
    lid = new_id("long")
    arrivals = {0: [(r, {"prompt_token_ids": smol_ref[n]["prompt_ids"]}, greedy()) for r, n in rids.items()],
                3: [(lid, long, greedy(12))]}
    chunks = []

    def on_step(engine, step, so):
        rows = {s.request.request_id: s.num_new_tokens for s in so.scheduled}
        if lid in rows and rows[lid] > 1:
            chunks.append((rows[lid], sorted(v for k, v in rows.items() if k != lid)))

    outs = drive(smol_engine, arrivals, on_step=on_step)
    assert len(chunks) >= 4 and sum(c for c, _ in chunks) == 100
    assert all(c + sum(d) <= 32 for c, d in chunks) and any(d == [1, 1] for _, d in chunks), chunks
    check_vs_hf(outs, rids, smol_ref)
    assert_greedy_equal(outs[lid].outputs[0].token_ids, alone_long.token_ids, margins_of(alone_long), "long")
    assert_idle(smol_engine)


# ------------------------------------------------------------------------------------------ preemption
STORM = ["plain", "chat_france", "chinese", "code"] * 2  # 8 requests x 48 new tokens: ~36 blocks wanted, 23 exist


def _storm(engine, smol_ref, on_step=None):
    rids = {new_id(f"storm-{n}"): n for n in STORM}
    arrivals = {0: [(r, {"prompt_token_ids": smol_ref[n]["prompt_ids"]}, greedy(48)) for r, n in rids.items()]}
    pre = engine.scheduler.num_preemptions_total
    outs = drive(engine, arrivals, on_step=on_step)
    assert all(len(outs[r].outputs[0].token_ids) == 48 for r in rids)
    check_vs_hf(outs, rids, smol_ref)
    return engine.scheduler.num_preemptions_total - pre


def test_preemption_by_recompute(smol_engine, smol_ref):
    swaps = []
    n = _storm(smol_engine, smol_ref, on_step=lambda e, i, so: swaps.append(bool(so and so.blocks_to_swap_out)))
    print(f"recompute storm: {n} preemptions in {len(swaps)} steps")
    assert n >= 3, f"only {n} preemptions"
    assert not any(swaps)
    assert_idle(smol_engine)


def test_preemption_by_swap(smol_swap_engine, smol_ref):
    swapped_out, swapped_in = [], []

    def on_step(e, i, so):
        if so is not None:
            swapped_out.extend(so.blocks_to_swap_out)
            swapped_in.extend(so.blocks_to_swap_in)

    n = _storm(smol_swap_engine, smol_ref, on_step=on_step)
    print(f"swap storm: {n} preemptions, {len(swapped_out)} blocks swapped out")
    assert n >= 1 and swapped_out, (n, len(swapped_out))
    assert len(swapped_in) == len(swapped_out)
    assert_idle(smol_swap_engine)


# ---------------------------------------------------------------------------------------------- aborts
def _step_until(engine, cond, limit=200):
    for _ in range(limit):
        if cond():
            return
        engine.step()
    raise AssertionError("condition never met")


def test_abort_at_each_point_frees_everything(smol_engine, smol_ref):
    e = smol_engine
    sch = e.scheduler
    prompt = {"prompt_token_ids": smol_ref["plain"]["prompt_ids"]}

    # waiting, never scheduled
    rid = new_id("ab")
    e.add_request(rid, prompt, greedy())
    out = e.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert_idle(e)

    # half-way through a chunked prefill
    rid = new_id("ab")
    e.add_request(rid, random_prompt(3, 100), greedy(8))
    e.step()
    assert 0 < sch.requests[rid].num_computed_tokens < 100
    e.abort_request(rid)
    assert_idle(e)

    # decoding
    rid = new_id("ab")
    e.add_request(rid, prompt, greedy())
    _step_until(e, lambda: sch.requests[rid].num_output_tokens >= 3)
    e.abort_request(rid)
    assert_idle(e)

    # an n > 1 parent whose children have forked and diverged (copy-on-write blocks)
    rid = new_id("ab")
    e.add_request(rid, prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True))
    _step_until(e, lambda: len(sch.requests) == 3 and all(r.num_output_tokens >= 3 for r in sch.requests.values()))
    e.abort_request(rid)
    assert_idle(e)
    # aborting an unknown / finished id is a no-op
    assert e.abort_request(rid) is None
    assert_idle(e)


def test_abort_preempted_requests(smol_engine, smol_swap_engine, smol_ref):
    """Abort requests while they sit preempted (recompute: back in waiting; swap: blocks on the host)."""
    for e, where in ((smol_engine, "waiting"), (smol_swap_engine, "swapped")):
        rids = [new_id("abp") for _ in STORM]
        for r, n in zip(rids, STORM):
            e.add_request(r, {"prompt_token_ids": smol_ref[n]["prompt_ids"]}, greedy(48))
        queue = getattr(e.scheduler, where)
        victims = lambda: [r for r in queue if r.num_preemptions > 0]  # noqa: E731
        _step_until(e, lambda: victims())
        for v in victims():
            if where == "swapped":
                assert e.block_manager.host_tables[v]
            e.abort_request(v.request_id)
        e.step()  # the others go on
        for r in rids:
            e.abort_request(r)
        assert_idle(e)


def test_finish_frees_blocks_and_stop_status(smol_engine, smol_ref):
    """An eos-stopped request (the France answer ends with <|im_end|>) returns all its blocks."""
    rid = new_id("eos")
    outs = drive(smol_engine, {0: [(rid, {"prompt_token_ids": smol_ref["chat_france"]["prompt_ids"]},
                                    SamplingParams(temperature=0, max_tokens=32))]})
    c = outs[rid].outputs[0]
    assert c.token_ids == smol_ref["chat_france"]["greedy_ids"]
    assert c.finish_reason == RequestStatus.FINISHED_STOPPED.value and c.stop_reason is None
    assert_idle(smol_engine)


# ------------------------------------------------------------------------------------------ KV waste
def test_paged_kv_waste_claim():
    """scripts/kv_waste.py on a small ShareGPT-like workload (real Scheduler/BlockManager, fake tokens):
    paged blocks leave < 4% of allocated slots empty, a max-length contiguous reservation > 60%."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("kv_waste", Path(__file__).parents[1] / "scripts" / "kv_waste.py")
    kv_waste = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv_waste)
    r = kv_waste.simulate(kv_waste.workload("sharegpt", 200, seed=0), block_size=16, num_blocks=2048,
                          max_num_seqs=64, budget=512, arrivals_per_step=4)
    w = r["waste"]
    assert w["paged"] < 0.04 and w["max_len"] > 0.6 and w["paged"] < w["oracle"] < w["cap"] < w["max_len"], w
