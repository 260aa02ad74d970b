"""Shared fixtures for the end-to-end tests: reference data, engines, and drivers.

Reference data (tests/data, made by scripts/make_hf_reference.py with HF transformers in fp32):
  smollm2/  the embedded default model: 4 prompts, argmax at every prompt position, logits at the last 4
            positions, HF greedy ids (32 new, stopping at eos) and the top1-top2 logit margin per step.
  tiny/<name>/  random 2-layer checkpoints (llama, llama3_rope, llama_tied, mistral, qwen2, llama_sharded):
            2 prompts (7 and 80 ids), 16 greedy ids, full logits at every prompt position.

Greedy near-ties. A greedy step whose top-2 logits are closer than NEAR_TIE may flip under any other
summation order (another kernel, another batch shape), and every later token follows from it. So greedy
ids are compared only up to the first step whose margin is below NEAR_TIE (`greedy_prefix`); today every
reference margin is >= 0.0015, so the whole sequences are compared.

Engines. Compiling one SmolLM2 token bucket on CPU takes ~5 s, so all SmolLM2 engines share one shape
configuration (`SMOL_FLAGS`: buckets 8/16/32, 8 sequences, 128 tokens, 24 KV blocks): programs compiled
for one are found in the persistent compilation cache by the next. The pool is small on purpose
(23 usable blocks of 16 tokens): a handful of requests with 48 new tokens runs it out, which is how
the preemption tests get their preemptions without an engine of their own shape.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

# The program store (jaxserve/program_store.py) is off in the tests: they share one compilation cache folder, and
# tests that count compiles or traces must not find programs that an earlier test (or an earlier run of the suite)
# stored there. tests/test_program_store.py turns it on, each test with a cache folder of its own.
os.environ["JAXSERVE_PROGRAM_STORE"] = "0"
# Under pytest-xdist (.ci/run's -n 2) the workers are separate processes that may share one GPU: none may take
# XLA's default 75% of its memory up front. Harmless on CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny"
TINY_MODELS = ("llama", "llama3_rope", "llama_tied", "mistral", "qwen2", "llama_sharded")
NEAR_TIE = 1e-3  # logits; see the module note

SMOL_FLAGS = dict(enforce_eager=True, block_size=16, max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128,
                  num_gpu_blocks_override=24)
# Host swap space of the swap engine: 0.02 GiB = 29 SmolLM2 blocks (16 tokens x 30 layers x 3 kv heads x 64 x
# k,v x fp32 = 720 KiB a block), more than any preempted request holds.
SMOL_SWAP_GIB = 0.02


_GC_THRESHOLDS = gc.get_threshold()  # before any fixture built an engine (session-scoped ones included)


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    """An engine's start-up freezes the heap (engine_builder.freeze_startup_heap). Hand frozen objects back to the
    collector after each test, so that engines a test dropped can still be collected in this long-lived process,
    and put back Python's thresholds, which start-up raised."""
    yield
    gc.unfreeze()
    gc.set_threshold(*_GC_THRESHOLDS)


# ------------------------------------------------------------------------------------------ reference data
def tiny_dir(name: str) -> Path:
    return TINY / name


def tiny_reference(name: str) -> tuple[dict, dict]:
    """(reference.json, {array name: np.ndarray}) of one tiny model."""
    ref = json.loads((TINY / name / "reference.json").read_text())
    with np.load(TINY / name / "logits.npz") as z:
        return ref, {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def smol_ref() -> dict:
    """prompt name -> dict(prompt_ids, greedy_ids, greedy_text, text, kind, argmax, last_logits, greedy_margin)."""
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())["prompts"]
    with np.load(DATA / "smollm2" / "logits.npz") as z:
        for name, p in ref.items():
            for key in ("argmax", "last_logits", "greedy_margin"):
                p[key] = z[f"{name}.{key}"]
    return ref


def greedy_prefix(margins, n: int | None = None) -> int:
    """How many greedy steps are decided beyond rounding: up to (not including) the first near-tie."""
    margins = list(margins)[:n]
    for i, m in enumerate(margins):
        if m < NEAR_TIE:
            return i
    return len(margins)


def assert_greedy_equal(got: list[int], want: list[int], margins, what: str = "") -> None:
    """got == want up to the first near-tie step of the reference (and the shorter of the two)."""
    k = greedy_prefix(margins, min(len(want), len(got)))
    assert list(got[:k]) == list(want[:k]), (f"{what}: greedy ids differ before the first near-tie (step {k})\n"
                                             f"got  {list(got[:k])}\nwant {list(want[:k])}")


