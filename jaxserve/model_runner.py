"""Runs one scheduled step on the device: jitted forward per bucket, donated KV, on-device sampling.

Design note. The step is two jitted calls: `packed_forward(params, kv, packed, prev_sampled)
-> (logits, kv)`, which unpacks the step's inputs from one i32 buffer, fills placeholder tokens from
the previous step's sampled ids and runs the model, with the KV cache donated (updated in place),
compiled once per token bucket (and a decode-only variant per bucket up to max_num_seqs, where the
decode kernel applies); and `sample(logits, md)` compiled per (rows bucket, sampler flags). Both are
dispatched asynchronously; the only device->host transfer per step is the sampled ids (and logprobs
when a request asked for them). `warmup()` compiles every forward bucket before serving, and reports
what it compiled and how long it took; steps of those shapes then call the compiled programs as they
are, and the program store (program_store.py) keeps them for the next start, which loads them
without tracing anything. Block copies (copy-on-write) and swaps run before the forward pass. With a
`parallel.ParallelPlan` the forward is the plan's (shard_map over the tp mesh, stage by stage over
pp) and each layer's pages carry the plan's sharding. Pipeline stages (several programs) unpack in a
program of their own (`_unpack`) and then run the plain `forward(params, kv, token_ids, meta,
logits_indices)`; multi-host steps (host inputs, replayed by the followers) run that forward on numpy
arrays, with nothing packed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import kv_cache, sampler
from jaxserve.attention import AttentionMetadata, dummy_metadata
from jaxserve.batch import InputBatch, build_batch, make_buckets, split_in_two
from jaxserve.program_store import ProgramStore
from jaxserve.sampling_params import MAX_LOGPROBS

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("k",))
def prompt_logprobs_fn(logits, next_ids, k: int):
    """logits f32[N, V], next_ids i32[N] -> (logprob of next token [N], its rank [N], top ids/logprobs [N, k])."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(lp, next_ids[:, None], axis=-1)[:, 0]
    rank = jnp.sum(lp > tok_lp[:, None], axis=-1) + 1
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return tok_lp, rank, top_ids, top_lp


def _packed_sizes(T: int, B: int, P: int, S: int) -> tuple:
    """Lengths of the packed step inputs, in order: token_ids, positions, slots, seq ids (T each), tables
    (B * P), seq_lens (B), query_start_loc (B + 1), logits indices (S), fill dst and src (B each)."""
    return (T, T, T, T, B * P, B, B + 1, S, B, B)


# Each packed input starts on a 256-byte boundary. Unpacked inside the forward's program, the parts are slices of
# one parameter, which XLA hands to the kernels in place (no copy), and Mosaic GPU kernels refuse inputs that are
# not 256-byte aligned ("Input buffer 4 is not 256-byte aligned" on the H100, session 10).
_PACK_ALIGN = 64  # int32s


def _packed_offsets(T: int, B: int, P: int, S: int) -> tuple[list[int], int]:
    """(start of each of _packed_sizes' parts, total length), every start a multiple of _PACK_ALIGN."""
    offsets, o = [], 0
    for n in _packed_sizes(T, B, P, S):
        offsets.append(o)
        o += -(-n // _PACK_ALIGN) * _PACK_ALIGN
    return offsets, o


def _unpack_fn(packed, prev_sampled, *, T: int, B: int, P: int, S: int):
    """Split the step's packed i32 inputs on the device and fill placeholder tokens from the previous
    step's sampled ids: token_ids[dst[i]] = prev_sampled[src[i]] (dst == T marks padding, dropped)."""
    offsets, _ = _packed_offsets(T, B, P, S)
    parts = [packed[o:o + n] for o, n in zip(offsets, _packed_sizes(T, B, P, S))]
    token_ids, positions, slots, seq_ids, tables, seq_lens, qsl, li, dst, src = parts
    token_ids = token_ids.at[dst].set(prev_sampled[src].astype(jnp.int32), mode="drop")
    return token_ids, positions, slots, seq_ids, tables.reshape(B, P), seq_lens, qsl, li


_unpack = jax.jit(_unpack_fn, static_argnames=("T", "B", "P", "S"))


def _step_inputs(unpacked: tuple, decode_only: bool) -> tuple:
    """`_unpack_fn`'s arrays -> the forward's (token_ids, meta, logits_indices)."""
    token_ids, positions, slots, seq_ids, tables, seq_lens, qsl, li = unpacked
    meta = AttentionMetadata(slot_mapping=slots, positions=positions, token_seq_ids=seq_ids, block_tables=tables,
                             seq_lens=seq_lens, query_start_loc=qsl, decode_only=decode_only)
    return token_ids, meta, li


def packed_forward(forward):
    """forward(params, kv, token_ids, meta, li) -> (logits, kv) as one jitted program that unpacks the step's
    packed inputs first, KV donated. A step is then one dispatch, not two: each costs host time, more so for a
    program over several devices (enqueueing a TP=2 step took 3.9-5.2 ms on 2 x H100, 1.8-2.2 ms at TP=1)."""
    def packed_fwd(params, kv, packed, prev_sampled, *, T: int, B: int, P: int, S: int, decode_only: bool):
        unpacked = _unpack_fn(packed, prev_sampled, T=T, B=B, P=P, S=S)
        return forward(params, kv, *_step_inputs(unpacked, decode_only))

    return jax.jit(packed_fwd, donate_argnums=(1,), static_argnames=("T", "B", "P", "S", "decode_only"))


@jax.jit
def _pick_rows(a, b, rows):
    """The step's sampled rows, in order, out of two micro-batches' logits stacked."""
    return jnp.concatenate([a, b])[rows]


@functools.partial(jax.jit, static_argnames=("treedef", "layout", "ids_len"))
def _sample_packed(logits, packed, *, treedef, layout, ids_len: int):
    """Sampling metadata arrives as one i32 buffer (one host->device copy, not fourteen): split it,
    bitcast each leaf back to its dtype, rebuild the metadata pytree and sample.

    The sampled ids are padded to `ids_len` rows: the next step's unpacking reads them, and one fixed
    shape there means one compiled step per token bucket, not one per (bucket, previous rows)."""
    leaves, o = [], 0
    for shape, dtype in layout:
        n = int(np.prod(shape))
        part = packed[o:o + n]
        o += n
        if dtype != "int32":
            part = jax.lax.bitcast_convert_type(part, jnp.dtype(dtype))
        leaves.append(part.reshape(shape))
    out = sampler.sample(logits, jax.tree.unflatten(treedef, leaves))
    pad = max(0, ids_len - out.token_ids.shape[0])
    return out.replace(token_ids=jnp.pad(out.token_ids, (0, pad)))


def sampled_forward(forward, ids_sharding=None):
    """forward(params, kv, token_ids, meta, li) -> (logits, kv) as one jitted program that unpacks the step's inputs,
    runs the forward and samples: -> (SamplerOutput, kv). `packed` holds the step's packed inputs followed by the
    sampling metadata's (pack_metadata). Under tensor parallelism, returning the step's replicated f32 logits and
    sampling them in a program of its own cost 0.6-1.3 ms more host enqueue per step than returning the sampled
    ids (2 x H200, docs/PERF.md session 12), and the ids then had to be copied back to the mesh for the next step."""
    def fwd_sample(params, kv, packed, prev_sampled, *, T: int, B: int, P: int, S: int, decode_only: bool, treedef,
                   layout, ids_len: int):
        n = _packed_offsets(T, B, P, S)[1]
        unpacked = _unpack_fn(packed[:n], prev_sampled, T=T, B=B, P=P, S=S)
        logits, kv = forward(params, kv, *_step_inputs(unpacked, decode_only))
        out = _sample_packed(logits, packed[n:], treedef=treedef, layout=layout, ids_len=ids_len)
        if ids_sharding is not None:  # placed as the next step's prev_sampled is: one compiled program serves both
            out = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, ids_sharding), out)
        return out, kv

    return jax.jit(fwd_sample, donate_argnums=(1,),
                   static_argnames=("T", "B", "P", "S", "decode_only", "treedef", "layout", "ids_len"))


