"""Startup errors say what is wrong and which flag fixes it (tiny llama checkpoint, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import tiny_dir

from jaxserve.engine_builder import StartupError
from jaxserve.kv_cache import bytes_per_block
from jaxserve.models.arch import load_arch

TINY = str(tiny_dir("llama"))
SMALL = dict(model=TINY, skip_tokenizer_init=True, enforce_eager=True, max_num_batched_tokens=16, max_num_seqs=2)


def make(**kw):
    from jaxserve.llm import LLM
    return LLM(**{**SMALL, **kw})


def test_max_model_len_does_not_fit_names_numbers_and_flags():
    per_block = bytes_per_block(load_arch(TINY), 16, "float32")  # 2 x 2 layers x 2 heads x 16 x 16 x 4 = 8 KiB
    with pytest.raises(StartupError) as e:
        make(max_model_len=256, kv_cache_memory=5 * per_block)  # 16 blocks needed, 5 - 1 (null) fit
    msg = str(e.value)
    assert "max_model_len 256" in msg and "needs 16 KV blocks" in msg and "only 4 fit" in msg
    for flag in ("--max-model-len", "--kv-cache-memory", "--gpu-memory-utilization", "--num-gpu-blocks-override"):
        assert flag in msg


def test_num_gpu_blocks_override_too_small():
    with pytest.raises(StartupError, match=r"max_model_len 64 needs 4 KV blocks .* only 2 fit"):
        make(max_model_len=64, num_gpu_blocks_override=3)


def test_exact_fit_starts():
    llm = make(max_model_len=64, num_gpu_blocks_override=5)  # 4 blocks + the null block
    assert llm.llm_engine.block_manager.num_allocatable_blocks == 4


def test_startup_freezes_the_heap_so_a_full_collection_skips_it():
    """After start-up the objects alive then are frozen: a full collection no longer scans them (on the H100 one
    scan stalled a decode step for ~200 ms), what is created later is still collected, and full collections of
    what is left come far less often than Python's default (each scans every running request's token lists)."""
    import gc
    import weakref

    from jaxserve import SamplingParams
    gc.unfreeze()
    llm = make(max_model_len=64)
    frozen = gc.get_freeze_count()
    assert frozen > 10_000  # jax, flax, transformers, the engine itself
    assert len(gc.get_objects(generation=2)) < frozen // 10

    class Node:  # a reference cycle made after start-up: only the cyclic collector frees it
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 2

    # Full collections are rare now: many objects that live through the young collections (as a busy engine's
    # requests do) trigger dozens of gen-1 collections and, with Python's default threshold (10), full ones.
    gens = []

    def on_gc(phase, info):
        if phase == "start":
            gens.append(info["generation"])
    gc.callbacks.append(on_gc)
    try:
        keep = [[i] for i in range(400_000)]
    finally:
        gc.callbacks.remove(on_gc)
    assert len(keep) == 400_000
    assert gens.count(1) > 10 and 2 not in gens, gens


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8"])
def test_bad_dtype(dtype):
    with pytest.raises(StartupError, match=f"--dtype '{dtype}' is not supported"):
        make(dtype=dtype, num_gpu_blocks_override=64)


@pytest.mark.parametrize("block_size", [0, 7, 24, 256])
def test_bad_block_size(block_size):
    with pytest.raises(StartupError, match="--block-size must be one of 8, 16, 32, 64, 128"):
        make(block_size=block_size, num_gpu_blocks_override=64)


@pytest.mark.parametrize("wg", [-1, 4])
def test_bad_mosaic_prefill_warpgroups(wg):
    with pytest.raises(StartupError, match="--mosaic-prefill-warpgroups must be 0"):
        make(mosaic_prefill_warpgroups=wg, num_gpu_blocks_override=64)


def test_max_model_len_over_position_embeddings():
    with pytest.raises(StartupError, match="max_position_embeddings"):
        make(max_model_len=512, num_gpu_blocks_override=64)


def test_unknown_engine_argument():
    with pytest.raises(TypeError, match="max_num_sequences"):
        make(max_num_sequences=4)


def test_device_gpu_on_cpu_fails_loudly():
    """--device gpu where JAX runs on CPU: PlatformError naming the missing CUDA plugin. Own process: the
    platform is set up once per process, before JAX starts."""
    code = ("from jaxserve.llm import LLM\n"
            f"LLM(model={TINY!r}, skip_tokenizer_init=True, device='gpu')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "PlatformError" in r.stderr
    assert "a GPU was asked for" in r.stderr and "CUDA plugin is missing or failed to load" in r.stderr


class _FakeDevice:
    def __init__(self, **stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_kv_budget_from_memory_analysis_ignores_the_compile_time_peak():
    """A warm start loads its programs from the persistent cache, so no autotuning scratch raises the allocator's
    peak: sizing by that peak gave a different KV shape, and every forward compiled again. With the forward's
    memory analysis the budget is the same whatever the peak was."""
    from jaxserve.kv_cache import kv_memory_budget
    GiB = 1 << 30
    cold = _FakeDevice(bytes_limit=72 * GiB, bytes_in_use=16 * GiB, peak_bytes_in_use=30 * GiB)
    warm = _FakeDevice(bytes_limit=72 * GiB, bytes_in_use=16 * GiB, peak_bytes_in_use=19 * GiB)
    act = 2 * GiB
    reserve = int(0.03 * 72 * GiB)  # over the 1 GiB floor
    b_cold, why = kv_memory_budget([cold], 0.9, None, act)
    b_warm, _ = kv_memory_budget([warm], 0.9, None, act)
    assert b_cold == b_warm == 72 * GiB - 16 * GiB - act - reserve
    assert "memory analysis" in why
    # Without the analysis (sharded steps), the peak rule: the cold start's scratch shrinks its cache.
    assert kv_memory_budget([cold], 0.9, None)[0] == 72 * GiB - 30 * GiB - reserve
    # Several devices: the fullest bounds them all.
    assert kv_memory_budget([warm, cold], 0.9, None)[0] == 72 * GiB - 30 * GiB - reserve


def test_memory_summary_names_each_device_and_its_largest_free_block():
    from jaxserve.kv_cache import memory_summary
    GiB = 1 << 30
    a = _FakeDevice(bytes_limit=72 * GiB, bytes_in_use=16 * GiB, peak_bytes_in_use=18 * GiB,
                    largest_free_block_bytes=GiB // 2)
    a.platform, a.id = "gpu", 0
    b = _FakeDevice(bytes_limit=72 * GiB, bytes_in_use=GiB)  # no peak or free-block figures
    b.platform, b.id = "gpu", 1
    cpu = _FakeDevice()  # no statistics at all
    cpu.platform, cpu.id = "cpu", 0
    assert memory_summary([a, b, cpu]) == (
        "gpu:0 in use 16.00 GiB, peak 18.00 GiB, largest free block 0.50 GiB of 72.00 GiB; "
        "gpu:1 in use 1.00 GiB, peak ? GiB, largest free block ? GiB of 72.00 GiB")
    assert memory_summary([cpu]) == ""


def test_pipeline_slack_is_one_layers_page_array():
    from jaxserve.kv_cache import pipeline_slack
    # 62,016 pages (call 74's PP=2 engine, 16 layers a stage): each of the 32 arrays holds them all, so one array
    # is 1/32 of the pages' bytes; rounded up.
    assert pipeline_slack(62016, 16) == 1938 and pipeline_slack(33, 16) == 2 and pipeline_slack(0, 16) == 0


def test_warm_up_out_of_memory_is_a_startup_error_with_the_remedies(monkeypatch):
    from jaxserve.model_runner import ModelRunner

    def oom(self):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.89GiB with allocator "
                           "GPU_1_bfc on device 1.")
    monkeypatch.setattr(ModelRunner, "warmup", oom)
    with pytest.raises(StartupError) as e:
        make(max_model_len=64, num_gpu_blocks_override=9, enforce_eager=False)
    msg = str(e.value)
    assert "warm-up ran out of device memory" in msg and "allocate 1.89GiB" in msg
    assert "--kv-cache-memory" in msg and "--num-gpu-blocks-override N (9 now)" in msg


def _fail_first_allocations(monkeypatch, n: int) -> list[int]:
    """ModelRunner.allocate_kv fails its first n calls as an out-of-memory device does; returns the page counts
    asked for, call by call."""
    from jaxserve.model_runner import ModelRunner
    real, asked = ModelRunner.allocate_kv, []

    def allocate_kv(self, num_blocks, num_host_blocks=0):
        asked.append(num_blocks)
        if len(asked) <= n:
            raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {num_blocks} pages")
        return real(self, num_blocks, num_host_blocks)
    monkeypatch.setattr(ModelRunner, "allocate_kv", allocate_kv)
    return asked


def test_pages_that_do_not_fit_the_allocator_fall_back_to_fewer(monkeypatch, caplog):
    from jaxserve.kv_cache import round_blocks
    asked = _fail_first_allocations(monkeypatch, 1)
    with caplog.at_level("WARNING", logger="jaxserve"):
        llm = make(max_model_len=64)
    first, second = asked
    assert second == round_blocks(first - first // 20) < first
    assert llm.llm_engine.block_manager.num_allocatable_blocks == second - 1  # less the null block
    assert any("did not fit the device allocator" in r.getMessage() for r in caplog.records)


def test_pages_the_user_fixed_are_not_shrunk_when_they_do_not_fit(monkeypatch):
    asked = _fail_first_allocations(monkeypatch, 1)
    with pytest.raises(StartupError, match=r"could not hold the KV cache's 9 pages.*--kv-cache-memory"):
        make(max_model_len=64, num_gpu_blocks_override=9)
    assert asked == [9]
    asked = _fail_first_allocations(monkeypatch, 3)  # three failures in a row: no fourth try
    with pytest.raises(StartupError, match="could not hold the KV cache"):
        make(max_model_len=64)
    assert len(asked) == 3


def test_round_blocks():
    from jaxserve.kv_cache import round_blocks
    assert [round_blocks(n) for n in (5, 1023, 1024, 1055, 1056, 30001)] == [5, 1023, 1024, 1024, 1056, 29984]


def test_profile_run_reports_the_largest_forwards_memory():
    """The figure is XLA's analysis of the largest bucket's program: temporaries + outputs, at least its logits."""
    llm = make(max_model_len=64, num_gpu_blocks_override=8)
    runner = llm.llm_engine.runner
    act = runner.profile_run()
    T = runner.token_buckets[-1]
    S = min(T, runner.max_num_seqs)
    assert act is not None and act >= S * runner.arch.vocab_size * 4
    assert runner.kv_caches[0][0].shape[1] == 8  # the real cache is back in place


def test_profile_run_figure_is_cached_beside_the_compile_cache(tmp_path, monkeypatch):
    """A warm start reads the activation figure from a side-cache beside the compile cache instead of loading that
    program. Two keys, each with jax, the device and XLA_FLAGS: what the program is made of (read without tracing
    anything) and the lowered program's text. The second profile_run neither traces nor compiles; a JAXSERVE_
    variable misses the first key but finds the second (lowered, not compiled); another XLA_FLAGS misses both."""

    import jax

    llm = make(max_model_len=64, num_gpu_blocks_override=8)
    runner = llm.llm_engine.runner
    old_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        _check_activation_side_cache(runner, tmp_path, monkeypatch)
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)


def _check_activation_side_cache(runner, tmp_path, monkeypatch):
    import json

    import jax

    from jaxserve import model_runner
    table = lambda: json.loads((tmp_path / model_runner._ACTIVATION_FILE).read_text())  # noqa: E731
    first = runner.profile_run()
    assert list(table().values()) == [first, first]  # both keys
    compiles, traces = [], []
    real_compile, real_warm = jax.stages.Lowered.compile, runner._warm_call
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, *a, **k: compiles.append(1) or real_compile(self, *a, **k))
    monkeypatch.setattr(runner, "_warm_call", lambda *a: traces.append(1) or real_warm(*a))
    assert runner.profile_run() == first and compiles == [] and traces == []
    monkeypatch.setenv("JAXSERVE_TEST_KNOB", "1")  # another inputs key; the same program
    assert runner.profile_run() == first and compiles == [] and traces == [1]
    assert len(table()) == 3
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_disable_metadata=true")
    assert runner.profile_run() == first and compiles == [1]
    assert len(table()) == 5
    (tmp_path / model_runner._ACTIVATION_FILE).write_text("{not json")  # a broken file is a miss, then rewritten
    assert runner.profile_run() == first and compiles == [1, 1]
    assert len(table()) == 2


def test_profile_run_inputs_key_covers_models_and_kernels_source():
    """pyproject maps jaxserve.models and jaxserve.pallas_kernels to folders of their own; in an editable install
    they sit outside jaxserve/, and a key over jaxserve/ alone would miss an edit to a model or a kernel."""
    from pathlib import Path

    import jaxserve.models.llama
    import jaxserve.pallas_kernels.select
    from jaxserve import model_runner
    files = set(model_runner._source_files())
    for mod in (jaxserve.models.llama, jaxserve.pallas_kernels.select, model_runner):
        assert Path(mod.__file__).resolve() in files


def test_profile_run_inputs_key_is_the_same_in_another_process(tmp_path):
    """The keys read without tracing (profile_run's figure, the program store's) hold nothing that differs between
    two starts of the same command (an object's address in a repr would make every warm start miss and trace)."""
    code = ("import jax; jax.config.update('jax_compilation_cache_dir', %r)\n"
            "from test_startup import make\n"
            "r = make(max_model_len=64, num_gpu_blocks_override=8).llm_engine.runner\n"
            "print('KEY', r._activation_inputs_key(r.token_buckets[-1]))\n"
            "print('KEY', r._program_key(8, False, 8))\n") % str(tmp_path)
    keys = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                             cwd=os.path.dirname(__file__))
        assert out.returncode == 0, out.stderr[-2000:]
        keys.append([ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("KEY ")])
    assert keys[0] == keys[1] and [len(k) for k in keys[0]] == [64, 64]  # profile_run's, a step program's


