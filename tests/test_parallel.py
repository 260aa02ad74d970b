"""Tensor / pipeline / multi-host parallelism on a CPU mesh of fake devices (docs/PARALLEL.md).

The device count is fixed when JAX starts, so every multi-device check runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (4 per process for the 2-process run) and reports
JSON back. Equality is exact: greedy ids at every tp/pp size equal the single-device ids (fp32).
Tiny model `tiny8`: 8 query heads, 2 kv heads, intermediate 100, vocab 500, 4 layers, dummy weights,
so tp=8 exercises kv-head replication (2 -> 8) and zero padding (100 -> 104, 500 -> 504).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxserve.models.arch import arch_from_dict
from jaxserve.parallel import relayout, tp_layout, valid_tp_sizes

REPO = Path(__file__).resolve().parents[1]
TINY8 = {"architectures": ["LlamaForCausalLM"], "vocab_size": 500, "hidden_size": 64, "intermediate_size": 100,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "torch_dtype": "float32", "eos_token_id": 499}
PROMPTS = [[1, 5, 9, 200, 33], list(range(10, 47)), [7] * 3]
TINY_FLAGS = dict(load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
                  num_gpu_blocks_override=64, max_num_seqs=4, max_num_batched_tokens=64, block_size=16)

_PRELUDE = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
def tokens(llm, prompts, sp=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
"""

