"""Scheduler in concrete scenarios: budgets, chunking, caps, preemption, swap, rejection, abort (pure Python)."""
import pytest

from jaxserve.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerConfig


def make_request(rid, num_prompt, first=0, **sp):
    return Request(str(rid), list(range(first, first + num_prompt)), SamplingParams(**sp))


def make_scheduler(num_blocks=64, block_size=4, host=0, caching=True, **cfg):
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, caching, host))


def rows(out):
    return [(s.request.request_id, s.num_new_tokens, s.num_samples) for s in out.scheduled]


def step(sched, token=7):
    """One engine step: schedule, run (nothing), advance, append a token to rows that sampled."""
    out = sched.schedule()
    sched.on_step_done(out)
    for s in out.scheduled:
        if s.num_samples:
            s.request.append_token(token)
    return out


def test_chunked_prefill_under_budget_then_decode():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", 20)
    sched.add(a)
    assert rows(step(sched)) == [("a", 8, 0)]
    assert rows(step(sched)) == [("a", 8, 0)]
    sched.add(make_request("b", 6, first=100))
    assert rows(step(sched)) == [("a", 4, 1), ("b", 4, 0)]  # a finishes its prompt, b starts beside it
    assert rows(step(sched)) == [("a", 1, 1), ("b", 2, 1)]
    assert rows(step(sched)) == [("a", 1, 1), ("b", 1, 1)]
    assert a.num_computed_tokens == 22 and a.num_tokens == 23


def test_long_prefill_threshold_leaves_room_for_decodes():
    sched = make_scheduler(max_num_batched_tokens=16, long_prefill_token_threshold=5)
    sched.add(make_request("a", 3))
    step(sched)
    sched.add(make_request("b", 12, first=100))
    sched.add(make_request("c", 12, first=200))
    assert rows(step(sched)) == [("a", 1, 1), ("b", 5, 0), ("c", 5, 0)]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_request(i, 4, first=10 * i))
    assert [r for r, _, _ in rows(step(sched))] == ["0", "1"]
    assert sched.num_running == 2 and sched.num_waiting == 1
    sched.finish(sched.requests["0"], RequestStatus.FINISHED_STOPPED)
    assert rows(step(sched)) == [("1", 1, 1), ("2", 4, 1)]


def test_prefix_hit_at_admission_advances_computed():
    sched = make_scheduler()
    a = make_request("a", 10)
    sched.add(a)
    step(sched)
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    b = make_request("b", 13)  # shares a's first 10 tokens: 2 full blocks cached
    sched.add(b)
    assert rows(step(sched)) == [("b", 5, 1)]
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == [1, 2]
    assert sched.block_manager.prefix_cache_hits == 8


def test_n_parent_samples_n_and_forks_children():
    sched = make_scheduler(max_num_seqs=3)
    p = make_request("p", 6, n=3)
    sched.add(p)
    sched.add(make_request("x", 2, first=50))
    out = sched.schedule()
    assert rows(out) == [("p", 6, 3)]  # p holds 3 seq slots: x must wait
    sched.on_step_done(out)
    p.append_token(1)
    children = []
    for i in (1, 2):
        c = Request(f"p#{i}", p.prompt_token_ids, p.sampling_params, sample_index=i, parent=p)
        c.append_token(1 + i)
        children.append(c)
    sched.fork_children(p, children)
    assert [r.request_id for r in sched.running] == ["p", "p#1", "p#2"]
    assert children[0].block_ids == [1, 2] and sched.block_manager.ref_counts[1:3] == [3, 3]
    out = sched.schedule()
    assert rows(out) == [("p", 1, 1), ("p#1", 1, 1), ("p#2", 1, 1)]
    assert out.blocks_to_copy == [(2, 3), (2, 4)]  # p and p#1 copy; p#2 writes the original in place
    assert [r.block_ids for r in (p, *children)] == [[1, 3], [1, 4], [1, 2]]


def test_preempt_latest_arrival_by_recompute():
    sched = make_scheduler(num_blocks=5, block_size=2, max_model_len=8)  # 4 blocks
    a, b = make_request("a", 4), make_request("b", 3, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)  # a=[1,2] (5 tokens now), b=[3,4] (4 tokens)
    assert (a.block_ids, b.block_ids) == ([1, 2], [3, 4])
    sched.add(make_request("c", 2, first=200))
    out = sched.schedule()  # a needs a 3rd block: b (latest arrival) is preempted; no admissions this step
    assert rows(out) == [("a", 1, 1)] and out.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and [r.request_id for r in sched.waiting] == ["b", "c"]
    assert a.block_ids == [1, 2, 4]  # b's partial block 4 went to the head, its cached 3 to the tail