@pytest.mark.parametrize("usable_gib,usage,seqs,budget", [(72, "offline", 512, 8192), (72, "server", 512, 4096),
                                                          (20, "offline", 256, 2048), (20, "server", 256, 2048)])
def test_gpu_defaults_for_running_requests_and_step_budget(monkeypatch, usable_gib, usage, seqs, budget):
    """Unset --max-num-seqs / --max-num-batched-tokens on a GPU: 512 running requests and 8192 tokens per step
    offline (4096 in the server) where jax may use >= 40 GiB, else 256 and 2048. A flag given wins; the budget
    never falls below the rows."""
    import jax

    from jaxserve import engine_builder
    from jaxserve.config import EngineArgs

    class Gpu:
        platform = "gpu"
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
    monkeypatch.setattr(jax, "local_devices", lambda *a: [Gpu()])
    monkeypatch.setattr(engine_builder, "_usable_device_bytes", lambda: usable_gib << 30)
    arch = load_arch(TINY)
    cfg = engine_builder.make_config(EngineArgs(model=TINY, max_model_len=64, usage=usage), tiny_dir("llama"), arch)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == (seqs, budget)
    cfg = engine_builder.make_config(EngineArgs(model=TINY, max_model_len=64, max_num_seqs=3000,
                                                max_num_batched_tokens=1024), tiny_dir("llama"), arch)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == (3000, 3000)


