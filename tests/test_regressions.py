"""Regressions found in review: leaks and cache poisoning around n > 1 forking and async placeholders."""

import pytest

from jaxserve.block_manager import BlockManager
from jaxserve.config import EngineArgs
from jaxserve.engine import LLMEngine
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

TINY = "tests/data/tiny/llama"


def test_placeholder_token_is_never_hashed_into_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = Request("r", [1, 2, 3], SamplingParams())
    bm.allocate(req, 3)
    req.num_computed_tokens = 3
    req.append_placeholder(0)  # token 4 is still on the device
    bm.allocate(req, 1)
    req.num_computed_tokens = 4  # the step computing position 3 was dispatched
    bm.cache_full_blocks(req)
    assert bm.hash_to_block == {}  # block 0 holds (1, 2, 3, -1): not registered
    req.append_token(7)  # the real token arrives
    bm.cache_full_blocks(req)
    assert list(bm.block_hash) == [req.block_ids[0]]


def test_abort_frees_forked_children_after_the_parent_finished():
    eng = LLMEngine.from_engine_args(EngineArgs(model=TINY, skip_tokenizer_init=True, enforce_eager=True,
                                                max_model_len=128, num_gpu_blocks_override=40))
    free = eng.block_manager.num_free_blocks
    eng.add_request("g", list(range(1, 22)), SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=50,
                                                            ignore_eos=True))
    while not any(r.parent is not None for r in eng.scheduler.running):
        eng.step()
    g = eng.groups["g"]
    parent = g.samples[0].req
    eng.scheduler.finish(parent, RequestStatus.FINISHED_STOPPED)  # sample 0 ended first
    g.samples[0].finish_reason = "stop"
    eng.step()
    eng.abort_request("g")
    assert not eng.scheduler.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == free



def _serve_burst_counting_compiles(**engine_args):
    import jax

    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    eng = LLMEngine.from_engine_args(EngineArgs(model=TINY, skip_tokenizer_init=True, max_model_len=256,
                                                num_gpu_blocks_override=200, max_num_batched_tokens=64,
                                                max_num_seqs=16, **engine_args))
    from jaxserve import model_runner as mr
    programs = (eng.runner._packed_forward, mr._unpack, mr._sample_packed)
    before = [len(eng.runner._programs)] + [p._cache_size() for p in programs]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for i in range(12):
            sp = SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=3 + 5 * i, ignore_eos=True)
            eng.add_request(str(i), list(range(1, 2 + 7 * i)), sp)
        while eng.has_unfinished_requests():
            eng.step()
    finally:
        jax.monitoring.clear_event_listeners()
    return compiles, before, [len(eng.runner._programs)] + [p._cache_size() for p in programs]


def test_warmup_compiles_the_per_step_helpers():
    """Seen on the H100: seconds of zero GPU utilization under a burst of requests, because warm-up had
    compiled with uncommitted stand-in inputs (jit keys its cache on committedness) and never compiled the
    per-step input unpacking or the sampler. After warm-up, greedy and random requests of every size must
    find the step (its input unpacking folded in) and the sampler compiled. The warm-up's compiled steps are
    called as they are: jit's step program (the route of shapes not warmed) never compiles."""
    compiles, before, after = _serve_burst_counting_compiles()
    assert after == before and before[0] == 4 and before[1] == 0 and before[3] > 0  # 4 token buckets
    assert compiles == []


def test_warmup_leaves_nothing_to_compile_while_serving():
    # The last compile left was the first warmed shape: fresh KV pages were uncommitted, the pages a step
    # returns are committed, and jit keys its cache on committedness (kv_cache.allocate now commits them).
    compiles, _, _ = _serve_burst_counting_compiles()
    assert compiles == []


def _startup_forward_compiles(**engine_args) -> list:
    """Names of the forward programs compiled while an engine starts."""
    import jax
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and "fwd" in str(kw.get("fun_name")):
            compiles.append(kw["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        LLMEngine.from_engine_args(EngineArgs(model=TINY, skip_tokenizer_init=True, max_model_len=256,
                                              num_gpu_blocks_override=200, max_num_batched_tokens=64,
                                              max_num_seqs=16, seed=7, **engine_args))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return compiles


