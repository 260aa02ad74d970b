"""EngineArgs -> a running LLMEngine: platform, model folder, weights, KV cache sizing, warm-up.

Order matters: JAX's platform is configured first (memory fraction, compile cache), then weights
load, a profiling step measures peak activation memory, the KV cache takes what is left, and
every step shape is compiled before the first request. With tensor/pipeline parallelism a
`parallel.ParallelPlan` fixes the mesh and the runtime weight layout before anything loads; with
several processes (`--num-processes`), `jax.distributed` starts first and processes other than 0
follow process 0's steps (jaxserve/multihost.py) instead of returning an engine.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve.config import CacheConfig, EngineArgs, EngineConfig, ModelConfig, ParallelConfig
from jaxserve.pallas_kernels.select import MOSAIC_PREFILL_CHOICES
from jaxserve.platform import init_platform

log = logging.getLogger("jaxserve")


class StartupError(RuntimeError):
    pass


def resolve_model_path(model: str | None) -> Path:
    """A local HF folder: the given path, a snapshot in the local HF cache, or the embedded default."""
    if model is None:
        from jaxserve.models.default_model import default_model_path
        return default_model_path()
    p = Path(model).expanduser()
    if (p / "config.json").exists():
        return p.resolve()
    if p.suffix == ".json" and p.is_file():  # a bare config (benchmarks/configs/*.json) for --load-format dummy
        import hashlib
        import shutil
        folder = Path.home() / ".cache" / "jaxserve" / "configs" / hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / "config.json")
        return folder
    hub = Path.home() / ".cache" / "huggingface" / "hub" / f"models--{model.replace('/', '--')}" / "snapshots"
    snaps = sorted(hub.glob("*/config.json"), key=lambda f: f.stat().st_mtime) if hub.exists() else []
    if snaps:
        return snaps[-1].parent
    raise StartupError(f"model {model!r} is neither a local folder with a config.json nor in the local HF cache "
                       f"({hub.parent}); jaxserve never reaches a model hub: download the model elsewhere and "
                       f"pass --model /path/to/folder (or omit --model for the embedded SmolLM2-135M-Instruct)")


def _generation_defaults(path: Path) -> dict:
    try:
        gc = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
    out = {v: gc[k] for k, v in keys.items() if gc.get(k) is not None}
    if gc.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _usable_device_bytes() -> int:
    """Bytes jax may use on this process's first device (jax.devices()[0] may be another host's, whose
    statistics this process cannot read)."""
    try:
        return jax.local_devices()[0].memory_stats().get("bytes_limit", 0)
    except Exception:  # noqa: BLE001 - a platform without memory statistics
        return 0


def _default_max_num_seqs(on_cpu: bool) -> int:
    """Requests running at once when --max-num-seqs is not given: 512 where jax may use >= 40 GiB of the GPU,
    256 elsewhere (vLLM's long-standing default). On an H100 a burst of 320 ShareGPT-like requests then runs
    at once instead of a fifth of it queueing behind the longest outputs, and the KV cache holds them with
    room to spare; a decode step at 512 rows is still compiled at start-up like every other bucket."""
    return 256 if on_cpu or _usable_device_bytes() < 40 * 2**30 else 512


def _default_token_budget(on_cpu: bool, server: bool) -> int:
    """Tokens per step when --max-num-batched-tokens is not given: 512 on CPU; 2048 on GPUs where jax may use
    < 40 GiB. On larger ones (80 GB cards: H100, H200, A100-80G) 8192 offline: a batch of prompts prefills in
    fewer, larger steps at a higher matmul rate. The server takes 4096: under a burst of 320 prompts on an H100
    with the engine in its own process it gave higher throughput, lower TTFT and TPOT, and half the p99
    inter-token gap of 8192 (one run each, docs/PERF.md, session 7), as its prefill chunks stall decodes less."""
    if on_cpu:
        return 512
    if _usable_device_bytes() < 40 * 2**30:
        return 2048
    return 4096 if server else 8192


def make_config(args: EngineArgs, path: Path, arch) -> EngineConfig:
    from jaxserve.scheduler import SchedulerConfig
    dtype = arch.checkpoint_dtype if args.dtype == "auto" else {"half": "float16", "bf16": "bfloat16"}.get(
        args.dtype, args.dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise StartupError(f"--dtype {args.dtype!r} is not supported (auto, bfloat16, float16, float32)")
    max_len = args.max_model_len or arch.max_position_embeddings
    if arch.sliding_window and max_len > arch.sliding_window:
        if args.max_model_len:
            raise StartupError(f"{arch.architecture} uses sliding-window attention (window {arch.sliding_window}), "
                               f"which jaxserve does not implement; --max-model-len {max_len} exceeds the window. "
                               f"Pass --max-model-len {arch.sliding_window} or less (there it equals full attention)")
        max_len = arch.sliding_window
        log.warning("sliding window %d: max_model_len limited to it (full attention is exact there)", max_len)
    if max_len > arch.max_position_embeddings and not arch.rope_scaling:
        raise StartupError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                           f"({arch.max_position_embeddings})")
    if args.mosaic_prefill_warpgroups is not None and args.mosaic_prefill_warpgroups not in MOSAIC_PREFILL_CHOICES:
        raise StartupError(f"--mosaic-prefill-warpgroups must be 0 (Triton prefill), 1, 2 or 3 (FA3 layout) "
                           f"(got {args.mosaic_prefill_warpgroups})")
    if args.block_size not in (8, 16, 32, 64, 128):
        raise StartupError(f"--block-size must be one of 8, 16, 32, 64, 128 (got {args.block_size})")
    on_cpu = jax.devices()[0].platform == "cpu"
    budget = args.max_num_batched_tokens or _default_token_budget(on_cpu, args.usage == "server")
    tok = None if args.skip_tokenizer_init else str(Path(args.tokenizer).expanduser() if args.tokenizer else path)
    model = ModelConfig(model=str(path), served_model_name=args.served_model_name or args.model or path.name,
                        tokenizer=tok, dtype=dtype, max_model_len=max_len, load_format=args.load_format,
                        seed=args.seed, skip_tokenizer_init=args.skip_tokenizer_init,
                        chat_template=_read_template(args.chat_template), max_logprobs=args.max_logprobs)
    cache = CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                        swap_space=args.swap_space, enable_prefix_caching=args.enable_prefix_caching,
                        num_gpu_blocks_override=args.num_gpu_blocks_override, kv_cache_memory=args.kv_cache_memory)
    seqs = _default_max_num_seqs(on_cpu) if args.max_num_seqs is None else args.max_num_seqs
    if args.num_processes > 1:  # defaults follow each host's memory; every process must compile the same buckets
        from jaxserve.multihost import agree_min
        seqs, budget = agree_min(seqs), agree_min(budget)
    sched = SchedulerConfig(max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=max(budget, seqs))
    return EngineConfig(model=model, cache=cache, scheduler=sched,
                        parallel=ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size,
                                                 args.num_processes, args.process_id, args.coordinator_address),
                        device=args.device, enforce_eager=args.enforce_eager,
                        compile_cache_dir=args.compile_cache_dir, async_scheduling=args.async_scheduling,
                        dispatch_thread=(args.dispatch_thread if args.dispatch_thread is not None
                                         else not on_cpu))


def _read_template(t: str | None) -> str | None:
    if t and Path(t).expanduser().is_file():
        return Path(t).expanduser().read_text()
    return t


def _parallel_plan(args: EngineArgs, arch):
    """The ParallelPlan for tp x pp (None for one device, one process); a StartupError says what fits."""
    from jaxserve.parallel import ParallelPlan
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if tp == pp == 1 and args.num_processes == 1:
        return None
    if args.num_processes > 1:
        if pp != 1:
            raise StartupError("--pipeline-parallel-size > 1 across processes is not supported (stages hand "
                               "activations over with device_put, which stays within one process); use tensor "
                               "parallelism across hosts")
        if tp * pp != jax.device_count():
            raise StartupError(f"with {args.num_processes} processes the mesh must cover every device: "
                               f"--tensor-parallel-size must be {jax.device_count()} (got {tp})")
    if args.swap_space and (pp > 1 or args.num_processes > 1):
        raise StartupError("--swap-space is not supported with pipeline parallelism or several processes")
    if args.pp_microbatch_tokens < 0:
        raise StartupError(f"--pp-microbatch-tokens must be >= 0 (got {args.pp_microbatch_tokens})")
    try:
        plan = ParallelPlan(arch, tp, pp, jax.devices())
    except ValueError as e:
        raise StartupError(str(e)) from None
    plan.microbatch_min_tokens = args.pp_microbatch_tokens
    return plan


# A full collection once in this many young-generation (gen 1) collections, instead of Python's 10. Decided by
# measurement: with the start-up heap frozen, full collections still came once per ~50 batch-256 decode steps on
# the H100 and took 27-53 ms each (one step in fifty stalled, ~1 ms a step on average; docs/PERF.md, session 10).
# They scan every token id list of every running request (a list visits each of its items). At 1000 one comes
# every few thousand steps; cyclic garbage is still freed by the young collections, or by that full one.
GC_FULL_EVERY = 1000


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after start-up (modules, weights' wrappers, compiled programs'
    handles: ~240k objects for SmolLM2 on CPU) out of the cyclic GC's reach (gc.freeze, as vLLM does), and make
    full collections rare (GC_FULL_EVERY).

    Python's full collection scans every tracked object, and one came every ~100 steps of a busy engine: on the
    H100 it stalled one batch-256 decode step for 190-250 ms, which raised that run's mean step from 12 to 17 ms
    (docs/PERF.md, session 9). 166-175 ms per full collection on this project's CI CPU before the freeze, 0.01 ms
    after. Objects created later are collected as usual."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, GC_FULL_EVERY))
    log.info("gc: %d start-up objects frozen (one full collection before that took %.0f ms); a full collection "
             "every %d young ones", gc.get_freeze_count(), (time.perf_counter() - t0) * 1e3, max(full, GC_FULL_EVERY))


def collective_scratch_estimate(plan, runner, platform: str) -> int:
    """Device bytes XLA's all-reduce kernels will keep outside JAX's allocator (kv_cache.collective_scratch_bytes):
    tensor parallel on GPUs only; two all-reduces per layer of a stage, plus the embedding's and the LM head's."""
    from jaxserve.kv_cache import collective_scratch_bytes
    if plan is None or plan.tp == 1 or platform != "gpu":
        return 0
    layers = max(end - start for start, end in plan.stages)
    return collective_scratch_bytes(runner.num_step_programs(), 2 * layers + 2)


def cuda_total_memory() -> int | None:
    """Bytes of GPU 0's memory from the CUDA driver, before JAX starts (no context is made); None without one."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, total = ctypes.c_int(), ctypes.c_size_t()
    try:
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0) or cuda.cuDeviceTotalMem_v2(ctypes.byref(total),
                                                                                              dev):
            return None
    except AttributeError:
        return None
    return total.value or None