def test_cpu_defaults_unchanged():
    llm = make(max_model_len=64, num_gpu_blocks_override=8, max_num_seqs=None, max_num_batched_tokens=None)
    sc = llm.llm_engine.scheduler.config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (256, 512)


@pytest.mark.parametrize("value,expect_ms", [("0.5", 0.5), ("0", None), ("fast", None)])
def test_gil_switch_knob(monkeypatch, value, expect_ms):
    """JAXSERVE_GIL_SWITCH_MS sets the interpreter's switch interval; a bad value is ignored, not fatal."""
    from jaxserve.platform import set_gil_switch_interval
    before = sys.getswitchinterval()
    monkeypatch.setenv("JAXSERVE_GIL_SWITCH_MS", value)
    try:
        set_gil_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(before if expect_ms is None else expect_ms / 1e3)
    finally:
        sys.setswitchinterval(before)


def test_xla_flags_put_collectives_in_command_buffers_unless_the_user_chose():
    from jaxserve.platform import COMMAND_BUFFER_FLAG, SYNC_ALL_REDUCE_FLAG, xla_flags
    both = f"{COMMAND_BUFFER_FLAG} {SYNC_ALL_REDUCE_FLAG}"
    assert xla_flags("") == both
    assert xla_flags("--xla_dump_to=/tmp/d") == "--xla_dump_to=/tmp/d " + both
    mine = "--xla_gpu_enable_command_buffer="  # the user's choice (here: none at all) stands
    assert xla_flags(mine) == f"{mine} {SYNC_ALL_REDUCE_FLAG}"
    mine = "--xla_gpu_disable_async_collectives=REDUCESCATTER"
    assert xla_flags(mine) == f"{mine} {COMMAND_BUFFER_FLAG}"
    assert xla_flags(both) == both