TINY_SCRIPT = """
from jaxserve.parallel import count_collectives
folder, prompts, flags = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"tokens": {}, "collectives": {}, "logits_maxdiff": {}, "kv": {}}
ref_logits = None
for tp, pp in [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2)]:
    llm = LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, **flags)
    key = f"{tp}x{pp}"
    out["tokens"][key] = tokens(llm, prompts)
    r = llm.llm_engine.runner
    # Logits of one prefill through the runner's forward, against the single-device ones.
    meta, ids, li = r._dummy_inputs(16, False)
    ids = np.arange(16, dtype=np.int32) * 7 % 500
    meta = meta.replace(slot_mapping=np.arange(16, 32, dtype=np.int32), positions=np.arange(16, dtype=np.int32),
                        seq_lens=meta.seq_lens.at[0].set(16), query_start_loc=np.array([0] + [16] * 4, np.int32),
                        block_tables=meta.block_tables.at[0, 0].set(1))
    logits, r.kv_caches = r._forward(r.params, r.kv_caches, ids, meta, np.arange(4, dtype=np.int32) * 4)
    logits = np.asarray(logits)
    ref_logits = logits if ref_logits is None else ref_logits
    out["logits_maxdiff"][key] = float(np.abs(logits - ref_logits).max())
    k0 = r.kv_caches[0][0]
    out["kv"][key] = [list(k0.shape), list(k0.addressable_shards[0].data.shape), len(k0.sharding.device_set)]
    if r.parallel is not None:
        meta, ids, li = r._dummy_inputs(16, False)
        for s, fn in enumerate(r.parallel.stage_fns):
            a, b = r.parallel.stages[s]
            x = ids if s == 0 else jax.numpy.zeros((16, 64))
            hlo = fn.lower(r.params[s], r.kv_caches[a:b], x, meta, li).compile().as_text()
            out["collectives"][f"{key}/{s}"] = count_collectives(hlo)
        if r.fuse_unpack:  # one stage: the program steps run, their input unpacking folded in
            packed, dims = r._dummy_packed(16, False)
            hlo = r._packed_forward.lower(r.params, r.kv_caches, packed, r._no_prev, **dims,
                                          decode_only=False).compile().as_text()
            out["collectives"][f"{key}/packed"] = count_collectives(hlo)
            logits = r.run_packed_forward(packed, r._no_prev, dims, False)
            out.setdefault("packed_logits", {})[key] = [list(logits.shape), list(logits.devices()) == [r.logits_device]]
        out.setdefault("kv_bytes_per_block", {})[key] = r.parallel.kv_bytes_per_block(16, np.float32)
# Pipeline micro-batches: steps of >= 16 tokens run as two halves (a prompt cut mid-way, placeholders in both).
for tp, pp in [(1, 2), (2, 2)]:
    llm = LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, pp_microbatch_tokens=16, **flags)
    out["tokens"][f"{tp}x{pp}/micro"] = tokens(llm, prompts + [list(range(3, 60)), [9] * 20])
    out.setdefault("micro_steps", {})[f"{tp}x{pp}"] = llm.llm_engine.runner.microbatched_steps
llm = LLM(folder, **flags)
out["tokens"]["1x1/micro_prompts"] = tokens(llm, prompts + [list(range(3, 60)), [9] * 20])
# The input unpacking folded into the forward's program, or forced to run first as a program of its own (as pipeline
# stages run it), at TP=1 and 2: a chunked prefill, then decodes whose tokens the previous step's sampled ids fill.
for tp in (1, 2):
    for fuse in (True, False):
        llm = LLM(folder, tensor_parallel_size=tp, **flags)
        r = llm.llm_engine.runner
        r.fuse_unpack = fuse
        key = f"{tp}x1/{'fused' if fuse else 'unfused'}"
        out["tokens"][key] = tokens(llm, prompts + [list(range(3, 60)), [9] * 20])
        out.setdefault("packed_programs", {})[key] = r._packed_forward._cache_size()
# Tensor parallel: small steps sample inside the step's program (the default) or in a program of their own
# (JAXSERVE_FUSED_SAMPLING=0): the same tokens, greedy, seeded random with top-p, logprobs and n=2 (the samples fork
# off a fused step), and with penalties
# (never fused: lock-step steps, widths that grow with the tokens); chunked prefills (not fused) beside decodes (fused)
# hand each other their sampled ids.
RANDOM = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True, logprobs=2, n=2)
def samples(llm, prompts, sp):  # every sample's tokens (n > 1)
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, sp, use_tqdm=False)]
PENALTY = SamplingParams(temperature=0.0, presence_penalty=0.5, max_tokens=12, ignore_eos=True)
for fused in ("1", "0"):
    os.environ["JAXSERVE_FUSED_SAMPLING"] = fused
    llm = LLM(folder, tensor_parallel_size=2, **flags)
    r = llm.llm_engine.runner
    runs = [tokens(llm, prompts + [list(range(3, 60)), [9] * 20]), samples(llm, prompts, RANDOM)]
    n = r.fused_steps
    if fused == "1":  # penalties take the unfused route either way: once is enough
        runs.append(tokens(llm, prompts, PENALTY))
    out["tokens"][f"2x1/fused_sampling={fused}"] = runs
    out.setdefault("fused_steps", {})[fused] = [n, r.fused_steps - n, r._packed_forward._cache_size()]
del os.environ["JAXSERVE_FUSED_SAMPLING"]
llm = LLM(folder, **flags)  # TP=1 (its greedy run of these prompts is "1x1/micro_prompts")
out["tokens"]["1x1/sampling_runs"] = [samples(llm, prompts, RANDOM), tokens(llm, prompts, PENALTY)]
out["fused_steps"]["tp1"] = llm.llm_engine.runner.fused_steps
# One process: sharded steps take device inputs and run ahead of the host (async), also from the dispatch thread.
for tp, pp in [(2, 1), (2, 2)]:
    llm = LLM(folder, tensor_parallel_size=tp, pipeline_parallel_size=pp, dispatch_thread=True, **flags)
    out["tokens"][f"{tp}x{pp}/dispatch_thread"] = tokens(llm, prompts)
    out.setdefault("lockstep", {})[f"{tp}x{pp}"] = llm.llm_engine._needs_sync
# --compile-threads with a tensor-parallel forward: its shapes compile ahead of time from threads, and the
# warm-up runs and generation then compile no forward program.
import logging
seen, compiles = [], []
class Seen(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
logging.getLogger("jaxserve").addHandler(Seen())
logging.getLogger("jaxserve").setLevel(logging.INFO)
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: compiles.append(e) if e == "/jax/core/compile/backend_compile_duration" else None)
step_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: step_compiles.append(k.get("fun_name")) if e == "/jax/core/compile/backend_compile_duration"
    and ("step" in str(k.get("fun_name")) or "packed_fwd" in str(k.get("fun_name"))) else None)
llm = LLM(folder, tensor_parallel_size=2, compile_threads=2, **dict(flags, enforce_eager=False))
r = llm.llm_engine.runner
out["threads"] = {"aot": [m for m in seen if "ahead of time" in m], "step_compiles": step_compiles,
                  "shapes": len(r._warm_shapes()),
                  # the step programs the warm-up keeps (the collective scratch estimate counts them) against those
                  # it made: the step programs and the jitted forward-with-sampling's compiled variants
                  "programs": [r.num_step_programs(), len(r._programs) + r._sampled_forward._cache_size()]}
n = len(compiles)
out["tokens"]["2x1/threads"] = tokens(llm, prompts)
out["threads"]["compiles_in_generate"] = len(compiles) - n
jax.monitoring.clear_event_listeners()
# One process, one stage: a step is one program, which takes the packed inputs and the previous step's sampled ids
# replicated over the mesh (one transfer to both devices each) and unpacks them there.
r = llm.llm_engine.runner
packed, dims = r._dummy_packed(16, False)
compiled = r._packed_forward.lower(r.params, r.kv_caches, packed, r._no_prev, **dims, decode_only=False).compile()
args_in = compiled.input_shardings[0]
calls = []
for name in ("_unpack", "_packed_forward", "_forward", "_sampled_forward"):
    setattr(r, name, lambda *a, fn=getattr(r, name), name=name, **k: calls.append(name) or fn(*a, **k))
warmed = dict(r._programs)  # the warm-up's compiled steps, called as they are
for pid, prog in warmed.items():
    r._programs[pid] = lambda *a, fn=prog: calls.append("warmed step") or fn(*a)
tokens(llm, prompts)
out["tp_inputs"] = {"replicated": r._input_sharding == r.parallel.replicated[0],
                    "placed": [s.is_fully_replicated and len(s.device_set) for s in (packed.sharding, args_in[2],
                                                                                     r._no_prev.sharding, args_in[3])],
                    "programs": sorted(set(calls)), "steps": len(calls), "warmed": len(warmed)}
# The program store: a second start with the same compilation cache folder loads every step program that the first
# compiled (the devices of a 2-device mesh in a process of 8 included) and traces none, with the same tokens.
import tempfile
from jaxserve.model_runner import ModelRunner
from jax.experimental.compilation_cache import compilation_cache
os.environ["JAXSERVE_PROGRAM_STORE"] = "1"  # off in the tests (conftest.py), on here with a folder of its own
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
compilation_cache.reset_cache()  # jax opens its cache folder once: this one from now on
store = {}
for run in ("first", "second"):
    traced = []
    real_warm = ModelRunner._warm_call
    ModelRunner._warm_call = lambda self, *a: traced.append(a) or real_warm(self, *a)
    llm = LLM(folder, tensor_parallel_size=2, compile_threads=2, **dict(flags, enforce_eager=False))
    ModelRunner._warm_call = real_warm
    st = llm.llm_engine.runner._store
    store[run] = {"traced": len(traced), "loaded": st.hits, "saved": st.saved,
                  "tokens": tokens(llm, prompts) == out["tokens"]["1x1"],
                  "jit_steps": llm.llm_engine.runner._packed_forward._cache_size()}
out["store"] = store
# Real HF weights through the loader's re-layout: qwen2 (qkv bias, 2 kv heads) at tp=4 repeats kv heads.
qwen = sys.argv[4]
for tp in (1, 4):
    llm = LLM(qwen, tensor_parallel_size=tp, **dict(flags, load_format="auto"))
    out["tokens"][f"qwen2/{tp}"] = tokens(llm, prompts)
print("RESULT", json.dumps(out))
"""