def fused_sampling_default() -> bool:
    """JAXSERVE_FUSED_SAMPLING=0 keeps sampling in a program of its own under tensor parallelism (an A/B switch)."""
    return os.environ.get("JAXSERVE_FUSED_SAMPLING", "1") != "0"


# The largest steps that sample inside their program. With every decode shape up to 512 fused (2 x H200, 512 running
# requests), the warm-up's T=512 fused program failed to allocate its all-reduce scratch ("Failed to allocate
# collective memory", CUDA out of memory): the fused programs' memory is not part of the KV cache's sizing. The gain
# is at small batches, where the host sets the step's pace (docs/PERF.md, session 12).
FUSED_SAMPLING_MAX_TOKENS = 64


def _fusable(md) -> bool:
    """Sampler variants a fused step serves: those whose metadata widths do not grow with the requests' token lists
    (penalties, logit_bias and min_tokens do), so a few compiled programs per step shape cover them."""
    f = md.flags
    return not (f.penalties or f.logit_bias or f.min_tokens)


def _pack_step(token_ids, meta, li, fill_dst=None, fill_src=None) -> tuple:
    """One host->device transfer for all of a step's int32 inputs (seven small copies cost ms on a GPU)
    -> (packed i32, laid out by _packed_offsets; dims T, B, P, S). meta: an InputBatch or AttentionMetadata (the
    same field names); no fill_dst: no placeholder (dst = T everywhere, dropped)."""
    T, (B, P), S = len(token_ids), meta.block_tables.shape, len(li)
    fill_dst = np.full(B, T, np.int32) if fill_dst is None else fill_dst
    fill_src = np.zeros(B, np.int32) if fill_src is None else fill_src
    offsets, total = _packed_offsets(T, B, P, S)
    packed = np.zeros(total, np.int32)
    parts = (token_ids, meta.positions, meta.slot_mapping, meta.token_seq_ids, meta.block_tables, meta.seq_lens,
             meta.query_start_loc, li, fill_dst, fill_src)
    for o, n, a in zip(offsets, _packed_sizes(T, B, P, S), parts):
        a = np.asarray(a).reshape(-1)
        if len(a) != n:  # a short part would read as zeros (dst 0: token 0 overwritten), a long one spill over
            raise ValueError(f"packed step input of {len(a)} values where {n} belong (T={T} B={B} P={P} S={S})")
        packed[o:o + n] = a
    return packed, dict(T=T, B=B, P=P, S=S)


def pack_metadata(md) -> tuple:
    """(one i32 numpy buffer, treedef, layout) of a SamplingMetadata whose leaves are all 4-byte dtypes."""
    leaves, treedef = jax.tree.flatten(md)
    layout = tuple((x.shape, x.dtype.name) for x in leaves)
    packed = np.concatenate([np.ascontiguousarray(x).view(np.int32).ravel() for x in leaves])
    return packed, treedef, layout


PERSISTENT_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # jax's monitoring event for a program it loaded


_compile_tls = threading.local()  # per compiling thread: jax's persistent-cache hits seen (_note_cache_hit)


def _note_cache_hit(event: str, **kwargs) -> None:
    if event == PERSISTENT_CACHE_HIT:  # called in the thread whose compile loaded the program
        _compile_tls.hits = getattr(_compile_tls, "hits", 0) + 1


def _cache_hits() -> int:
    """Persistent-cache hits seen so far in this thread (with _watch_cache_hits registered)."""
    return getattr(_compile_tls, "hits", 0)


def _loads_from_cache(fn) -> tuple:
    """(fn(), whether jax loaded a program from its persistent compilation cache in this thread while fn ran).
    Registers the listener (_watch_cache_hits): call it before other threads compile."""
    _watch_cache_hits()
    before = _cache_hits()
    out = fn()
    return out, _cache_hits() > before


def _watch_cache_hits() -> None:
    """(Re-)register _note_cache_hit, once, before compiles start (jax's listener list is not thread-safe to change
    while other threads compile; tests clear it)."""
    try:
        jax.monitoring.unregister_event_listener(_note_cache_hit)
    except (AssertionError, ValueError):
        pass
    jax.monitoring.register_event_listener(_note_cache_hit)


# Whether a program jax loaded from its persistent cache may be serialized again into the program store, so that a
# start whose store lacks it (a new jaxserve on an old cache) fills the store too. Yes on the GPU: the three starts of
# scripts/check_program_store.py --store-cache-hits gave the same tokens on an H100 (jax 0.11.2, CUDA 13; docs/
# PERF.md, session 11). Not on CPU: such a program loads but fails when run ("NOT_FOUND: Function
# copy_bitcast_fusion.3 not found"), so there only programs compiled in the process are stored. Other platforms:
# not checked, so not stored.
STORE_CACHE_HITS = {"cpu": False, "cuda": True}
# Threads loading stored programs at start-up (deserializing runs in XLA, outside Python's GIL).
LOAD_THREADS = 4


def _runtime_tag() -> str:
    """STORE_CACHE_HITS' key for this process's devices: "cuda" for NVIDIA GPUs (jax calls ROCm's "gpu" too)."""
    dev = jax.devices()[0]
    if dev.platform == "gpu" and "nvidia" in str(getattr(dev, "device_kind", "")).lower():
        return "cuda"
    return dev.platform