def collective_pool_fraction(args: EngineArgs, arch, total: int | None) -> tuple[float, int]:
    """JAX's share of each GPU under tensor parallelism, and the all-reduce scratch estimated for it: the share is
    --gpu-memory-utilization less what of the estimate (kv_cache.collective_scratch_bytes) does not fit in the rest
    of the device (less kv_cache.OUTSIDE_POOL_BASE). Measured on 2 x H200 (docs/PERF.md, session 15): JAX's allocator
    holds its whole share once the KV cache is allocated, growing or not, so the scratch's room must be outside it.
    Counted before JAX starts, from the flags, with the GPU defaults where they are not given (512 running requests,
    8192 tokens per step: an upper bound). Unchanged on one device, without a CUDA driver, with --kv-cache-memory, or
    where XLA_PYTHON_CLIENT_MEM_FRACTION is set (the user's share wins)."""
    from jaxserve.batch import make_buckets
    from jaxserve.kv_cache import OUTSIDE_POOL_BASE, collective_scratch_bytes
    from jaxserve.model_runner import step_program_count
    util = args.gpu_memory_utilization
    if (args.tensor_parallel_size == 1 or not total or args.kv_cache_memory or args.device == "cpu"
            or "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ):
        return util, 0
    layers = -(-arch.num_layers // args.pipeline_parallel_size)
    seqs = args.max_num_seqs or 512
    buckets = make_buckets(max(args.max_num_batched_tokens or 8192, seqs))
    fused = args.pipeline_parallel_size == 1 and args.num_processes == 1
    est = collective_scratch_bytes(step_program_count(buckets, seqs, True, fused), 2 * layers + 2)
    excess = max(0, est - (total * (1 - util) - OUTSIDE_POOL_BASE))
    return max(0.05, util - excess / total), est


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def _allocate_pages(runner, num_blocks: int, host_blocks: int, need: int, adjustable: bool, tries: int = 3) -> int:
    """Allocate the KV pages and wait for them; where the allocator cannot place them all (multi-device engines
    grow their pool in regions, and each page array must fit one; docs/PARALLEL.md), free them and try again with
    5% fewer pages, at most `tries` times. Returns the page count allocated. Not `adjustable` (the user fixed the
    count or the bytes, or several processes must agree on it): a failure is a StartupError at once."""
    from jaxserve.kv_cache import round_blocks
    for attempt in range(tries):
        try:
            runner.allocate_kv(num_blocks, host_blocks)
            jax.block_until_ready(runner.kv_caches)  # an allocation that failed surfaces here, not at its first use
            return num_blocks
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; everything else passes through
            if not _is_oom(e):
                raise
            runner.kv_caches = None
            gc.collect()
            smaller = round_blocks(num_blocks - max(1, num_blocks // 20))
            if not adjustable or attempt == tries - 1 or smaller < need:
                raise StartupError(
                    f"the device could not hold the KV cache's {num_blocks} pages ({e}). Give the cache less with "
                    f"--kv-cache-memory BYTES or --num-gpu-blocks-override N.") from e
            log.warning("the KV cache's %d pages did not fit the device allocator (%s); trying %d", num_blocks,
                        str(e).splitlines()[0][:200], smaller)
            runner.discard_programs()  # compiled ahead for the old page count
            num_blocks = smaller
    raise AssertionError("unreachable")


def build_engine(cls, args: EngineArgs, on_config=None):
    """on_config(EngineConfig), if given, is called as soon as the configuration is known (before weights load
    and compiles): the server's front-end process loads its tokenizer meanwhile (jaxserve/mp_engine.py)."""
    t_start = time.perf_counter()
    if args.num_processes > 1:
        from jaxserve.multihost import init_distributed
        init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    multi_device = args.tensor_parallel_size * args.pipeline_parallel_size > 1
    pool_fraction, scratch_est = args.gpu_memory_utilization, 0
    if multi_device:
        from jaxserve.models.arch import load_arch as _load_arch
        pool_fraction, scratch_est = collective_pool_fraction(args, _load_arch(resolve_model_path(args.model)),
                                                              cuda_total_memory())
    init_platform(args.device, pool_fraction, args.compile_cache_dir, multi_device=multi_device)
    if pool_fraction < args.gpu_memory_utilization:
        log.info("XLA's all-reduce scratch (%.2f GiB estimated per device) does not fit beside JAX's share: the share "
                 "is %.1f%% of device memory instead of %.0f%%", scratch_est / 2**30, 100 * pool_fraction,
                 100 * args.gpu_memory_utilization)
    from jaxserve.attention import get_backend
    from jaxserve.block_manager import BlockManager
    from jaxserve.kv_cache import bytes_per_block, kv_memory_budget, memory_summary, pipeline_slack, round_blocks
    from jaxserve.model_runner import ModelRunner
    from jaxserve.models.arch import load_arch
    from jaxserve.models.llama import abstract_params
    from jaxserve.models.loader import load_params
    from jaxserve.models.registry import build_model
    from jaxserve.scheduler import Scheduler
    from jaxserve.tokenizer import tokenizer_for

    path = resolve_model_path(args.model)
    arch = load_arch(path)
    config = make_config(args, path, arch)
    plan = _parallel_plan(args, arch)
    mc, cc = config.model, config.cache
    if on_config is not None:
        on_config(config)
    tokenizer = tokenizer_for(mc)
    backend = get_backend(args.attention_backend, args.mosaic_prefill_warpgroups)
    # Under tensor parallelism the model is built with the runtime sizes (kv heads expanded, padding).
    model = build_model(plan.arch if plan else arch, mc.dtype, backend)
    shapes, specs = abstract_params(model)
    t0 = time.perf_counter()
    params = load_params(path, arch, mc.dtype, shapes, specs, load_format=mc.load_format, seed=mc.seed,
                         mesh=plan and plan.mesh, shardings=plan and plan.param_shardings(specs),
                         tp=plan and plan.layout)
    load_s = time.perf_counter() - t0
    kv_dtype = jnp.dtype(mc.dtype)
    sc = config.scheduler
    runner_cls = ModelRunner
    if args.num_processes > 1 and jax.process_index() == 0:
        from jaxserve.multihost import LeaderRunner as runner_cls
    runner = runner_cls(model, plan.split_params(params) if plan else params, arch, block_size=cc.block_size,
                        max_model_len=mc.max_model_len, max_num_seqs=sc.max_num_seqs,
                        max_num_batched_tokens=sc.max_num_batched_tokens, kv_dtype=kv_dtype,
                        num_kv_heads=plan and plan.layout.num_kv_heads, parallel=plan, specs=specs)
    # Per device: the stage's layers and num_kv_heads / tp heads of each (all layers, all heads on one device).
    per_block = plan.kv_bytes_per_block(cc.block_size, kv_dtype) if plan else bytes_per_block(arch, cc.block_size,
                                                                                              kv_dtype)
    devices = plan.local_devices() if plan else jax.devices()[:1]  # this process's, the pages' per-device figures
    if cc.num_gpu_blocks_override:
        num_blocks, why = cc.num_gpu_blocks_override, "--num-gpu-blocks-override"
    else:
        t_prof = time.perf_counter()
        activation = runner.profile_run()
        log.info("profile run: %s in %.1f s", "no memory analysis" if activation is None else
                 f"{activation / 2**30:.2f} GiB of activations", time.perf_counter() - t_prof)
        scratch = collective_scratch_estimate(plan, runner, devices[0].platform)
        budget, why = kv_memory_budget(devices, pool_fraction, cc.kv_cache_memory, activation, scratch)
        num_blocks = budget // per_block
        if plan and plan.pp > 1 and not cc.kv_cache_memory and devices[0].platform != "cpu":
            num_blocks -= pipeline_slack(num_blocks, max(b - a for a, b in plan.stages))
            why += ", less one layer's pages per device (pipeline stages: kv_cache.pipeline_slack)"
        if args.num_processes > 1:  # every process must allocate the same pages: the smallest count wins
            from jaxserve.multihost import agree_min
            num_blocks = agree_min(num_blocks)
    need = -(-mc.max_model_len // cc.block_size) + 1  # one full-length sequence plus the null block
    if not cc.num_gpu_blocks_override:  # rounded for a stable cache shape, never below what one sequence needs
        num_blocks = max(round_blocks(num_blocks), min(num_blocks, need))
    if num_blocks < need:
        raise StartupError(
            f"max_model_len {mc.max_model_len} needs {need - 1} KV blocks of {cc.block_size} tokens "
            f"({(need - 1) * per_block / 2**30:.2f} GiB per device) but only {max(num_blocks - 1, 0)} fit "
            f"({max(num_blocks, 0) * per_block / 2**30:.2f} GiB by {why}); lower --max-model-len, or raise "
            f"--gpu-memory-utilization / --kv-cache-memory / --num-gpu-blocks-override")
    host_block = bytes_per_block(arch, cc.block_size, kv_dtype, plan and plan.layout.num_kv_heads)  # all heads
    host_blocks = int(cc.swap_space * (1 << 30)) // host_block if cc.swap_space else 0
    threads = args.compile_threads
    if threads is None:  # measured on the H100 (docs/PERF.md, session 6): same step times, warm start 23 -> 17 s.
        # One device only: dummy Llama-3-70B at TP=4 ran out of device memory for its all-reduces in the warm-up
        # after compiling from 8 threads (8B at TP=2 and 4 did not); not run without threads yet.
        one_device = args.tensor_parallel_size * args.pipeline_parallel_size == 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = min(8, cpus) if one_device and jax.devices()[0].platform != "cpu" else 1
    if threads < 1:
        raise StartupError(f"--compile-threads must be >= 1 (got {threads})")
    # Threaded compiles autotune several programs at once: before the pages take the memory (compile_ahead).
    compile_s = 0.0 if config.enforce_eager else runner.compile_ahead(num_blocks, threads)
    if log.isEnabledFor(logging.DEBUG) and (mem := memory_summary(devices)):
        log.debug("device memory before the KV cache: %s", mem)
    adjustable = not (cc.num_gpu_blocks_override or cc.kv_cache_memory or args.num_processes > 1)
    num_blocks = _allocate_pages(runner, num_blocks, host_blocks, need, adjustable)
    log.info("KV cache: %d blocks of %d tokens (%.2f GiB per device, %s); %d host swap blocks", num_blocks,
             cc.block_size, num_blocks * per_block / 2**30, why, host_blocks)
    if mem := memory_summary(devices):
        log.info("device memory after the KV cache: %s", mem)
    try:
        compile_s += 0.0 if config.enforce_eager else runner.warmup()
    except Exception as e:  # noqa: BLE001 - one known failure gets its numbers and remedies; others pass through
        if "for all-reduce" in str(e) or "collective memory" in str(e):
            est = collective_scratch_estimate(plan, runner, "gpu")
            raise StartupError(
                f"the warm-up ran out of device memory for XLA's all-reduce scratch ({e}). Each compiled step "
                f"program keeps its all-reduces' scratch outside JAX's allocator; jaxserve estimated "
                f"{est / 2**30:.2f} GiB per device for {runner.num_step_programs()} programs. Lower "
                f"--gpu-memory-utilization, or raise JAXSERVE_COLLECTIVE_SCRATCH_MIB (now "
                f"{os.environ.get('JAXSERVE_COLLECTIVE_SCRATCH_MIB', 'the default')}) so that the KV cache leaves "
                f"more free, or set XLA_FLAGS=--xla_gpu_experimental_use_collective_kernels= to use NCCL's "
                f"all-reduce, which keeps no scratch per program.") from e
        if _is_oom(e):
            raise StartupError(
                f"the warm-up ran out of device memory after the KV cache took {num_blocks * per_block / 2**30:.2f} "
                f"GiB per device ({why}): {e}. Give the cache less with --kv-cache-memory BYTES or "
                f"--num-gpu-blocks-override N ({num_blocks} now). A lower --gpu-memory-utilization shrinks the "
                f"cache and JAX's share of the device together, so it leaves the warm-up no more room.") from e
        raise
    freeze_startup_heap()
    if args.num_processes > 1 and jax.process_index() != 0:
        from jaxserve.multihost import follow
        log.info("process %d follows process 0's steps", jax.process_index())
        follow(runner)  # returns when process 0 stops
        raise SystemExit(0)
    bm = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching, host_blocks)
    engine = cls(config=config, arch=arch, tokenizer=tokenizer, runner=runner, scheduler=Scheduler(sc, bm),
                 generation_defaults=_generation_defaults(path))
    engine.startup_times = dict(load_s=load_s, compile_s=compile_s, total_s=time.perf_counter() - t_start)
    log.info("engine ready in %.1f s (weights %.1f s, compile %.1f s)", engine.startup_times["total_s"], load_s,
             compile_s)
    return engine