SMOL_SCRIPT = """
flags = json.loads(sys.argv[1])
prompts = ["The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
sp = SamplingParams(temperature=0.0, max_tokens=8)
out = {}
for tp, pp in [(1, 1), (3, 1), (1, 2)]:
    out[f"{tp}x{pp}"] = tokens(LLM(None, tensor_parallel_size=tp, pipeline_parallel_size=pp, **flags), prompts, sp)
print("RESULT", json.dumps(out))
"""

MULTIHOST_SCRIPT = """
folder, prompts, flags = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
pid, port = int(sys.argv[4]), sys.argv[5]
llm = LLM(folder, tensor_parallel_size=8, num_processes=2, process_id=pid, coordinator_address=f"127.0.0.1:{port}",
          **flags)
print("RESULT", json.dumps(tokens(llm, prompts)))  # only process 0 gets here: the follower exits in LLM()
"""


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _script(tmp_path, name: str, body: str, devices: int) -> Path:
    path = tmp_path / name
    path.write_text(_PRELUDE % devices + body)
    return path


def _result(proc: subprocess.CompletedProcess):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny8")
    (folder / "config.json").write_text(json.dumps(TINY8))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tiny8, tmp_path_factory) -> dict:
    script = _script(tmp_path_factory.mktemp("tiny_run"), "tiny.py", TINY_SCRIPT, 8)
    qwen = REPO / "tests" / "data" / "tiny" / "qwen2"
    proc = subprocess.run([sys.executable, str(script), str(tiny8), json.dumps(PROMPTS), json.dumps(TINY_FLAGS),
                           str(qwen)], capture_output=True, text=True, env=_env(), timeout=300)
    return _result(proc)