def test_preempting_self_when_latest():
    sched = make_scheduler(num_blocks=5, block_size=2, max_model_len=8)
    a, b = make_request("a", 4), make_request("b", 4, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)  # both full at 2 blocks each, both need a 3rd
    out = sched.schedule()
    assert rows(out) == [("a", 1, 1)] and out.preempted == [b]


def test_preempt_by_swap_and_swap_back_first():
    sched = make_scheduler(num_blocks=5, block_size=2, host=4, max_model_len=8)
    a, b = make_request("a", 4), make_request("b", 3, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.add(make_request("c", 2, first=200))
    out = step(sched)
    assert out.blocks_to_swap_out == [(3, 0), (4, 1)]
    assert b.status is RequestStatus.SWAPPED and sched.num_swapped == 1 and b.num_computed_tokens == 3
    sched.finish(a, RequestStatus.FINISHED_LENGTH)
    # free list now [4, 3, 2, 1]: a's partial 4 at the head, then b's cached 3, then a's cached 2, 1
    out = step(sched)  # b comes back before c is admitted
    assert out.blocks_to_swap_in == [(0, 4), (1, 3)]
    assert rows(out) == [("b", 1, 1), ("c", 2, 1)]
    assert b.block_ids == [4, 3] and sched.block_manager.num_free_host_blocks == 4


def test_swap_falls_back_to_recompute_without_host_room():
    sched = make_scheduler(num_blocks=5, block_size=2, host=1, max_model_len=8)
    a, b = make_request("a", 4), make_request("b", 3, first=100)
    sched.add(a)
    sched.add(b)
    step(sched)
    out = sched.schedule()
    assert out.blocks_to_swap_out == [] and b.status is RequestStatus.WAITING


def test_never_fitting_request_rejected_with_numbers():
    sched = make_scheduler(num_blocks=5, block_size=4, max_model_len=100)  # 4 blocks = 16 tokens
    with pytest.raises(ValueError, match=r"needs 5 KV blocks \(20 tokens of 4\).*only 4"):
        sched.add(make_request("a", 10, max_tokens=10))
    sched.add(make_request("b", 10, max_tokens=6))  # exactly 16 tokens fits
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_request("b", 1))
    with pytest.raises(ValueError, match="n=3"):
        make_scheduler(max_num_seqs=2).add(make_request("c", 1, n=3))
    # max_tokens=None is bounded by max_model_len
    with pytest.raises(ValueError, match="needs 25 KV blocks"):
        sched.add(make_request("d", 4, max_tokens=None))


@pytest.mark.parametrize("where", ["waiting", "running", "swapped"])
def test_abort_frees_blocks_in_every_state(where):
    sched = make_scheduler(num_blocks=5, block_size=2, host=4, max_model_len=8)
    a, b = make_request("a", 4), make_request("b", 3, first=100)
    sched.add(a)
    sched.add(b)
    if where != "waiting":
        step(sched)
    if where == "swapped":
        step(sched)
        assert b.status is RequestStatus.SWAPPED
    assert sched.abort("b") is b
    assert b.status is RequestStatus.FINISHED_ABORTED and b.block_ids == []
    assert sched.num_waiting + sched.num_running + sched.num_swapped == 1
    bm = sched.block_manager
    assert bm.num_free_blocks + len(a.block_ids) == 4 and bm.num_free_host_blocks == 4
    assert sched.abort("b") is None  # already gone: no-op


def test_abort_parent_aborts_children():
    sched = make_scheduler()
    p = make_request("p", 4, n=2)
    sched.add(p)
    step(sched)
    c = Request("p#1", p.prompt_token_ids, p.sampling_params, sample_index=1, parent=p)
    c.append_token(3)
    sched.fork_children(p, [c])
    sched.abort("p")
    assert c.is_finished and not sched.has_unfinished_requests()
    assert sched.block_manager.num_free_blocks == 63


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=8, max_num_seqs=0)