# --------------------------------------------------------------------------------------------- forwards
def prefill_logits(fwd, params, kv, ids, *, T: int, B: int, P: int, block_size: int) -> np.ndarray:
    """Logits f32[L, V] at every position of one sequence, prefilled in chunks of T tokens.

    fwd(params, kv, token_ids i32[T], meta, logits_indices i32[T]) -> (logits, kv) is the model's forward
    (model.apply or the runner's jitted step). The sequence owns pages 1..P in order (page 0 is the null page
    that padding tokens write); padding rows b >= 1 have seq_len 0, as model_runner/batch.py build them.
    """
    from jaxserve.attention import AttentionMetadata
    ids = np.asarray(ids, np.int32)
    L = len(ids)
    assert -(-L // block_size) <= P
    table = np.zeros((B, P), np.int32)
    table[0] = np.arange(1, P + 1)
    out = []
    for start in range(0, L, T):
        n = min(T, L - start)
        pos = np.arange(start, start + n, dtype=np.int32)
        tok, positions, slots = (np.zeros(T, np.int32) for _ in range(3))
        tok[:n], positions[:n] = ids[start:start + n], pos
        slots[:n] = table[0][pos // block_size] * block_size + pos % block_size
        seq_lens = np.zeros(B, np.int32)
        seq_lens[0] = start + n
        qsl = np.full(B + 1, n, np.int32)
        qsl[0] = 0
        meta = AttentionMetadata(slot_mapping=slots, positions=positions, token_seq_ids=np.zeros(T, np.int32),
                                 block_tables=table, seq_lens=seq_lens, query_start_loc=qsl)
        logits, kv = fwd(params, kv, tok, meta, np.arange(T, dtype=np.int32))
        out.append(np.asarray(logits)[:n])
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------- engines
def make_smol_llm(**overrides):
    from jaxserve.llm import LLM
    return LLM(**{**SMOL_FLAGS, **overrides})


@pytest.fixture(scope="session")
def smol_llm():
    """The shared SmolLM2 LLM (prefix caching on, no swap). Tests leave it idle: no request, no used block."""
    return make_smol_llm()


@pytest.fixture(scope="session")
def smol_engine(smol_llm):
    return smol_llm.llm_engine


@pytest.fixture(scope="session")
def smol_swap_engine():
    """A SmolLM2 engine of the same shapes whose preemptions swap to host memory."""
    return make_smol_llm(swap_space=SMOL_SWAP_GIB).llm_engine


@pytest.fixture(autouse=True)
def _drain_shared_engines(request):
    """After a test that failed half-way: abort what it left in a shared engine, so no other test inherits it."""
    yield
    for name in ("smol_llm", "smol_engine", "smol_swap_engine"):
        if name in request.fixturenames:
            obj = request.getfixturevalue(name)
            engine = getattr(obj, "llm_engine", obj)
            for rid in list(engine.groups):
                engine.abort_request(rid)


_rid = itertools.count()


def new_id(tag: str = "r") -> str:
    return f"{tag}-{next(_rid)}"


def assert_idle(engine) -> None:
    """No request left anywhere and every block back: device blocks free, no ref held, host blocks free."""
    bm, sch = engine.block_manager, engine.scheduler
    assert not engine.groups and not sch.requests and not sch.running and not sch.waiting and not sch.swapped
    assert bm.num_free_blocks == bm.num_allocatable_blocks, (bm.num_free_blocks, bm.num_allocatable_blocks)
    assert not any(bm.ref_counts), [b for b, r in enumerate(bm.ref_counts) if r]
    assert bm.num_free_host_blocks == bm.num_host_blocks and not bm.host_tables
    assert not bm.pending_copies


def drive(engine, arrivals: dict[int, list[tuple]], *, on_step=None, max_steps: int = 5000) -> dict:
    """Run an engine through add_request/step until idle.

    arrivals: step number -> [(request_id, prompt, SamplingParams)], added just before that step.
    on_step(engine, step, sched_out) runs after each step (sched_out: that step's SchedulerOutput).
    Returns request_id -> final RequestOutput.
    """
    arrivals = {k: list(v) for k, v in arrivals.items()}
    seen = []
    real_schedule = engine.scheduler.schedule

    def schedule():
        out = real_schedule()
        seen.append(out)
        return out

    engine.scheduler.schedule = schedule
    final, step = {}, 0
    try:
        while arrivals or engine.has_unfinished_requests():
            for rid, prompt, sp in arrivals.pop(step, []):
                engine.add_request(rid, prompt, sp)
            seen.clear()
            for o in engine.step():
                if o.finished:
                    final[o.request_id] = o
            if on_step is not None:
                on_step(engine, step, seen[-1] if seen else None)
            step += 1
            assert step < max_steps, "engine did not finish"
    finally:
        del engine.scheduler.schedule  # back to the class method
    return final


def run_alone(engine, prompt, sp) -> "RequestOutput":  # noqa: F821
    """One request alone in the engine, without the prefix cache: the oracle for batched runs."""
    bm = engine.block_manager
    saved, bm.enable_prefix_caching = bm.enable_prefix_caching, False
    try:
        rid = new_id("alone")
        return drive(engine, {0: [(rid, prompt, sp)]})[rid]
    finally:
        bm.enable_prefix_caching = saved


def margins_of(output) -> list[float]:
    """Top1 - top2 logprob gap per generated token, from a CompletionOutput run with logprobs >= 2."""
    out = []
    for d in output.logprobs:
        lps = sorted((lp.logprob for lp in d.values()), reverse=True)
        out.append(lps[0] - lps[1] if len(lps) > 1 else float("inf"))
    return out