def test_threaded_warmup_compiles_the_same_programs(caplog, tmp_path):
    # --compile-threads: the shapes are compiled ahead of time from threads, for the KV cache's shapes before it
    # is allocated; the warm-up runs then find those programs, and serving compiles nothing more. Each of the 4
    # forward shapes compiles once (8 would mean the warm-up's calls missed what the threads made), as the program
    # steps run: the input unpacking folded into the forward.
    cache = str(tmp_path / "xla")
    with caplog.at_level("INFO", logger="jaxserve"):
        names = _startup_forward_compiles(compile_threads=2, compile_cache_dir=cache)
    assert len(names) == 4 and all("packed_fwd" in n for n in names)
    assert "compiled 4 step shapes ahead of time from 2 threads" in caplog.text
    assert caplog.text.index("ahead of time") < caplog.text.index("KV cache:")  # before the pages are allocated
    compiles, _, _ = _serve_burst_counting_compiles(compile_threads=2, compile_cache_dir=cache)
    assert compiles == []


@pytest.mark.parametrize("loaded", [True, False])
def test_compile_ahead_takes_two_threads_once_the_first_shape_loaded_from_the_cache(caplog, monkeypatch, loaded):
    # The first (largest) shape compiles alone. Loaded from the persistent cache, the rest is mostly tracing, which
    # holds the GIL, and two threads do it best (H100, session 10); compiled from scratch, every thread asked for
    # is used. Whether it loaded is decided here (this process's cache may hold the program or not).
    from jaxserve import model_runner
    monkeypatch.setattr(model_runner, "_loads_from_cache", lambda fn: (fn(), loaded))
    with caplog.at_level("INFO", logger="jaxserve"):
        names = _startup_forward_compiles(compile_threads=4)
    assert len(names) in (0, 4)  # 0: this process compiled these shapes before
    assert f"compiled 4 step shapes ahead of time from {2 if loaded else 4} threads" in caplog.text


def test_a_persistent_cache_hit_is_seen_through_jax_monitoring():
    """_loads_from_cache tells a warm start from a cold one by jax's cache-hit event (counted per thread, as the
    program store's compiles count theirs): seen while its function runs, not before or after, and under the name
    jax's compiler records."""
    import inspect

    import jax
    from jax._src import compiler

    from jaxserve import model_runner
    hit = lambda: jax.monitoring.record_event(model_runner.PERSISTENT_CACHE_HIT)  # noqa: E731
    assert model_runner._loads_from_cache(lambda: 7) == (7, False)
    assert model_runner._loads_from_cache(lambda: hit() or 8) == (8, True)
    hit()  # a hit between two calls counts for neither
    assert model_runner._loads_from_cache(lambda: 9) == (9, False)
    assert f"'{model_runner.PERSISTENT_CACHE_HIT}'" in inspect.getsource(compiler)


def test_compile_threads_default_is_one_on_cpu(caplog):
    # The threaded default (8) is for GPUs, where it was measured; on CPU the shapes compile one by one.
    with caplog.at_level("INFO", logger="jaxserve"):
        _startup_forward_compiles()
    assert "ahead of time" not in caplog.text and "compiled 4 step shapes in" in caplog.text


@pytest.mark.parametrize("T,B,P,S", [(8, 1, 8, 1), (37, 5, 3, 5), (256, 256, 128, 256), (4096, 61, 128, 64)])
def test_packed_step_inputs_start_on_256_byte_boundaries_and_round_trip(T, B, P, S):
    """The forward unpacks its packed inputs as slices of one buffer, handed to kernels in place; Mosaic GPU
    kernels refuse an input that is not 256-byte aligned (H100, session 10: every step shape whose parts did not
    happen to land on such a boundary failed). Each part starts on one, and unpacking gives back what was packed."""
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.attention import AttentionMetadata
    from jaxserve.model_runner import _pack_step, _packed_offsets, _unpack_fn
    rng = np.random.default_rng(T + B)
    i32 = lambda *shape: rng.integers(0, 1000, shape).astype(np.int32)  # noqa: E731
    ids, li = i32(T), i32(S)
    meta = AttentionMetadata(slot_mapping=i32(T), positions=i32(T), token_seq_ids=i32(T), block_tables=i32(B, P),
                             seq_lens=i32(B), query_start_loc=i32(B + 1), decode_only=False)
    dst, src, prev = np.full(B, T, np.int32), np.zeros(B, np.int32), i32(8)
    dst[0], src[0] = T - 1, 3  # one placeholder: the last token takes prev[3]
    packed, dims = _pack_step(ids, meta, li, dst, src)
    offsets, total = _packed_offsets(**dims)
    assert len(packed) == total and all(o * 4 % 256 == 0 for o in offsets)
    out = _unpack_fn(jnp.asarray(packed), jnp.asarray(prev), **dims)
    want_ids = ids.copy()
    want_ids[T - 1] = prev[3]
    for got, want in zip(out, (want_ids, meta.positions, meta.slot_mapping, meta.token_seq_ids, meta.block_tables,
                                 meta.seq_lens, meta.query_start_loc, li)):
        np.testing.assert_array_equal(np.asarray(got), want)