def test_xla_flags_reach_a_fresh_process():
    code = ("import os; from jaxserve.platform import init_platform; init_platform(quiet=True); "
            "print(os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--xla_gpu_enable_command_buffer=+COLLECTIVES" in out.stdout
    assert "--xla_gpu_disable_async_collectives=ALLREDUCE" in out.stdout


def test_kv_budget_leaves_room_for_the_collective_kernels_scratch():
    """Tensor parallel on GPUs: what XLA's all-reduce kernels will allocate outside JAX's allocator comes off the KV
    budget where it does not fit in the device memory beyond the allocator's share (less 2 GiB)."""
    from jaxserve.kv_cache import OUTSIDE_POOL_BASE, kv_memory_budget
    GiB = 1 << 30
    dev = _FakeDevice(bytes_limit=72 * GiB, bytes_in_use=16 * GiB, peak_bytes_in_use=16 * GiB)  # 80 GiB at 0.9
    reserve = int(0.03 * 72 * GiB)
    base = 72 * GiB - 16 * GiB - 2 * GiB - reserve
    assert kv_memory_budget([dev], 0.9, None, 2 * GiB)[0] == base
    outside = 80 * GiB - 72 * GiB - OUTSIDE_POOL_BASE  # 6 GiB free beyond the allocator's share
    assert kv_memory_budget([dev], 0.9, None, 2 * GiB, outside_pool_bytes=5 * GiB)[0] == base  # fits: no change
    b, why = kv_memory_budget([dev], 0.9, None, 2 * GiB, outside_pool_bytes=10 * GiB)
    assert b == pytest.approx(base - (10 * GiB - outside), abs=2) and "collective kernels' scratch" in why
    assert kv_memory_budget([dev], 0.9, None, 2 * GiB, outside_pool_bytes=200 * GiB)[0] == 0  # never negative


def test_collective_scratch_estimate(monkeypatch):
    """Per device: programs x (2 all-reduces per layer of the largest stage + 2) x 6 MiB; tensor parallel on GPUs
    only; JAXSERVE_COLLECTIVE_SCRATCH_MIB overrides the per-all-reduce figure."""
    from types import SimpleNamespace

    from jaxserve.engine_builder import collective_scratch_estimate
    from jaxserve.parallel import split_layers
    runner = SimpleNamespace(num_step_programs=lambda: 26)
    plan = SimpleNamespace(tp=4, stages=split_layers(80, 1))
    monkeypatch.delenv("JAXSERVE_COLLECTIVE_SCRATCH_MIB", raising=False)
    assert collective_scratch_estimate(plan, runner, "gpu") == 26 * 162 * 6 * 2**20  # Llama-3-70B at TP=4
    assert collective_scratch_estimate(SimpleNamespace(tp=2, stages=split_layers(5, 2)), runner, "gpu") == \
        26 * (2 * 3 + 2) * 6 * 2**20  # pipeline stages of 3 and 2 layers: the larger one
    assert collective_scratch_estimate(plan, runner, "cpu") == 0
    assert collective_scratch_estimate(None, runner, "gpu") == 0
    assert collective_scratch_estimate(SimpleNamespace(tp=1, stages=split_layers(80, 2)), runner, "gpu") == 0
    monkeypatch.setenv("JAXSERVE_COLLECTIVE_SCRATCH_MIB", "0")
    assert collective_scratch_estimate(plan, runner, "gpu") == 0


def test_warmup_out_of_collective_scratch_is_a_startup_error_with_remedies(monkeypatch):
    """XLA's own message for the all-reduce scratch it could not allocate (session 14, Llama-3-70B at TP=4) becomes a
    StartupError that says what ran out and which flags change it; other warm-up errors pass through as they are."""
    from jaxserve.model_runner import ModelRunner

    def out_of_scratch(self):
        raise RuntimeError("INTERNAL: Failed to allocate Scratch 1 for all-reduce. [executable_name='jit_packed_fwd']")
    monkeypatch.setattr(ModelRunner, "warmup", out_of_scratch)
    with pytest.raises(StartupError) as e:
        make(max_model_len=64, enforce_eager=False)
    msg = str(e.value)
    assert "Failed to allocate Scratch 1 for all-reduce" in msg
    for remedy in ("--gpu-memory-utilization", "JAXSERVE_COLLECTIVE_SCRATCH_MIB",
                   "XLA_FLAGS=--xla_gpu_experimental_use_collective_kernels="):
        assert remedy in msg

    def other(self):
        raise ValueError("something else")
    monkeypatch.setattr(ModelRunner, "warmup", other)
    with pytest.raises(ValueError, match="something else"):
        make(max_model_len=64, enforce_eager=False)


def test_multi_device_runs_let_the_allocator_grow_on_demand():
    """Tensor/pipeline parallel: JAX's allocator must not take its whole share at start-up, or the room the KV sizing
    leaves for the collective kernels' scratch stays inside it. One device keeps preallocation (JAX's default)."""
    code = ("import os, sys; from jaxserve.platform import init_platform; init_platform('cpu', 0.8, quiet=True, "
            "multi_device=sys.argv[1] == '1'); print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), "
            "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    got = [subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, env=env,
                          timeout=120).stdout.split() for flag in ("1", "0")]
    assert got == [["false", "0.800"], ["None", "0.800"]]


