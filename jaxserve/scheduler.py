"""Iteration-level scheduler with one token budget per step (vLLM v1 style). No JAX.

Design note
-----------
There is no prefill or decode phase. Each step has a budget of `max_num_batched_tokens`; every request's
`num_computed_tokens` catches up with its `num_tokens` (prompt + output) inside it:
  1. Running requests, oldest arrival first, each get min(num_tokens - num_computed, budget left,
     long_prefill_token_threshold) new tokens: a long prompt is prefilled in chunks beside the decodes.
  2. If nothing was preempted this step: swapped requests come back (oldest first), then waiting requests
     are admitted FCFS while budget, max_num_seqs and free blocks allow. The queue head blocks the queue,
     so no one overtakes an older request. A prefix-cache hit advances num_computed_tokens at admission.
When a running request cannot get blocks, the latest-arrived running request is preempted (possibly itself):
swapped to host if host blocks exist and suffice, else recomputed (blocks freed, num_computed = 0, front of
the waiting queue). Preempting the latest arrival and sorting running by arrival mean the oldest request
in the system always makes progress, and `add` rejects any request that could not fit the pool on its own,
so every request eventually finishes (given that the engine finishes requests at max_tokens/max_model_len).

Step protocol (the engine's side):
    out = scheduler.schedule()                  # run out.blocks_to_swap_out, _swap_in, _copy, then forward
    scheduler.on_step_done(out)                 # num_computed += num_new; newly full blocks enter the cache
    for s in out.scheduled with s.num_samples:  # engine appends its sampled token(s) ...
        ... scheduler.fork_children(parent, children) for an n > 1 parent (num_samples == n)
        ... scheduler.finish(req, status) for finished ones
A row's num_samples is 1 when this step brings it to num_tokens, 0 while its prompt is still being
chunked, and n for an n > 1 parent whose prompt completes (it holds n sequence slots from admission on).
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass

from jaxserve.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus
from jaxserve.scheduler_output import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_model_len: int  # prompt + output tokens per request; bounds the blocks one request can hold
    max_num_seqs: int = 256  # sequences running at once (rows of the batch)
    max_num_batched_tokens: int = 2048  # tokens computed per step, prefill chunks and decodes together
    long_prefill_token_threshold: int = 0  # > 0: cap one request's tokens per step, so decodes keep room

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")


def _seq_slots(req: Request) -> int:
    """Sequence slots a request holds: an unforked n > 1 parent reserves room for its children."""
    n = req.sampling_params.n
    return n if n > 1 and req.parent is None and req.num_output_tokens == 0 else 1


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival
        self.swapped: deque[Request] = deque()
        self._arrival: dict[Request, tuple[int, int]] = {}  # sort key: (arrival number, sample index)
        self._counter = itertools.count()
        self.num_preemptions_total = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- entering and leaving ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a new request; ValueError if it could never be served by this pool on its own."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        cfg, bm = self.config, self.block_manager
        sp = req.sampling_params
        max_tokens = sp.max_tokens if sp.max_tokens is not None else cfg.max_model_len
        need_tokens = max(req.num_tokens, min(req.num_prompt_tokens + max_tokens, cfg.max_model_len))
        need = bm.blocks_for(need_tokens)
        if need > bm.num_allocatable_blocks:
            raise ValueError(
                f"request {req.request_id!r} needs {need} KV blocks ({need_tokens} tokens of "
                f"{bm.block_size}) but the cache has only {bm.num_allocatable_blocks}; lower max_tokens, "
                f"shorten the prompt or give the KV cache more memory")
        if _seq_slots(req) > cfg.max_num_seqs:
            raise ValueError(f"request {req.request_id!r} asks for n={sp.n} samples but max_num_seqs is "
                             f"{cfg.max_num_seqs}")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self._arrival[req] = (next(self._counter), req.sample_index)
        self.waiting.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Mark req finished and free its blocks at once, wherever it is. A no-op if already gone."""
        assert status.finished, status
        if self.requests.get(req.request_id) is not req:
            return
        for queue in (self.waiting, self.running, self.swapped):
            if req in queue:
                queue.remove(req)
                break
        self.block_manager.free(req)
        req.status = status
        req.finished_time = time.monotonic()
        del self.requests[req.request_id]
        del self._arrival[req]

    def abort(self, request_id: str) -> Request | None:
        """Abort a request and its forked children; returns it, or None if unknown (already finished)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for child in [r for r in self.requests.values() if r.parent is req]:
            self.finish(child, RequestStatus.FINISHED_ABORTED)
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def fork_children(self, parent: Request, children: list[Request]) -> None:
        """After an n > 1 parent's prompt step: children share its blocks and run from the next step.

        Each child must already hold the parent's prompt and its own sampled token (engine's job)."""
        for child in children:
            if child.request_id in self.requests:
                raise ValueError(f"request id {child.request_id!r} is already in use")
            if parent.status is not RequestStatus.RUNNING or not parent.block_ids:
                # The parent was preempted between its prompt step and this fork (async scheduling): nothing
                # to share, so the child recomputes its prompt and token from the front of the queue.
                child.num_computed_tokens = 0
                child.status = RequestStatus.WAITING
                self.requests[child.request_id] = child
                self._arrival[child] = (self._arrival[parent][0], child.sample_index)
                self.waiting.appendleft(child)
                continue
            self.block_manager.fork(parent, child)
            # Shared K/V: the prompt's. Not parent.num_computed_tokens: with async scheduling the parent has
            # already computed its own first token (a step ahead), which the child must not inherit.
            child.num_computed_tokens = child.num_prompt_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
            self.requests[child.request_id] = child
            self._arrival[child] = (self._arrival[parent][0], child.sample_index)
            self._insert_running(child)

    # ---- the step --------------------------------------------------------------------------------------
    def _insert_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        bisect.insort(self.running, req, key=self._arrival.__getitem__)

    def _chunk(self, req: Request, num_computed: int, budget: int) -> int:
        num_new = min(req.num_tokens - num_computed, budget)
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _schedule_row(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        caught_up = req.num_computed_tokens + num_new == req.num_tokens
        out.scheduled.append(ScheduledRequest(req, num_new, _seq_slots(req) if caught_up else 0))
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()

    def _preempt(self, out: SchedulerOutput) -> Request:
        """Preempt the latest-arrived running request: swap it out if possible, else recompute it later."""
        bm = self.block_manager
        victim = self.running.pop()
        victim.num_preemptions += 1
        self.num_preemptions_total += 1
        out.preempted.append(victim)
        if bm.num_host_blocks > 0 and bm.can_swap_out(victim):
            out.blocks_to_swap_out.extend(bm.swap_out(victim))
            victim.status = RequestStatus.SWAPPED
            self.swapped.appendleft(victim)  # victims leave newest first, so the oldest ends up in front
        else:
            bm.free(victim)
            victim.num_computed_tokens = 0
            victim.status = RequestStatus.WAITING
            self.waiting.appendleft(victim)
        return victim

    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens

        # 1. Running requests, oldest first. Victims come off the tail, which is not yet scheduled.
        i = 0
        running, scheduled, bs = self.running, out.scheduled, bm.block_size
        while i < len(running) and budget > 0:
            req = running[i]
            nc = req.num_computed_tokens
            if len(req.all_token_ids) - nc == 1 and req.first_scheduled_time is not None:
                # Decode fast path (the bulk of every large step): one token into a block it already owns
                # alone needs no allocation; a full or shared last block takes the general path below.
                table = req.block_ids
                j = nc // bs
                if j < len(table) and bm.ref_counts[table[j]] == 1:
                    scheduled.append(ScheduledRequest(req, 1, _seq_slots(req)))
                    budget -= 1
                    i += 1
                    continue
            num_new = self._chunk(req, req.num_computed_tokens, budget)
            if num_new <= 0:  # caught up, waiting for the engine to append a token (e.g. unforked parent)
                i += 1
                continue
            while not bm.can_allocate(req, num_new):
                if self._preempt(out) is req:
                    break
            else:
                bm.allocate(req, num_new)
                self._schedule_row(out, req, num_new)
                budget -= num_new
                i += 1
                continue
            break  # req preempted itself: everyone after it is gone too

        # 2. Bring back and admit, unless this step had to preempt (it would only thrash).
        if not out.preempted:
            seqs = sum(_seq_slots(r) for r in self.running)
            while self.swapped and budget > 0:
                req = self.swapped[0]
                if seqs + _seq_slots(req) > cfg.max_num_seqs:
                    break
                num_new = self._chunk(req, req.num_computed_tokens, budget)
                if not bm.can_swap_in(req, num_new):
                    break
                self.swapped.popleft()
                out.blocks_to_swap_in.extend(bm.swap_in(req))
                self._admit(out, req, num_new)
                budget -= num_new
                seqs += _seq_slots(req)
            while self.waiting and not self.swapped and budget > 0:
                req = self.waiting[0]
                if seqs + _seq_slots(req) > cfg.max_num_seqs:
                    break
                num_new = self._chunk(req, bm.lookup_prefix(req), budget)
                if not bm.can_allocate(req, num_new):
                    break
                self.waiting.popleft()
                self._admit(out, req, num_new)
                budget -= num_new
                seqs += _seq_slots(req)

        out.blocks_to_copy = bm.take_pending_copies()
        return out

    def _admit(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        self.block_manager.allocate(req, num_new)  # applies a prefix-cache hit on first allocation
        self._insert_running(req)
        self._schedule_row(out, req, num_new)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """The step ran: advance each row's computed count and register its newly full blocks."""
        for s in out.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:  # aborted meanwhile: its blocks are gone
                continue
            req.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(req)
