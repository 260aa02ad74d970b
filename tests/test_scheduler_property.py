"""Random add/step/finish/abort sequences against a simulated engine and KV cache (pure Python).

The simulator keeps a fake device cache (each slot holds the token id written there) and a host pool, and
applies each step's swap-out, swap-in and copy lists in the runner's order before "computing" the step's
tokens. So besides bookkeeping invariants (no leaked or double-freed block, ref counts equal the number of
tables holding a block) it checks that every request reads back exactly its own tokens: a wrong prefix
hit, a missed copy-on-write, a bad swap mapping or two requests writing one slot all show up as a mismatch.
Small pools force preemption by recompute and by swap; finally the system must drain.
"""
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerConfig

BASE = list(range(1000, 1040))  # shared prompt prefixes make prefix hits common


class Sim:
    def __init__(self, cfg, num_blocks, block_size, caching, host):
        self.bm = BlockManager(num_blocks, block_size, caching, host)
        self.sched = Scheduler(cfg, self.bm)
        self.dev = [[None] * block_size for _ in range(num_blocks)]
        self.host = [[None] * block_size for _ in range(host)]
        self.next_id = 0
        self.stats = {"preempt": 0, "swap_out": 0, "copies": 0}

    def add(self, prefix_len, tail, max_tokens, n):
        tokens = BASE[:prefix_len] + tail
        req = Request(f"r{self.next_id}", tokens, SamplingParams(max_tokens=max_tokens, n=n))
        self.next_id += 1
        try:
            self.sched.add(req)
        except ValueError:
            cfg, bm = self.sched.config, self.bm
            too_long = bm.blocks_for(min(len(tokens) + max_tokens, cfg.max_model_len)) > bm.num_allocatable_blocks
            assert too_long or len(tokens) > cfg.max_model_len or n > cfg.max_num_seqs

    def step(self, rng):
        sched, bm, bs = self.sched, self.bm, self.bm.block_size
        out = sched.schedule()
        cfg = sched.config
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len({id(s.request) for s in out.scheduled}) == len(out.scheduled)
        # the runner: swap out, swap in, copies, then the forward pass
        for d, h in out.blocks_to_swap_out:
            self.host[h] = list(self.dev[d])
        for h, d in out.blocks_to_swap_in:
            self.dev[d] = list(self.host[h])
        for s, d in out.blocks_to_copy:
            self.dev[d] = list(self.dev[s])
        self.stats["preempt"] += len(out.preempted)
        self.stats["swap_out"] += bool(out.blocks_to_swap_out)
        self.stats["copies"] += len(out.blocks_to_copy)
        written = set()
        for s in out.scheduled:
            req, nc = s.request, s.request.num_computed_tokens
            assert req.status is RequestStatus.RUNNING and s.num_new_tokens > 0
            assert len(req.block_ids) * bs >= nc + s.num_new_tokens
            for p in range(nc):  # attention reads the context: it must be this request's own tokens
                assert self.dev[req.block_ids[p // bs]][p % bs] == req.all_token_ids[p], (req.request_id, p)
            for p in range(nc, nc + s.num_new_tokens):
                b = req.block_ids[p // bs]
                assert b != 0 and bm.ref_counts[b] == 1, f"write into shared/null block {b}"
                assert (b, p % bs) not in written
                written.add((b, p % bs))
                self.dev[b][p % bs] = req.all_token_ids[p]
        sched.on_step_done(out)
        for s in out.scheduled:
            req = s.request
            if req.is_finished or s.num_samples == 0:
                continue
            assert req.num_computed_tokens == req.num_tokens
            req.append_token(rng.randrange(3))  # tiny vocabulary: outputs share prefixes too
            if s.num_samples > 1:
                kids = []
                for i in range(1, s.num_samples):
                    kid = Request(f"{req.request_id}#{i}", req.prompt_token_ids, req.sampling_params,
                                  sample_index=i, parent=req)
                    kid.append_token(rng.randrange(3))
                    kids.append(kid)
                sched.fork_children(req, kids)
            for r in [req] + (kids if s.num_samples > 1 else []):
                if r.num_output_tokens >= r.sampling_params.max_tokens or r.num_tokens >= cfg.max_model_len:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)

    def finish_or_abort(self, k, abort):
        reqs = list(self.sched.requests.values())
        if reqs:
            req = reqs[k % len(reqs)]
            if abort:
                self.sched.abort(req.request_id)
            else:
                self.sched.finish(req, RequestStatus.FINISHED_STOPPED)

    def check(self):
        sched, bm = self.sched, self.bm
        live = list(sched.requests.values())
        refs = [0] * bm.num_blocks
        for r in live:
            for b in r.block_ids:
                refs[b] += 1
        assert refs == bm.ref_counts, "ref counts differ from the tables holding each block"
        free = list(bm.free_blocks)
        assert len(set(free)) == len(free), "double free"
        assert set(free) == {b for b in range(1, bm.num_blocks) if refs[b] == 0}, "leaked block"
        used = sum(1 for b in range(1, bm.num_blocks) if refs[b])
        assert len(free) + used + 1 == bm.num_blocks
        assert {b: h for h, b in bm.hash_to_block.items()} == bm.block_hash
        host = list(bm.free_host_blocks) + [h for t in bm.host_tables.values() for h in t]
        assert sorted(host) == list(range(bm.num_host_blocks))
        assert set(bm.host_tables) == set(sched.swapped)
        queues = list(sched.waiting) + sched.running + list(sched.swapped)
        assert sorted(r.request_id for r in queues) == sorted(sched.requests)
        for r in sched.waiting:
            assert r.status is RequestStatus.WAITING and not r.block_ids and r.num_computed_tokens == 0
        for r in sched.swapped:
            assert r.status is RequestStatus.SWAPPED and not r.block_ids
        for r in sched.running:
            assert r.status is RequestStatus.RUNNING and len(r.block_ids) * bm.block_size >= r.num_computed_tokens
        # an unforked n > 1 parent holds n sequence slots, so forking never overfills the batch
        slots = sum(r.sampling_params.n if r.parent is None and not r.output_token_ids else 1
                    for r in sched.running)
        assert slots <= sched.config.max_num_seqs

    def drain(self, rng, max_steps=3000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                return
            self.step(rng)
            self.check()
        raise AssertionError(f"not drained: {self.sched.num_running} running, {self.sched.num_waiting} "
                             f"waiting, {self.sched.num_swapped} swapped")


# Pools of 28..64 token slots against requests of 2..28 tokens: each fits alone, a few at once do not, so
# preemption (by recompute and by swap) is common. sampled_from lists lead with a busy value because
# hypothesis favours (and shrinks towards) the first element.
setups = st.integers(1, 4).flatmap(lambda bs: st.fixed_dictionaries({
    "block_size": st.just(bs), "num_blocks": st.integers(1 + 28 // bs, 1 + 64 // bs), "caching": st.booleans(),
    "host": st.sampled_from([64, 0, 4]), "max_num_seqs": st.sampled_from([4, 1, 2, 6]),
    "budget": st.sampled_from([8, 1, 3, 16]), "threshold": st.sampled_from([0, 3]),
    "max_model_len": st.sampled_from([24, 6, 40]),
}))
add_op = st.tuples(st.just("add"), st.sampled_from([8, 0, 3, 12]),
                   st.lists(st.integers(0, 2), min_size=1, max_size=4),
                   st.sampled_from([8, 1, 4, 12]), st.sampled_from([1, 2, 3]))
ops = st.lists(st.one_of(
    add_op, add_op, add_op,
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("end"), st.integers(0, 100), st.booleans()),
), min_size=6, max_size=40)


def run(setup, op_list, seed=0):
    cfg = SchedulerConfig(max_model_len=setup["max_model_len"], max_num_seqs=setup["max_num_seqs"],
                          max_num_batched_tokens=setup["budget"],
                          long_prefill_token_threshold=setup["threshold"])
    sim = Sim(cfg, setup["num_blocks"], setup["block_size"], setup["caching"], setup["host"])
    rng = random.Random(seed)
    for op in op_list:
        if op[0] == "add":
            _, prefix, tail, max_tokens, n = op
            if prefix + len(tail) > 0:
                sim.add(prefix, tail, max_tokens, n)
        elif op[0] == "step":
            for _ in range(op[1]):
                sim.step(rng)
                sim.check()
        else:
            sim.finish_or_abort(op[1], op[2])
        sim.check()
    sim.drain(rng)
    sim.check()
    assert sim.bm.num_free_blocks == sim.bm.num_allocatable_blocks
    assert sim.bm.num_free_host_blocks == sim.bm.num_host_blocks
    return sim


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups, ops, st.integers(0, 2**16))
def test_random_workloads_keep_invariants_and_drain(setup, op_list, seed):
    run(setup, op_list, seed)


def random_case(rng):
    """A uniformly random workload: hypothesis favours tiny examples, this keeps the pool under pressure."""
    bs = rng.randint(1, 4)
    setup = {"block_size": bs, "num_blocks": rng.randint(1 + 28 // bs, 1 + 48 // bs), "caching": rng.random() < 0.7,
             "host": rng.choice([0, 6, 64]), "max_num_seqs": rng.randint(2, 6), "budget": rng.choice([1, 4, 8, 16]),
             "threshold": rng.choice([0, 0, 3]), "max_model_len": rng.choice([16, 24, 40])}
    op_list = []
    for _ in range(rng.randint(4, 30)):
        r = rng.random()
        if r < 0.5:
            op_list.append(("add", rng.choice([0, 3, 8, 12]), [rng.randrange(3) for _ in range(rng.randint(1, 4))],
                            rng.randint(1, 12), rng.choice([1, 1, 2, 3])))
        elif r < 0.85:
            op_list.append(("step", rng.randint(1, 4)))
        else:
            op_list.append(("end", rng.randrange(100), rng.random() < 0.5))
    return setup, op_list


def test_seeded_random_workloads_and_coverage():
    """Seeded fuzz beside the property; also checks the paths the invariants rely on do occur."""
    totals = {"preempt": 0, "swap_out": 0, "copies": 0, "hits": 0}
    for seed in range(1000):
        sim = run(*random_case(random.Random(seed)), seed=seed)
        for k, v in sim.stats.items():
            totals[k] += v
        totals["hits"] += sim.bm.prefix_cache_hits
    assert all(v > 100 for v in totals.values()), totals