def warm_shapes(token_buckets: list[int], max_num_seqs: int, has_decode_kernel: bool) -> list[tuple[int, bool]]:
    """(tokens, decode_only) of every step program the warm-up compiles."""
    shapes = [(T, False) for T in token_buckets]
    if has_decode_kernel:  # the XLA path serves decode with the same program
        shapes += [(T, True) for T in token_buckets if T <= max_num_seqs]
    return shapes


def fused_shape(T: int, decode_only: bool, token_buckets: list[int], max_num_seqs: int,
                has_decode_kernel: bool) -> bool:
    """ModelRunner._fused_shape for given buckets."""
    return T <= max(min(max_num_seqs, FUSED_SAMPLING_MAX_TOKENS), token_buckets[0]) and (
        decode_only or not has_decode_kernel)


def step_program_count(token_buckets: list[int], max_num_seqs: int, has_decode_kernel: bool,
                       sampled_forward: bool) -> int:
    """ModelRunner.num_step_programs from the buckets alone (engine_builder needs it before JAX starts)."""
    shapes = warm_shapes(token_buckets, max_num_seqs, has_decode_kernel)
    n = len(shapes)
    if sampled_forward:
        n += 2 * sum(fused_shape(T, dec, token_buckets, max_num_seqs, has_decode_kernel) for T, dec in shapes)
    return n