def _logging_child(env_level: str | None, configure_root: bool) -> subprocess.CompletedProcess:
    """A fresh interpreter (the variable is read when jaxserve is imported) that logs one INFO line."""
    code = ("import logging, jaxserve\n"
            + ("logging.basicConfig(level=logging.INFO, format='root %(message)s')\n" if configure_root else "")
            + "logging.getLogger('jaxserve.engine').info('KV cache: 7 blocks')\n")
    env = {k: v for k, v in os.environ.items() if k != "JAXSERVE_LOGGING_LEVEL"}
    if env_level is not None:
        env["JAXSERVE_LOGGING_LEVEL"] = env_level
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_logging_level_env_shows_info_lines_once():
    assert "KV cache: 7 blocks" not in _logging_child(None, False).stderr  # default: warnings only
    shown = _logging_child("info", False)
    assert shown.returncode == 0 and shown.stderr.count("KV cache: 7 blocks") == 1
    assert "INFO jaxserve.engine" in shown.stderr
    # A program that configures the root logger (the server does) prints each record once, through its handler.
    both = _logging_child("INFO", True)
    assert both.stderr.count("KV cache: 7 blocks") == 1 and "root KV cache" in both.stderr
    bad = _logging_child("loud", False)
    assert bad.returncode != 0 and "JAXSERVE_LOGGING_LEVEL='LOUD' is not a logging level" in bad.stderr