# ------------------------------------------------------------------------------------------- layout
def test_valid_sizes_and_error_lists_them():
    arch = arch_from_dict(TINY8)
    assert valid_tp_sizes(arch, 8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4, 8"):
        tp_layout(arch, 3)
    smol = arch_from_dict(dict(TINY8, num_attention_heads=9, num_key_value_heads=3))
    assert valid_tp_sizes(smol, 9) == [1, 3, 9]
    lay = tp_layout(arch, 8)
    assert (lay.num_kv_heads, lay.kv_repeat, lay.intermediate_size, lay.vocab_size) == (8, 4, 104, 504)


def test_kv_head_replication_keeps_each_query_head_with_its_kv_head():
    """After expanding K=2 -> 8, query head h sits in kv group h // G' and that group's k/v are h // G's."""
    arch = arch_from_dict(TINY8)
    D, K, G, E = 64, 2, 4, 16
    w = np.random.default_rng(0).normal(size=(D, K, G + 2, E)).astype(np.float32)
    lay = tp_layout(arch, 8)
    x = relayout("wqkv", w, lay)
    Gl = G // lay.kv_repeat
    assert x.shape == (D, 8, Gl + 2, E)
    for h in range(K * G):
        np.testing.assert_array_equal(x[:, h // Gl, h % Gl], w[:, h // G, h % G])  # same q head
        np.testing.assert_array_equal(x[:, h // Gl, Gl:], w[:, h // G, G:])  # its kv head's k and v
    b = relayout("bqkv", w[0], lay)
    np.testing.assert_array_equal(b, x[0])


def test_invalid_tp_size_is_a_startup_error(tiny8):
    from jaxserve.engine_builder import StartupError
    from jaxserve.llm import LLM
    with pytest.raises(StartupError, match="valid sizes: 1, 2, 4, 8"):
        LLM(str(tiny8), tensor_parallel_size=3, **TINY_FLAGS)
    with pytest.raises(StartupError, match="pp-microbatch-tokens must be >= 0"):
        LLM(str(tiny8), pipeline_parallel_size=2, pp_microbatch_tokens=-1, **TINY_FLAGS)


# ----------------------------------------------------------------------------------- 8-device runs
@pytest.mark.parametrize("key", ["2x1", "4x1", "8x1", "1x2", "2x2"])
def test_greedy_tokens_equal_single_device(tiny_run, key):
    assert tiny_run["tokens"][key] == tiny_run["tokens"]["1x1"]
    assert tiny_run["logits_maxdiff"][key] < 1e-5  # fp32: only the summation order differs


def test_threaded_warmup_of_a_tensor_parallel_forward(tiny_run):
    # --compile-threads 2 at TP=2: the forward's shapes compile ahead of time from threads (the only way a cold
    # start of a big sharded model compiles in parallel), tokens equal the single-device run, and generation
    # compiles nothing more: jit finds the programs the threads made.
    assert len(tiny_run["threads"]["aot"]) == 1 and "from 2 threads" in tiny_run["threads"]["aot"][0]
    assert tiny_run["tokens"]["2x1/threads"] == tiny_run["tokens"]["1x1"]
    assert tiny_run["threads"]["compiles_in_generate"] == 0
    # each shape's sharded program (the fused one steps run) compiled once: the warm-up's runs found what the threads
    # compiled, and neither compiled the plain stage program
    names = tiny_run["threads"]["step_compiles"]
    assert len(names) == tiny_run["threads"]["shapes"] and all("packed_fwd" in n for n in names)
    counted, made = tiny_run["threads"]["programs"]
    assert counted == made > tiny_run["threads"]["shapes"]  # the fused (shape, sampler) programs included


def test_a_second_tensor_parallel_start_loads_its_step_programs(tiny_run):
    # first start: every shape traced and compiled, and kept; second: all loaded from the program store, none
    # traced, and steps never fall back to jit's program
    first, second = tiny_run["store"]["first"], tiny_run["store"]["second"]
    n = first["saved"]
    assert n > 0 and first["traced"] >= n and first["loaded"] == 0
    assert second == {"traced": 0, "loaded": n, "saved": 0, "tokens": True, "jit_steps": 0}
    assert first["tokens"]


def test_tensor_parallel_step_is_one_program_on_the_mesh(tiny_run):
    # packed inputs and previous ids replicated on both devices, as the program takes them (no copy at its call);
    # every step of a generation dispatched the fused program alone: no unpacking program, no plain forward
    t = tiny_run["tp_inputs"]
    assert t["replicated"] and t["placed"] == [2] * 4
    # prefill steps call the warmed step programs, decode steps the warmed forward with its sampling (tensor parallel)
    assert t["programs"] == ["_sampled_forward", "warmed step"] and t["steps"] >= 12 and t["warmed"] > 0
    # its logits: one local copy on the sampling device, cut back to the checkpoint's vocab (padded to 504 at tp=8)
    assert tiny_run["packed_logits"] == {k: [[4, 500], True] for k in ("2x1", "4x1", "8x1")}


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_unpack_gives_the_same_tokens_as_two_programs(tiny_run, tp):
    t, n = tiny_run["tokens"], tiny_run["packed_programs"]
    assert t[f"{tp}x1/fused"] == t[f"{tp}x1/unfused"] == t["1x1/micro_prompts"]
    assert n[f"{tp}x1/fused"] > 0 and n[f"{tp}x1/unfused"] == 0  # each run took its own route


def test_sampling_inside_the_tensor_parallel_step_gives_the_same_tokens(tiny_run):
    t, n = tiny_run["tokens"], tiny_run["fused_steps"]
    (greedy1, random1, penalty1), (greedy0, random0) = t["2x1/fused_sampling=1"], t["2x1/fused_sampling=0"]
    assert greedy1 == greedy0 == t["1x1/micro_prompts"]
    assert random1 == random0 == t["1x1/sampling_runs"][0] and penalty1 == t["1x1/sampling_runs"][1]
    assert all(len(o) == 2 for o in random1)  # n = 2: both samples compared
    # fused: the decode steps of the greedy and random runs (>= 11 each after a first token from the prefill), none
    # with penalties; off, and at TP=1, none
    assert n["1"][0] >= 22 and n["1"][1] == 0 and n["0"][:2] == [0, 0] and n["tp1"] == 0
    assert n["1"][2] > 0  # the prefill steps kept the step program that returns logits


@pytest.mark.parametrize("key", ["1x2", "2x2"])
def test_pipeline_micro_batches_give_the_same_tokens(tiny_run, key):
    assert tiny_run["micro_steps"][key] >= 2  # the prefill steps ran as two halves
    assert tiny_run["tokens"][f"{key}/micro"] == tiny_run["tokens"]["1x1/micro_prompts"]


def test_split_in_two_by_hand():
    import numpy as np

    from jaxserve.batch import InputBatch, split_in_two
    # T=16: sequence 0 has tokens 0-5 (positions 10-15, context 16), sequence 1 tokens 6-12 (positions 0-6),
    # sequence 2 token 13 (a decode at position 4, placeholder from row 1 of the previous step); 14 real tokens.
    T, P = 16, 4
    qsl = np.array([0, 6, 13, 14, 14, 14, 14, 14, 14], np.int32)  # B = 8 rows (min(T, max_num_seqs))
    seq_ids = np.array([0] * 6 + [1] * 7 + [2] + [0, 0], np.int32)
    pos = np.array(list(range(10, 16)) + list(range(7)) + [4, 0, 0], np.int32)
    tables = np.zeros((8, P), np.int32)
    tables[:3] = [[1, 2, 0, 0], [3, 0, 0, 0], [4, 0, 0, 0]]
    lens = np.zeros(8, np.int32)
    lens[:3] = [16, 7, 5]
    li = np.zeros(8, np.int32)
    li[:3] = [5, 12, 13]
    b = InputBatch(np.arange(T, dtype=np.int32), pos, pos + 100, seq_ids, tables, lens, qsl, li, False,
                   [None] * 3, 14, [], fill_dst=np.array([13] + [16] * 7, np.int32),
                   fill_src=np.array([1] + [0] * 7, np.int32))
    h0, h1, rows = split_in_two(b, max_seqs=8)
    # half 0: tokens 0-7 = sequence 0 whole and sequence 1's first two tokens (its context ends at position 1)
    assert list(h0.query_start_loc[:3]) == [0, 6, 8] and list(h0.seq_lens[:3]) == [16, 2, 0]
    assert list(h0.logits_indices[:2]) == [5, 0] and h0.num_tokens == 8 and h0.block_tables.shape == (8, P)
    assert list(h0.fill_dst) == [8] * 8  # no placeholder in half 0
    # half 1: tokens 8-15 = sequence 1's last five (positions 2-6) and sequence 2's decode token
    assert list(h1.token_seq_ids) == [0] * 5 + [1] + [0, 0] and list(h1.positions[:6]) == [2, 3, 4, 5, 6, 4]
    assert list(h1.query_start_loc[:3]) == [0, 5, 6] and list(h1.seq_lens[:2]) == [7, 5]
    assert list(h1.block_tables[1]) == [4, 0, 0, 0] and list(h1.logits_indices[:2]) == [4, 5]
    assert h1.fill_dst[0] == 5 and h1.fill_src[0] == 1 and h1.num_tokens == 6
    assert list(rows[:3]) == [0, 8, 9]  # row 0 from half 0, rows 1-2 from half 1 (after its 8 rows)
    assert split_in_two(b, max_seqs=4) is None  # rows grown past the bucket (n > 1 forks): run whole


@pytest.mark.parametrize("key", ["2x1", "2x2"])
def test_sharded_steps_run_async_from_the_dispatch_thread(tiny_run, key):
    assert tiny_run["lockstep"][key] is False  # one process: no host sync per step
    assert tiny_run["tokens"][f"{key}/dispatch_thread"] == tiny_run["tokens"]["1x1"]


def test_hf_weights_relayout_tp4_equals_tp1(tiny_run):
    assert tiny_run["tokens"]["qwen2/4"] == tiny_run["tokens"]["qwen2/1"]


def test_two_all_reduces_per_layer(tiny_run):
    """Megatron: psum after wo and after w_down in each layer; one all-gather for the logits."""
    c = tiny_run["collectives"]
    assert c["4x1/0"] == c["8x1/0"] == {"all-reduce": 2 * 4, "all-gather": 1}
    # the fused program steps run: its input unpacking adds no collective
    assert c["2x1/packed"] == c["4x1/packed"] == c["8x1/packed"] == {"all-reduce": 2 * 4, "all-gather": 1}
    assert c["2x2/0"] == {"all-reduce": 2 * 2}  # stage 0: layers 0-1, no logits
    assert c["2x2/1"] == {"all-reduce": 2 * 2, "all-gather": 1}
    assert c["1x2/0"] == c["1x2/1"] == {}


def test_kv_pages_sharded_by_head(tiny_run):
    kv = tiny_run["kv"]
    assert kv["1x1"] == [[2, 64, 16, 16], [2, 64, 16, 16], 1]
    assert kv["2x1"] == [[2, 64, 16, 16], [1, 64, 16, 16], 2]
    assert kv["8x1"] == [[8, 64, 16, 16], [1, 64, 16, 16], 8]  # 2 kv heads replicated to 8, one per device
    per_layer_head = 2 * 16 * 16 * 4  # k and v, block 16, head dim 16, fp32
    b = tiny_run["kv_bytes_per_block"]
    assert b["2x1"] == 4 * 1 * per_layer_head and b["8x1"] == 4 * 1 * per_layer_head
    assert b["1x2"] == 2 * 2 * per_layer_head and b["2x2"] == 2 * 1 * per_layer_head


@pytest.mark.slow
def test_smollm2_tp3_and_pp2_equal_tp1(tmp_path):
    """The default model (9 q heads, 3 kv heads, tied embeddings) at tp=3 and pp=2."""
    from conftest import SMOL_FLAGS
    script = _script(tmp_path, "smol.py", SMOL_SCRIPT, 8)
    proc = subprocess.run([sys.executable, str(script), json.dumps(SMOL_FLAGS)], capture_output=True, text=True,
                          env=_env(), timeout=300)
    out = _result(proc)
    assert out["3x1"] == out["1x1"]
    assert out["1x2"] == out["1x1"]


@pytest.mark.slow
def test_two_processes_tp8_equal_one_process(tiny8, tiny_run, tmp_path):
    """jax.distributed on loopback, 2 processes x 4 CPU devices, tp=8 across both (gloo collectives)."""
    script = _script(tmp_path, "mh.py", MULTIHOST_SCRIPT, 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(tiny8), json.dumps(PROMPTS), json.dumps(TINY_FLAGS)]
    procs = [subprocess.Popen([sys.executable, str(script), *args, str(i), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 0, outs[1][1][-4000:]
    got = _result(subprocess.CompletedProcess([], procs[0].returncode, outs[0][0], outs[0][1]))
    assert got == tiny_run["tokens"]["1x1"]