class ModelRunner:
    def __init__(self, model, params, arch, *, block_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, kv_dtype, mesh=None, kv_sharding=None, num_kv_heads=None,
                 parallel=None, specs=None):
        self.model, self.params, self.arch = model, params, arch
        self.block_size = block_size
        self.pages_per_seq = -(-max_model_len // block_size)
        self.max_num_seqs = max_num_seqs
        self.token_buckets = make_buckets(max(max_num_batched_tokens, max_num_seqs))
        self.kv_dtype = kv_dtype
        self.kv_sharding = kv_sharding
        self.num_kv_heads = num_kv_heads
        self.kv_caches = None
        self.swap: kv_cache.HostSwapSpace | None = None
        self.compiled: dict[tuple, float] = {}
        # The compiled step of each warmed shape, (T, B, P, S, decode_only) -> jax.stages.Compiled: steps of those
        # shapes call it directly. compile_ahead/warmup take it from the program store (no tracing) or compile
        # it (and store it); other shapes, and runs without warm-up, go through the jitted _packed_forward.
        self._programs: dict[tuple, object] = {}
        self._store: ProgramStore | None = None  # made at the first compile_ahead/warmup (the cache folder is set)
        self._store_made = False
        self._store_tried: set[tuple] = set()
        self._from_store: dict[tuple, str] = {}  # programs loaded from the store, by id -> their key

        def fwd(params, kv, token_ids, meta, logits_indices):
            return model.apply({"params": params}, token_ids, kv, meta, logits_indices)

        self._forward = jax.jit(fwd, donate_argnums=(1,))
        self._copy_blocks = kv_cache.copy_blocks
        self.parallel = parallel
        self.microbatched_steps = 0  # steps run as two pipeline micro-batches (parallel.forward_microbatched)
        # Step inputs built on the device (packed, placeholders filled there), so the engine need not wait for
        # a step before scheduling the next. A sharded step takes them too in one process; a multi-host
        # leader sends host inputs to its followers (LeaderRunner), so it runs in lock-step.
        self.device_inputs = parallel is None or jax.process_count() == 1
        # Where a step's logits (and so the sampler and the sampled ids) live: the last stage's first device.
        self.logits_device = jax.devices()[0] if parallel is None else parallel.mesh.devices[-1, 0]
        if parallel is not None:  # params: one dict per stage; pages: each layer on its stage's tp mesh
            self._forward = parallel.make_forward(model, specs)
            self._copy_blocks = parallel.copy_blocks
            self.kv_sharding = parallel.kv_shardings()
        self._sample = jax.jit(sampler.sample)
        # Rows of sampled ids handed from one step to the next (see _sample_packed).
        self.ids_len = max_num_seqs  # the most rows a step samples (more only while n > 1 prompts fork)
        # Committed, like the sampler outputs it stands in for (committedness is part of jit's cache key).
        self._no_prev = jax.device_put(np.zeros((self.ids_len,), np.int32), jax.devices()[0])
        # Tensor parallelism in one process, one stage: the packed inputs go to every device of the mesh in one
        # transfer and are unpacked there, replicated as the sharded step takes them. Unpacked on one device, each
        # of the ~9 arrays was copied to the mesh on its own: 8.5 ms of host time per step at TP=2 under the
        # profiler on 2 x H100 (docs/PERF.md, session 7).
        self._input_sharding = None
        self._unpack = _unpack
        if parallel is not None and parallel.pp == 1 and self.device_inputs:
            self._input_sharding = parallel.replicated[0]
            self._unpack = jax.jit(_unpack_fn, static_argnames=("T", "B", "P", "S"),
                                   out_shardings=self._input_sharding)
            self._no_prev = jax.device_put(self._no_prev, self._input_sharding)
        # One program per step where one stage in this process runs the whole step: the forward unpacks its own
        # inputs (packed_forward). Pipeline stages unpack first (_unpack), then run_forward; multi-host steps
        # pass host arrays to run_forward.
        # Tests set it False to compare the two routes.
        self.fuse_unpack = self.device_inputs and (parallel is None or parallel.pp == 1)
        self._packed_forward = None
        self._sampled_forward = None  # forward + sampling in one program (tensor parallel, see below)
        self.fused_steps = 0  # steps run through it
        self.compile_threads = 1  # compile_ahead's
        if self.fuse_unpack and parallel is None:
            self._packed_forward = packed_forward(fwd)
        elif self.fuse_unpack:  # tensor parallel: the one stage's shard_map'd step, logits trimmed to the vocab
            stage = parallel.stage_steps[0]

            def tp_fwd(params, kv, token_ids, meta, li):  # params: split_params' tuple of one stage
                return stage(params[0], kv, token_ids, meta, li)

            self._packed_forward = packed_forward(tp_fwd)
            # Tensor parallel: small steps sample inside the step's program (sampled_forward), their ids stay on
            # the mesh for the next step. Compiled at warm-up for greedy and plain random sampling.
            if fused_sampling_default():
                self._sampled_forward = sampled_forward(tp_fwd, self._input_sharding)

    # ----------------------------------------------------------------------------------------- memory
    def allocate_kv(self, num_blocks: int, num_host_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = kv_cache.allocate(self.arch, num_blocks, self.block_size, self.kv_dtype,
                                           self.kv_sharding, self.num_kv_heads)
        if num_host_blocks:
            self.swap = kv_cache.HostSwapSpace(self.arch, num_host_blocks, self.block_size, self.kv_dtype,
                                               self.num_kv_heads)

    def discard_programs(self) -> None:
        """Forget the step programs compiled or loaded for the current page count (compile_ahead), so that warm-up
        makes them for another one (the engine builder's allocation fell back to fewer pages)."""
        self._programs.clear()
        self._from_store.clear()
        self._store_tried.clear()

    def profile_run(self) -> int | None:
        """The largest token bucket's step program on a tiny cache, so its activation memory is known.

        Returns the bytes that forward needs besides its inputs (temporaries + outputs), from XLA's memory
        analysis of the compiled program, or None where that is not available (sharded steps, runtimes without
        it). Unlike the allocator's peak after the run, this figure does not depend on whether the program was
        compiled now (XLA's autotuning allocates scratch through the same allocator) or loaded from the
        persistent cache, so a warm restart sizes the same KV cache, and finds its compiled programs."""
        T = self.token_buckets[-1]
        inputs_key = self._activation_inputs_key(T) if self.parallel is None else None
        if (activation := _activation_cache_get(inputs_key)) is not None:
            return activation
        saved = self.kv_caches
        self.kv_caches = kv_cache.allocate(self.arch, 2, self.block_size, self.kv_dtype, self.kv_sharding,
                                           self.num_kv_heads)
        fn, args, kw = self._warm_call(T, False, self.kv_caches)
        if self.parallel is None:
            try:
                lowered = fn.lower(*args, **kw)
                lowered_key = _activation_key(lowered.as_text())
                activation = _activation_cache_get(lowered_key)
                if activation is None:
                    ma = lowered.compile().memory_analysis()
                    # outputs aliased to donated inputs (the tiny cache's pages) take no new memory
                    activation = int(ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes)
                _activation_cache_put({lowered_key: activation, inputs_key: activation})
            except (AttributeError, NotImplementedError, TypeError):  # no analysis on this runtime
                activation = None
        if activation is None:  # the allocator's peak after a real run is the measure then
            logits, self.kv_caches = fn(*args, **kw)
            jax.block_until_ready(logits)
            del logits
        self.kv_caches = saved
        return activation

    def _activation_inputs_key(self, T: int) -> str | None:
        """profile_run's side-cache key from what its program is made of, without tracing it: this package's
        source, the model and its weights' shapes, the cache layout, the step shape and the settings that steer
        tracing (jax's config, JAXSERVE_* variables). Lowering the 8B program to key on its text took 3.9-4.5 s
        of each warm start on the H100 (docs/PERF.md, session 10). A key with an object's address in it never
        hits, and the lowered text's key is the fallback."""
        return _activation_key("\0".join(["inputs", self._made_of(),
                                          repr((T, self.max_num_seqs, self.pages_per_seq, self.block_size,
                                                str(self.kv_dtype), self.num_kv_heads, self.fuse_unpack,
                                                self.ids_len))]))

    def _made_of(self) -> str:
        """What every step program of this runner is made of, read without tracing: this package's source, the
        model, its weights' shapes, dtypes and placement, and the settings that steer tracing (jax's config,
        JAXSERVE_* variables). No object's address: the same command must give the same text in another process."""
        leaves = [(k, np.shape(v), str(getattr(v, "dtype", type(v).__name__)), str(getattr(v, "sharding", "")))
                  for k, v in jax.tree_util.tree_leaves_with_path(self.params)]
        config = sorted((k, v) for k, v in jax.config.values.items() if isinstance(v, (str, int, float, bool)))
        env = sorted((k, v) for k, v in os.environ.items() if k.startswith("JAXSERVE_") and k not in _NOT_TRACED)
        return "\0".join([_source_digest(), _versions(), repr(self.arch), repr(self.model), repr(leaves),
                          repr(config), repr(env)])

    def _program_key(self, T: int, decode_only: bool, num_blocks: int) -> str | None:
        """The program store's key of a step shape's compiled program on a cache of num_blocks pages: what
        profile_run's key holds, plus the devices it runs on and how its inputs are placed. None without a
        compilation cache."""
        mesh = None if self.parallel is None else (self.parallel.mesh.axis_names,
                                                   [d.id for d in self.parallel.mesh.devices.flat])
        layout = (T, decode_only, num_blocks, self.max_num_seqs, self.pages_per_seq, self.block_size,
                  str(self.kv_dtype), self.num_kv_heads, self.ids_len, str(self.kv_sharding),
                  str(self._input_sharding), mesh,
                  [(d.id, d.device_kind, getattr(d, "core_count", None)) for d in jax.devices()])
        return _activation_key("\0".join(["program", self._made_of(), repr(layout)]))

    # ---------------------------------------------------------------------------------------- compile
    def _dummy_rows(self, T: int, decode_only: bool) -> int:
        return T if decode_only else min(T, self.max_num_seqs)

    def _dummy_inputs(self, T: int, decode_only: bool):
        B = self._dummy_rows(T, decode_only)
        args = dummy_metadata(T, B, self.pages_per_seq, decode_only), jnp.zeros(T, jnp.int32), jnp.zeros(B, jnp.int32)
        if self.parallel is None:
            # Committed, as the step's real inputs (outputs of `_unpack`) are: jit keys its cache on
            # committedness, so uncommitted stand-ins would leave every shape to be compiled (or loaded from
            # the persistent cache) again at its first real use, stalling a serving engine for seconds.
            args = jax.device_put(args, jax.devices()[0])
        return args

    def _dummy_packed(self, T: int, decode_only: bool) -> tuple:
        """`_dummy_inputs`' values as a step's packed inputs (no placeholder), placed as launch_forward places
        them: committedness and sharding are part of jit's cache key. -> (packed, dims)."""
        meta, ids, li = self._dummy_inputs(T, decode_only)
        packed, dims = _pack_step(ids, meta, li)
        return jax.device_put(packed, self._input_sharding), dims

    def _warm_call(self, T: int, decode_only: bool, kv) -> tuple:
        """(jitted program, args, kwargs) of an all-padding T-token step on `kv`, the program steps run: the fused
        one where they unpack in it, else the plain forward."""
        if self.fuse_unpack:
            packed, dims = self._dummy_packed(T, decode_only)
            return self._packed_forward, (self.params, kv, packed, self._no_prev), dict(dims, decode_only=decode_only)
        meta, ids, li = self._dummy_inputs(T, decode_only)
        return self._forward, (self.params, kv, ids, meta, li), {}

    def _warm_shapes(self) -> list[tuple[int, bool]]:
        return warm_shapes(self.token_buckets, self.max_num_seqs, self.model.backend.has_decode_kernel)

    def num_step_programs(self) -> int:
        """Forward programs the warm-up makes and keeps: one per step shape, and under tensor parallelism one more
        per (shape, sampler) pair that samples inside its program (greedy and plain random)."""
        return step_program_count(self.token_buckets, self.max_num_seqs, self.model.backend.has_decode_kernel,
                                  self._sampled_forward is not None and self.fuse_unpack)

    def _program_store(self) -> ProgramStore | None:
        if not self._store_made:
            self._store, self._store_made = ProgramStore.beside_compile_cache(), True
        return self._store

    def _program_id(self, T: int, decode_only: bool) -> tuple:
        """`_programs`' key of a warmed shape: the packed dims its steps carry, and decode_only."""
        B = self._dummy_rows(T, decode_only)
        return T, B, self.pages_per_seq, B, decode_only  # _dummy_packed's dims: S = B sampled rows

    def _compile_program(self, shape: tuple, kv, store, num_blocks: int) -> tuple[float, float]:
        """Trace, lower and compile one step shape's program for `kv` (arrays or their abstract values; XLA
        loads it from the persistent cache where it can), keep it in `_programs` and in the program store.
        Returns (seconds tracing and lowering, seconds compiling or loading)."""
        t1 = time.perf_counter()
        fn, args, kw = self._warm_call(*shape, kv)
        lowered = fn.lower(*args, **kw)
        t2 = time.perf_counter()
        hits = _cache_hits()
        compiled = lowered.compile()
        from_cache = _cache_hits() > hits
        t3 = time.perf_counter()
        self._programs[self._program_id(*shape)] = compiled
        if store is not None and (not from_cache or STORE_CACHE_HITS.get(_runtime_tag(), False)):
            store.save(self._program_key(*shape, num_blocks), self._program_id(*shape), compiled)
        return t2 - t1, t3 - t2

    def _load_programs(self, shapes: list, store, num_blocks: int) -> list:
        """Load what the program store holds of `shapes` into `_programs`, from LOAD_THREADS threads; returns the
        shapes it lacks."""
        todo, missing = [], []
        for shape in shapes:
            pid = self._program_id(*shape)
            if pid in self._programs:
                continue
            if store is not None and pid not in self._store_tried:  # one try each: compile_ahead, then warmup
                self._store_tried.add(pid)
                todo.append((shape, pid, self._program_key(*shape, num_blocks)))
            else:
                missing.append(shape)
        loaded = []
        if todo:
            with ThreadPoolExecutor(min(LOAD_THREADS, len(todo)), thread_name_prefix="jaxserve-load") as pool:
                loaded = list(pool.map(lambda t: store.load(t[2], t[1]), todo))
        for (shape, pid, key), compiled in zip(todo, loaded):
            if compiled is None:
                missing.append(shape)
            else:
                self._programs[pid] = compiled
                self._from_store[pid] = key
        return sorted(missing, key=shapes.index)  # in the order asked (compile_ahead: the largest first)

    def compile_ahead(self, num_blocks: int, threads: int) -> float:
        """Make every step shape's program for a KV cache of num_blocks pages, before that cache is allocated.

        First from the program store (program_store.py: compiled programs kept by a previous start, loaded with
        nothing traced). What it lacks compiles from `threads` threads (XLA compiles with the GIL released),
        before the pages exist: XLA's autotuning runs candidate kernels on buffers it allocates as it compiles,
        several at once here, and with the pages already taking 90% of the memory that ran out on an H100 (TP=1,
        8 threads, session 6); with one thread warmup() compiles them instead. Pipeline stages are several
        programs, each fed by the last, and multi-host runs compile in lock-step: both compile one by one in
        warmup() (neither runs the fused step, the one program made here). Returns seconds."""
        self.compile_threads = threads  # the fused forward + sampling (_warmup_sampled_forward) compiles from these
        if not self.fuse_unpack:
            return 0.0
        t0 = time.perf_counter()
        store = self._program_store()
        shapes = sorted(self._warm_shapes(), reverse=True)  # the slowest (largest) first
        missing = self._load_programs(shapes, store, num_blocks)
        if len(missing) < len(shapes):
            log.info("loaded %d of %d step programs from the program store in %.1f s (nothing traced)",
                     len(shapes) - len(missing), len(shapes), time.perf_counter() - t0)
        if threads <= 1 or not missing:
            return time.perf_counter() - t0
        kv = kv_cache.abstract(self.arch, num_blocks, self.block_size, self.kv_dtype, self.kv_sharding,
                               self.num_kv_heads)

        def compile_one(shape) -> tuple[float, float]:
            return self._compile_program(shape, kv, store, num_blocks)

        # The first one alone: a process's first trace sets up what every later one reuses (lowering rules,
        # kernel caches). Raced by 8 threads it made a warm start's compiles 17-18 s instead of 11 s on the H100.
        first, loaded = _loads_from_cache(lambda: compile_one(missing[0]))
        times = [first]
        if loaded:
            # Loaded from the persistent cache: what is left is mostly tracing, which holds the GIL. Two threads
            # overlap it with the loads; more only contend for the GIL (H100, one machine, warm start to first
            # token: 19.6 s at 2 threads, 21.9 at 4, 22.8 at 8, 22.9 at 1; docs/PERF.md, session 10).
            threads = min(threads, 2)
        with ThreadPoolExecutor(threads, thread_name_prefix="jaxserve-compile") as pool:
            times += list(pool.map(compile_one, missing[1:]))
        dt = time.perf_counter() - t0
        # Summed over the threads: tracing and lowering hold the GIL, XLA's compiles (or cache loads) do not.
        log.info("compiled %d step shapes ahead of time from %d threads in %.1f s (summed over threads: tracing "
                 "and lowering %.1f s, compiling or loading from the cache %.1f s)", len(missing), threads, dt,
                 sum(a for a, _ in times), sum(b for _, b in times))
        return dt

    def warmup(self) -> float:
        """Run every forward bucket once now, compiling it (or loading what compile_ahead made) before serving,
        and the per-step helpers. Returns seconds spent."""
        t0 = time.perf_counter()
        shapes = self._warm_shapes()
        store = self._program_store() if self.fuse_unpack else None
        if self.fuse_unpack:
            self._load_programs(shapes, store, self.num_blocks)
            _watch_cache_hits()
        for T, dec in shapes:
            t1 = time.perf_counter()
            if self.fuse_unpack:  # the compiled program steps of this shape call
                pid = self._program_id(T, dec)
                if pid not in self._programs:
                    self._compile_program((T, dec), self.kv_caches, store, self.num_blocks)
                packed, _ = self._dummy_packed(T, dec)
                kv = self.kv_caches
                try:
                    logits, new_kv = self._programs[pid](self.params, kv, packed, self._no_prev)
                    jax.block_until_ready((logits, new_kv))
                    self.kv_caches = new_kv
                except Exception as e:
                    if pid not in self._from_store:
                        raise
                    logits = new_kv = None  # a failed run's outputs: let their memory go
                    self._replace_stored_program((T, dec), pid, kv, store, e)
                    logits, self.kv_caches = self._programs[pid](self.params, self.kv_caches, packed, self._no_prev)
            else:
                fn, args, kw = self._warm_call(T, dec, self.kv_caches)
                logits, self.kv_caches = fn(*args, **kw)
            jax.block_until_ready(logits)
            self.compiled[("forward", T, dec)] = time.perf_counter() - t1
            if log.isEnabledFor(logging.DEBUG) and (mem := kv_cache.memory_summary(
                    self.parallel.local_devices() if self.parallel else jax.devices()[:1])):
                log.debug("warm-up T=%d%s ran: %s", T, " decode" if dec else "", mem)
        if self.device_inputs:
            self._warmup_step_helpers()
        dt = time.perf_counter() - t0
        slow = sorted(((v, k) for k, v in self.compiled.items()), reverse=True)[:4]
        log.info("compiled %d step shapes in %.1f s: tokens %s (+ decode-only up to %d; the sampler for every "
                 "rows bucket); slowest: %s", len(shapes), dt, self.token_buckets, self.max_num_seqs,
                 ", ".join(f"T={k[1]}{' decode' if k[2] else ''} {v:.1f} s" for v, k in slow))
        if store is not None:
            log.info("program store: %d step programs loaded, %d compiled and kept (%s)", store.hits, store.saved,
                     store.dir)
        from jaxserve.pallas_kernels import mosaic_cache
        if (st := mosaic_cache.stats())["hits"] or st["misses"]:
            log.info("Mosaic GPU kernel lowerings: %d from the lowering cache, %d lowered", st["hits"], st["misses"])
        return dt

    def _replace_stored_program(self, shape: tuple, pid: tuple, kv, store, error: Exception) -> None:
        """A program loaded from the store failed in its warm-up run on `kv` (refused its inputs, or failed on the
        device): drop the file, so that no later start loads it either; give the KV cache new pages where the
        failed run took them (donated; nothing is cached in them yet); compile the program here. Not stored
        again by this process: what made the stored one fail may hold for this one too."""
        log.warning("stored step program T=%d%s failed in its warm-up run (%s: %s); dropping it and compiling",
                    shape[0], " decode" if shape[1] else "", type(error).__name__, error)
        store.discard(self._from_store.pop(pid))
        del self._programs[pid]
        self.kv_caches = kv
        if any(x.is_deleted() for x in jax.tree.leaves(kv)):
            self.kv_caches = kv = None  # free the failed run's pages before allocating new ones
            self.kv_caches = kv_cache.allocate(self.arch, self.num_blocks, self.block_size, self.kv_dtype,
                                               self.kv_sharding, self.num_kv_heads)
        self._compile_program(shape, self.kv_caches, None, self.num_blocks)

    def _warmup_step_helpers(self) -> None:
        """Compile the small per-step programs too: `_unpack` per token bucket where steps do not unpack in the
        forward, and the sampler per rows bucket, greedy and plain random sampling. Left lazy, each first use
        stalls a serving engine for a compile (seen on the H100: seconds of zero GPU utilization under a burst
        of requests)."""
        from jaxserve.sampling_params import SamplingParams
        P = self.pages_per_seq
        if not self.fuse_unpack:
            for T in self.token_buckets:
                B = min(T, self.max_num_seqs)
                packed = jax.device_put(np.zeros(_packed_offsets(T, B, P, B)[1], np.int32), self._input_sharding)
                jax.block_until_ready(self._unpack(packed, self._no_prev, T=T, B=B, P=P, S=B))
        for S in sorted({min(T, self.max_num_seqs) for T in self.token_buckets}):
            # committed, as the forward's logits are: an uncommitted stand-in would compile a twin program
            logits = jax.device_put(np.zeros((S, self.arch.vocab_size), np.float32), self.logits_device)
            for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
                jax.block_until_ready(self.launch_sample(logits, pack_metadata(
                    sampler.SamplingMetadata.build([(params, [1], [], 0)], pad_to=S))))
        if self._sampled_forward is not None:
            self._warmup_sampled_forward()

    def _warmup_sampled_forward(self) -> None:
        """Compile the fused forward + sampling of every shape that takes it, for greedy and plain random sampling
        (the variants the server's defaults give), each fed by the previous step's ids as real steps are."""
        from jaxserve.sampling_params import SamplingParams
        t0 = time.perf_counter()
        calls = []
        for T, dec in self._warm_shapes():
            if not self._fused_shape(T, dec):
                continue
            meta, ids, li = self._dummy_inputs(T, dec)
            packed, dims = _pack_step(ids, meta, li)
            fwd_in = ("packed", [(packed, dims)], None, dec, None, False)
            for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
                md = sampler.SamplingMetadata.build([(params, [1], [], 0)], pad_to=dims["S"])
                calls.append((fwd_in, pack_metadata(md) + (True,)))
        if self.compile_threads > 1 and len(calls) > 1 and jax.config.jax_enable_compilation_cache:
            # compiled from threads into the persistent cache (XLA compiles with the GIL released); the runs below
            # then trace and load them
            def compile_one(call):
                args, kw = self._sampled_args(*call, self._no_prev)
                self._sampled_forward.lower(*args, **kw).compile()
            with ThreadPoolExecutor(min(self.compile_threads, len(calls)), thread_name_prefix="jaxserve-compile") as p:
                list(p.map(compile_one, calls))
        for fwd_in, smp_in in calls:
            out = self.launch_sampled(fwd_in, smp_in)
            out = self.launch_sampled(fwd_in, smp_in, out.token_ids)  # as a placeholder-filling step
            jax.block_until_ready(out)
        self.fused_steps = 0
        log.info("compiled the forward with its sampling for %d (shape, sampler) pairs in %.1f s", len(calls),
                 time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------- step
    def prepare(self, sched_out) -> InputBatch:
        return build_batch(sched_out, block_size=self.block_size, pages_per_seq=self.pages_per_seq,
                           token_buckets=self.token_buckets, max_seqs=self.max_num_seqs)

    def run_block_ops(self, sched_out) -> None:
        if sched_out.blocks_to_swap_out:
            self.swap.swap_out(self.kv_caches, sched_out.blocks_to_swap_out)
        if sched_out.blocks_to_swap_in:
            self.kv_caches = self.swap.swap_in(self.kv_caches, sched_out.blocks_to_swap_in)
        if sched_out.blocks_to_copy:
            src = jnp.asarray(kv_cache.pad_ids([s for s, _ in sched_out.blocks_to_copy]))
            dst = jnp.asarray(kv_cache.pad_ids([d for _, d in sched_out.blocks_to_copy]))
            self.copy_blocks(src, dst)

    def copy_blocks(self, src, dst) -> None:
        self.kv_caches = self._copy_blocks(self.kv_caches, src, dst)

    def run_forward(self, token_ids, meta: AttentionMetadata, logits_indices):
        """The device step: logits f32[S, V] (KV updated in place). Multi-host followers replay exactly this."""
        logits, self.kv_caches = self._forward(self.params, self.kv_caches, token_ids, meta, logits_indices)
        return logits

    def run_packed_forward(self, packed, prev_sampled, dims: dict, decode_only: bool):
        """The device step as one program from the packed inputs: logits f32[S, V] on logits_device (KV updated in
        place). A sharded step's logits are replicated: one local copy serves sampling."""
        program = self._programs.get((dims["T"], dims["B"], dims["P"], dims["S"], decode_only))
        if program is not None:  # compiled at warm-up: called as it is, jit's dispatch not needed
            logits, self.kv_caches = program(self.params, self.kv_caches, packed, prev_sampled)
        else:
            logits, self.kv_caches = self._packed_forward(self.params, self.kv_caches, packed, prev_sampled, **dims,
                                                          decode_only=decode_only)
        return logits if self.parallel is None else logits.addressable_data(0)

    def forward_inputs(self, batch: InputBatch) -> tuple:
        """The host half of a forward pass: numpy only, so it can run while another thread launches device
        work. `launch_forward(inputs, prev_sampled)` is the device half."""
        if not self.model.backend.has_decode_kernel:
            batch.decode_only = False  # one compiled program per bucket serves both
        li = batch.logits_indices
        if batch.prompt_logprob_spans:  # the sampled rows, then the prompt rows whose next-token logprobs are wanted
            li = np.concatenate([li, self._span_rows(batch)])
        n_sampled = len(batch.logits_indices) if batch.prompt_logprob_spans else None
        if not self.device_inputs:  # multi-host: host arrays, broadcast to the followers; lock-step only
            meta = AttentionMetadata(slot_mapping=batch.slot_mapping, positions=batch.positions,
                                     token_seq_ids=batch.token_seq_ids, block_tables=batch.block_tables,
                                     seq_lens=batch.seq_lens, query_start_loc=batch.query_start_loc,
                                     decode_only=batch.decode_only)
            return ("host", batch.token_ids, meta, li, n_sampled, batch.fill_dst is not None)
        plan = self.parallel
        if plan is not None and plan.pp > 1 and 0 < plan.microbatch_min_tokens <= batch.num_tokens:
            halves = split_in_two(batch, self.max_num_seqs)
            if halves is not None:  # two micro-batches, so that consecutive pipeline stages work at once
                h0, h1, rows = halves
                return ("packed", [self._pack(h0, h0.logits_indices), self._pack(h1, h1.logits_indices)], rows,
                        batch.decode_only, n_sampled, batch.fill_dst is not None)
        # one micro-batch: the whole step; rows None (its logits are the step's)
        return ("packed", [self._pack(batch, li)], None, batch.decode_only, n_sampled, batch.fill_dst is not None)

    @staticmethod
    def _pack(batch: InputBatch, li) -> tuple:
        return _pack_step(batch.token_ids, batch, li, batch.fill_dst, batch.fill_src)

    def launch_forward(self, inputs: tuple, prev_sampled=None):
        """Dispatch the forward pass -> (logits f32[S, V] of the sampled rows, all computed logits or None).

        prev_sampled: the previous step's sampled ids (device) that placeholders in the batch stand for."""
        kind, *rest = inputs
        if rest[-1] and prev_sampled is None:
            raise RuntimeError("a placeholder token with no step in flight to fill it")
        if kind == "host":
            token_ids, meta, li, n_sampled, _ = rest
            logits = self.run_forward(token_ids, meta, li)
        else:
            packs, rows, decode_only, n_sampled, _ = rest
            prev = self._prev_ids(prev_sampled)
            packs = [(jax.device_put(packed, self._input_sharding), dims) for packed, dims in packs]
            if self.fuse_unpack:  # one stage, so one micro-batch, and one program
                (packed, dims), = packs
                logits = self.run_packed_forward(packed, prev, dims, decode_only)
            else:
                micro = [_step_inputs(self._unpack(packed, prev, **dims), decode_only) for packed, dims in packs]
                if rows is None:
                    logits = self.run_forward(*micro[0])
                else:
                    outs, self.kv_caches = self.parallel.forward_microbatched(self.params, self.kv_caches, micro)
                    self.microbatched_steps += 1
                    logits = _pick_rows(outs[0], outs[1], jax.device_put(rows, self.logits_device))
        if n_sampled is not None:
            return logits[:n_sampled], logits
        return logits, None

    def _fused_shape(self, T: int, decode_only: bool) -> bool:
        """Step shapes that sample inside their program when sampled_forward is on: decode steps of up to
        FUSED_SAMPLING_MAX_TOKENS tokens (max_num_seqs if smaller; at least the smallest bucket), or any step of
        that size where one program serves decode and prefill (the XLA backend). There the host's per-step cost
        shows."""
        return fused_shape(T, decode_only, self.token_buckets, self.max_num_seqs, self.model.backend.has_decode_kernel)

    def fuses_sampling(self, fwd_in: tuple, smp_in) -> bool:
        """Whether this step's forward and sampling run as one program (launch_sampled)."""
        if self._sampled_forward is None or not self.fuse_unpack or smp_in is None or fwd_in[0] != "packed":
            return False
        packs, rows, decode_only, n_sampled, _ = fwd_in[1:]
        return rows is None and n_sampled is None and smp_in[3] and self._fused_shape(packs[0][1]["T"], decode_only)

    def _prev_ids(self, prev_sampled):
        """The previous step's sampled ids where this step's program takes them (sharded steps: the mesh, from the
        last stage's first device), or the no-placeholder stand-in."""
        if prev_sampled is None:
            return self._no_prev
        if self.parallel is None:
            return prev_sampled
        return jax.device_put(prev_sampled, self._input_sharding or jax.devices()[0])

    def _sampled_args(self, fwd_in: tuple, smp_in: tuple, prev) -> tuple:
        """(args, kwargs) of sampled_forward's program for a step: its packed inputs and sampling metadata in one
        buffer, one transfer to the mesh."""
        (packed, dims), = fwd_in[1]
        smp, treedef, layout, _ = smp_in
        buf = jax.device_put(np.concatenate([packed, smp]), self._input_sharding)
        return (self.params, self.kv_caches, buf, prev), dict(dims, decode_only=fwd_in[3], treedef=treedef,
                                                              layout=layout, ids_len=self.ids_len)

    def launch_sampled(self, fwd_in: tuple, smp_in: tuple, prev_sampled=None):
        """Dispatch a step's forward and its sampling as one program (fuses_sampling) -> SamplerOutput of device
        arrays, replicated over the mesh, where the next step reads its placeholders from."""
        if fwd_in[-1] and prev_sampled is None:
            raise RuntimeError("a placeholder token with no step in flight to fill it")
        args, kw = self._sampled_args(fwd_in, smp_in, self._prev_ids(prev_sampled))
        out, self.kv_caches = self._sampled_forward(*args, **kw)
        self.fused_steps += 1
        return out

    def sample_inputs(self, batch: InputBatch, seeds: list[int]):
        """The host half of sampling (`launch_sample` or `launch_sampled` is the device half): the sampling
        metadata packed into one i32 buffer -> (buffer, treedef, layout, whether a fused step may take it); the
        metadata itself for multi-host leaders."""
        # An n > 1 parent's rows all draw a first token (no outputs yet), each with its own seed.
        rows = [(r.request.sampling_params, r.request.prompt_token_ids, r.request.output_token_ids, seed)
                for r, seed in zip(batch.rows, seeds)]
        md = sampler.SamplingMetadata.build(rows, pad_to=len(batch.logits_indices))
        return pack_metadata(md) + (_fusable(md),) if self.device_inputs else md

    def launch_sample(self, logits, inputs):
        if not self.device_inputs:
            return self._sample(logits, inputs)
        packed, treedef, layout = inputs[:3]
        return _sample_packed(logits, jax.device_put(packed, self.logits_device), treedef=treedef, layout=layout,
                              ids_len=self.ids_len)

    @staticmethod
    def _span_rows(batch: InputBatch) -> np.ndarray:
        """Token rows of this step whose logits predict a prompt token, padded to a power of two (row 0).

        Only these rows' logits are computed (not all T x V), and one compiled shape serves many lengths."""
        rows, batch.span_layout = [], []
        for req, t0, n in batch.prompt_logprob_spans:
            start = req.num_computed_tokens
            # logits at token p predict token p+1; the last prompt position predicts the first output.
            n_pred = min(n, req.num_prompt_tokens - 1 - start)
            if n_pred > 0:
                batch.span_layout.append((req, len(rows), n_pred, start))
                rows.extend(range(t0, t0 + n_pred))
        size = 1 << max(0, len(rows) - 1).bit_length()
        return np.asarray(rows + [0] * (size - len(rows)), np.int32)

    def prompt_logprobs(self, all_logits, batch: InputBatch):
        """-> {request_id: (first prompt position, tok_lp, rank, top_ids, top_lp)} as numpy, for this step's span."""
        first = len(batch.logits_indices)
        span_logits = all_logits[first:]  # (R, V): the rows _span_rows laid out
        nxt = np.zeros(span_logits.shape[0], np.int32)
        for req, off, n_pred, start in batch.span_layout:
            nxt[off:off + n_pred] = req.prompt_token_ids[start + 1:start + 1 + n_pred]
        res = [np.asarray(x) for x in prompt_logprobs_fn(span_logits, jnp.asarray(nxt), MAX_LOGPROBS)]
        return {req.request_id: (start + 1,) + tuple(x[off:off + n_pred] for x in res)
                for req, off, n_pred, start in batch.span_layout}


# ------------------------------------------------------------------------------------- activation side-cache
# profile_run needs only XLA's memory analysis of one program, which no other step uses. Even found in the
# persistent compilation cache, loading that program took 4-5.6 s of each warm start on an H100 (docs/PERF.md,
# session 7). So its figure is kept beside the compilation cache, under two keys, each with everything else the
# compiled program depends on (jax, jaxlib, the device, XLA_FLAGS): what the program is made of
# (ModelRunner._activation_inputs_key), which a warm start reads without tracing anything, and the lowered
# program's text, the fallback when the first key changed but the program did not.
_ACTIVATION_FILE = "jaxserve_activation_bytes.json"
_ACTIVATION_VERSION = "1: temp + output - alias bytes"  # change it when the figure's formula changes


# JAXSERVE_* variables that no stored program reads (the server's, the cache folders', whether the forward + sampling
# program is used: it is never stored). Any other one is part of the keys: a knob not listed here costs a miss, never
# a stale program.
_NOT_TRACED = frozenset({"JAXSERVE_API_KEY", "JAXSERVE_HOST", "JAXSERVE_GIL_SWITCH_MS", "JAXSERVE_CACHE",
                         "JAXSERVE_PROGRAM_STORE", "JAXSERVE_FUSED_SAMPLING"})


def _source_files() -> list[Path]:
    """This package's Python files, models and kernels included: pyproject maps those subpackages to folders of
    their own (models/, pallas_kernels/), outside jaxserve/ in an editable install."""
    import jaxserve
    import jaxserve.models
    import jaxserve.pallas_kernels
    dirs = {Path(d).resolve() for pkg in (jaxserve, jaxserve.models, jaxserve.pallas_kernels) for d in pkg.__path__}
    return sorted({f for d in dirs for f in d.rglob("*.py")})


@functools.cache
def _source_digest() -> str:
    """sha256 of _source_files, names and contents."""
    h = hashlib.sha256()
    for f in _source_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@functools.cache
def _versions() -> str:
    """Installed versions of what else shapes a traced step (flax modules; the kernels jax-triton makes)."""
    from importlib import metadata
    out = []
    for dist in ("flax", "jax-triton", "triton"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=-")
    return " ".join(out)


def _activation_key(program: str) -> str | None:
    """The side-cache key of a program (its text, or what it is made of) on this jax, jaxlib, device and
    XLA_FLAGS; None when there is no compilation cache to keep it beside."""
    import jaxlib
    cache_dir = jax.config.jax_compilation_cache_dir
    if not cache_dir:
        return None
    dev = jax.devices()[0]
    parts = [_ACTIVATION_VERSION, program, jax.__version__, jaxlib.__version__, dev.platform, dev.device_kind,
             getattr(getattr(dev, "client", None), "platform_version", ""), os.environ.get("XLA_FLAGS", "")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _activation_file() -> Path:
    return Path(jax.config.jax_compilation_cache_dir) / _ACTIVATION_FILE


def _activation_cache_get(key: str | None) -> int | None:
    if key is None:
        return None
    try:
        table = json.loads(_activation_file().read_text())
    except (OSError, ValueError):
        return None
    value = table.get(key) if isinstance(table, dict) else None
    return int(value) if isinstance(value, int) and value >= 0 else None


def _activation_cache_put(entries: dict) -> None:
    entries = {k: v for k, v in entries.items() if k is not None}
    if not entries:
        return
    path = _activation_file()
    try:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if not isinstance(table, dict):
            table = {}
        table.update(entries)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)  # atomic: two servers starting at once never see half a file
    except OSError as e:  # a read-only cache must not stop serving
        log.warning("activation figure not cached: %s", e)
