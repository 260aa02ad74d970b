"""The program store (jaxserve/program_store.py): compiled step programs kept between starts, found with nothing
traced. Each test points jax's compilation cache (and so the store beside it) at a folder of its own."""
from __future__ import annotations

import pickle

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_runner import ModelRunner
from jaxserve.program_store import ProgramStore

TINY = "tests/data/tiny/llama"
FLAGS = dict(skip_tokenizer_init=True, max_model_len=128, num_gpu_blocks_override=64, max_num_batched_tokens=32,
             max_num_seqs=8)
PROMPTS = [{"prompt_token_ids": list(range(1, 20))}, {"prompt_token_ids": [5] * 40}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A compilation cache folder of this test's own, with the store on (conftest turns it off), and every program
    kept by jax's cache whatever its compile time (so "was it a cache hit" never depends on this machine's speed)."""
    from jax.experimental.compilation_cache import compilation_cache

    from jaxserve.platform import init_platform
    init_platform(quiet=True)  # first: it points jax at the default folder, once per process
    monkeypatch.setenv("JAXSERVE_PROGRAM_STORE", "1")
    old = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # jax opens its cache folder once: this one from now on
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    compilation_cache.reset_cache()


def _start(monkeypatch, **flags) -> tuple:
    """An engine on the tiny model -> (llm, step shapes traced while it started, its greedy tokens)."""
    traced = []
    real = ModelRunner._warm_call
    monkeypatch.setattr(ModelRunner, "_warm_call", lambda self, *a: traced.append(a[:2]) or real(self, *a))
    llm = LLM(TINY, **FLAGS, **flags)
    monkeypatch.setattr(ModelRunner, "_warm_call", real)
    toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    return llm, traced, toks


@pytest.mark.parametrize("threads", [1, 2])
def test_a_second_start_loads_every_step_program_and_traces_none(cache_dir, monkeypatch, threads):
    # threads 1: the warm-up compiles each shape on the real cache; 2: compile_ahead on its abstract shapes
    llm1, traced1, toks1 = _start(monkeypatch, compile_threads=threads)
    r1 = llm1.llm_engine.runner
    shapes = r1._warm_shapes()
    assert sorted(traced1) == sorted(shapes) and r1._store.saved == len(shapes) and r1._store.hits == 0
    assert len(list((cache_dir / "jaxserve_programs").glob("*.bin"))) == len(shapes)
    llm2, traced2, toks2 = _start(monkeypatch, compile_threads=threads)
    r2 = llm2.llm_engine.runner
    assert traced2 == [] and r2._store.hits == len(shapes) and r2._store.saved == 0
    assert toks2 == toks1
    assert r2._packed_forward._cache_size() == 0  # every step ran a loaded program, none fell back to jit


def test_a_broken_or_foreign_stored_program_is_compiled_again(cache_dir, monkeypatch, caplog):
    _, _, toks1 = _start(monkeypatch, compile_threads=1)
    files = sorted((cache_dir / "jaxserve_programs").glob("*.bin"))
    files[0].write_bytes(b"not a program")
    fmt, *rest = pickle.loads(files[1].read_bytes())
    files[1].write_bytes(pickle.dumps((fmt + 1, *rest)))  # another format
    llm, traced, toks = _start(monkeypatch, compile_threads=1)
    st = llm.llm_engine.runner._store
    assert len(traced) == 2 and st.misses == 2 and st.hits == len(files) - 2
    assert toks == toks1
    # dropped; not stored again here, as jax's cache had them (test below), so a third start compiles them quietly
    assert not files[0].exists() and not files[1].exists() and st.saved == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxserve"):
        _, traced, toks = _start(monkeypatch, compile_threads=1)
    assert len(traced) == 2 and toks == toks1 and "not loaded" not in caplog.text


def test_a_program_that_jax_loaded_from_its_cache_is_not_stored_on_cpu(cache_dir, monkeypatch):
    # A CPU program loaded from jax's persistent cache and serialized again loads but fails when run
    # ("NOT_FOUND: Function copy_bitcast_fusion.3 not found", jax 0.11.2). Such programs are not stored.
    _, _, toks1 = _start(monkeypatch, compile_threads=1)
    for f in (cache_dir / "jaxserve_programs").glob("*.bin"):
        f.unlink()
    llm, traced, toks = _start(monkeypatch, compile_threads=1)  # jax's cache has them
    st = llm.llm_engine.runner._store
    assert traced and st.saved == 0 and st.hits == 0 and toks == toks1
    assert list((cache_dir / "jaxserve_programs").glob("*.bin")) == []
    _, traced3, toks3 = _start(monkeypatch, compile_threads=1)  # the next start still runs
    assert traced3 and toks3 == toks1


def test_no_store_without_a_compilation_cache_or_when_turned_off(cache_dir, monkeypatch):
    assert ProgramStore.beside_compile_cache().dir == cache_dir / "jaxserve_programs"
    jax.config.update("jax_compilation_cache_dir", None)
    assert ProgramStore.beside_compile_cache() is None
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_enable_compilation_cache", False)  # jax keeps no cache: neither do we
    try:
        assert ProgramStore.beside_compile_cache() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert ProgramStore.beside_compile_cache() is not None
    monkeypatch.setenv("JAXSERVE_PROGRAM_STORE", "0")
    assert ProgramStore.beside_compile_cache() is None


def test_prune_keeps_the_most_recently_used(tmp_path):
    import os
    import time
    store = ProgramStore(tmp_path, max_bytes=250)
    for i, name in enumerate("abcd"):
        (tmp_path / f"{name}.bin").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.bin", (1000 + i, 1000 + i))
    os.utime(tmp_path / "a.bin", (2000, 2000))  # used last
    for name, age in ((".a.bin.1.dead", 7200), (".b.bin.2.live", 10)):  # half-written: a dead writer's, a live one's
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (time.time() - age,) * 2)
    store.prune()
    assert sorted(f.name for f in tmp_path.iterdir()) == [".b.bin.2.live", "a.bin", "d.bin"]
    assert store.load("b", (8,)) is None and store.misses == 1
    assert store.load(None, (8,)) is None and store.save(None, (8,), object()) is False


def test_a_program_stored_for_another_shape_is_not_loaded(cache_dir, monkeypatch):
    # Buckets up to 64 tokens have packed inputs of one length here, so T=8's program would take T=16's inputs and
    # give wrong tokens: the file says which shape it is for, and a file copied over another key is a miss.
    _, _, toks1 = _start(monkeypatch, compile_threads=1)
    llm = LLM(TINY, **FLAGS, enforce_eager=True)
    r = llm.llm_engine.runner
    path = lambda T: cache_dir / "jaxserve_programs" / f"{r._program_key(T, False, 64)}.bin"  # noqa: E731
    path(16).write_bytes(path(8).read_bytes())
    llm, traced, toks = _start(monkeypatch, compile_threads=1)
    assert traced == [(16, False)] and llm.llm_engine.runner._store.misses == 1 and toks == toks1


def test_a_stored_program_that_fails_when_run_is_dropped_and_compiled(cache_dir, monkeypatch, caplog):
    # Forced on CPU: programs jax loaded from its cache, serialized again, load and then fail on the device. The
    # warm-up runs each loaded program: one that fails is dropped, its pages replaced, and compiled; serving
    # goes on with the right tokens, and the next start does not find the bad file.
    from jaxserve import model_runner
    _, _, toks1 = _start(monkeypatch, compile_threads=1)
    for f in (cache_dir / "jaxserve_programs").glob("*.bin"):
        f.unlink()
    monkeypatch.setitem(model_runner.STORE_CACHE_HITS, "cpu", True)
    llm, _, _ = _start(monkeypatch, compile_threads=1)  # from jax's cache, stored again: broken on CPU
    n = llm.llm_engine.runner._store.saved
    assert n == 3
    monkeypatch.setitem(model_runner.STORE_CACHE_HITS, "cpu", False)
    with caplog.at_level("WARNING", logger="jaxserve"):
        llm, traced, toks = _start(monkeypatch, compile_threads=1)
    assert caplog.text.count("failed in its warm-up run") == n and len(traced) == n and toks == toks1
    assert list((cache_dir / "jaxserve_programs").glob("*.bin")) == []
    assert llm.llm_engine.runner._from_store == {}


def test_the_key_follows_tracing_knobs_not_server_settings(monkeypatch):
    # a JAXSERVE_ variable that may steer tracing changes the key (a miss, never a stale program); the server's own
    # settings do not (one server run with an API key, one without, share their programs)
    r = LLM(TINY, **FLAGS, enforce_eager=True).llm_engine.runner
    key = r._program_key(8, False, 64)
    assert key is not None and len({key, r._program_key(16, False, 64), r._program_key(8, False, 128)}) == 3
    monkeypatch.setenv("JAXSERVE_API_KEY", "secret")
    monkeypatch.setenv("JAXSERVE_HOST", "0.0.0.0")
    assert r._program_key(8, False, 64) == key
    monkeypatch.setenv("JAXSERVE_SOME_KERNEL_KNOB", "1")
    assert r._program_key(8, False, 64) != key