def test_collective_pool_fraction_lowers_jax_share_by_the_scratch_that_does_not_fit(monkeypatch):
    """Before JAX starts, tensor parallel on a GPU: JAX's share is --gpu-memory-utilization less the all-reduce
    scratch that does not fit beyond it (its allocator holds its whole share once the KV cache is allocated)."""
    from types import SimpleNamespace

    from jaxserve.config import EngineArgs
    from jaxserve.engine_builder import collective_pool_fraction
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("JAXSERVE_COLLECTIVE_SCRATCH_MIB", raising=False)
    GiB, MiB = 1 << 30, 1 << 20
    arch70 = SimpleNamespace(num_layers=80)
    args = EngineArgs(model="x", tensor_parallel_size=2, gpu_memory_utilization=0.9)
    # Defaults 512 running requests, 8192 tokens: buckets 8 .. 8192 (11), decode-only 8 .. 512 (7), and the fused
    # greedy/random programs of decode shapes 8 .. 64 (2 x 4): 26 programs of 162 all-reduces.
    frac, est = collective_pool_fraction(args, arch70, 140 * GiB)
    assert est == 26 * 162 * 6 * MiB
    excess = est - (140 * GiB * 0.1 - 2 * GiB)
    assert frac == pytest.approx(0.9 - excess / (140 * GiB), abs=1e-9) and 0.80 < frac < 0.82
    # Fewer programs (64 running requests, 2048 tokens: 9 + 4 + 8), 8 layers: it fits, the share stays.
    small = EngineArgs(model="x", tensor_parallel_size=2, max_num_seqs=64, max_num_batched_tokens=2048)
    assert collective_pool_fraction(small, SimpleNamespace(num_layers=8), 80 * GiB) == (0.9, 21 * 18 * 6 * MiB)
    # Pipeline stages halve the layers per device and have no fused programs.
    pp = EngineArgs(model="x", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert collective_pool_fraction(pp, arch70, 140 * GiB)[1] == 18 * 82 * 6 * MiB
    # Unchanged: one device, no CUDA driver, --kv-cache-memory, a user's own share.
    assert collective_pool_fraction(EngineArgs(model="x"), arch70, 140 * GiB) == (0.9, 0)
    assert collective_pool_fraction(args, arch70, None) == (0.9, 0)
    assert collective_pool_fraction(EngineArgs(model="x", tensor_parallel_size=2, kv_cache_memory=GiB), arch70,
                                    140 * GiB) == (0.9, 0)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")
    assert collective_pool_fraction(args, arch70, 140 * GiB) == (0.9, 0)
