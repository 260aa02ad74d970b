"""JAX platform set-up: memory preallocation, the compile cache, and the one startup line.

JAX preallocates 75% of GPU memory when its backend starts unless told otherwise, and can only be
told before that moment. `init_platform` runs before any device is touched and gives JAX's
allocator `gpu_memory_utilization` of the card (weights, activations and the KV cache all live
inside it; the KV cache gets what a profiling run leaves). Tensor/pipeline-parallel runs let that
allocator grow on demand instead (XLA's all-reduce kernels allocate beside it: see
kv_cache.collective_scratch_bytes). If a GPU was asked for (`device="gpu"` or JAX_PLATFORMS naming
cuda/gpu) and JAX fell back to CPU (a broken CUDA plugin does that silently), startup fails with a
message that says so.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("jaxserve")
_initialized = False


class PlatformError(RuntimeError):
    pass


# Collectives inside XLA's command buffers (CUDA graphs), beside its default kinds. A tensor-parallel step has
# 2 all-reduces per layer on every device; launched one by one, enqueueing a batch-256 step of Llama-3-8B took
# 6.1 ms at TP=2 on 4 x H100, more than its 8.5 ms device time left idle. In command buffers: 4.6 ms, and the
# step went from 10.81 to 8.99 ms (docs/PERF.md, session 6). Steps without collectives are unaffected.
COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer=+COLLECTIVES"
# Synchronous all-reduces. XLA runs a decode step's all-reduces as its own collective kernels, async on a stream of
# their own, and those stay outside the command buffers: 65 command buffers per device per TP=2 step of Llama-3-8B
# (the optimized thunk sequence, docs/PERF.md session 8). Made synchronous, on one 2 x H100 machine, the batch-256
# step went from 9.14 to 8.87 ms and its enqueue from 3.42 to 2.57 ms; NCCL's all-reduce instead was slower
# (9.94 ms). A layer's all-reduce feeds the next op at once, so async execution had nothing to overlap with.
SYNC_ALL_REDUCE_FLAG = "--xla_gpu_disable_async_collectives=ALLREDUCE"
DEFAULT_XLA_FLAGS = (COMMAND_BUFFER_FLAG, SYNC_ALL_REDUCE_FLAG)


def set_gil_switch_interval() -> None:
    """JAXSERVE_GIL_SWITCH_MS sets the interpreter's GIL switch interval (an experiment knob). A thread that wants the
    GIL back waits up to `sys.getswitchinterval()` (5 ms by default) while another one runs Python, and the engine
    thread asks for it several times a step. Measured on an H100: 0.5 ms made the server worse (session 4), and 1 ms
    against 5 ms did not move the offline batch-256 step (session 9; docs/PERF.md). The server reads it before the
    engine is built, so a bad value costs no start-up; it is then ignored with a warning."""
    ms = os.environ.get("JAXSERVE_GIL_SWITCH_MS")
    if not ms:
        return
    try:
        sys.setswitchinterval(float(ms) / 1e3)
    except ValueError as e:  # not a number, or not > 0
        log.warning("JAXSERVE_GIL_SWITCH_MS=%r ignored: %s", ms, e)
        return
    log.info("GIL switch interval %.2f ms", sys.getswitchinterval() * 1e3)


def xla_flags(current: str) -> str:
    """XLA_FLAGS with jaxserve's defaults added, each unless the user set that flag already."""
    flags = [current] if current else []
    for flag in DEFAULT_XLA_FLAGS:
        if flag.split("=")[0].lstrip("-") not in current:
            flags.append(flag)
    return " ".join(flags)


def init_platform(device: str = "auto", gpu_memory_utilization: float = 0.9,
                  compile_cache_dir: str | None = None, quiet: bool = False, multi_device: bool = False) -> str:
    """Configure JAX once per process; returns the platform name ("cpu" or "gpu").

    multi_device (tensor or pipeline parallel): JAX's allocator grows on demand instead of taking its whole share
    at start-up. Measured on 2 x H200 (docs/PERF.md, session 15): its regions double as it grows, so once the KV
    cache is allocated it holds its whole share anyway; what XLA's collectives allocate on their own
    (kv_cache.collective_scratch_bytes) must fit in the device memory beyond that share (1 - the fraction)."""
    global _initialized
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if not _initialized:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{gpu_memory_utilization:.3f}")
        if multi_device:
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if device == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
    import jax
    if not _initialized:
        cache = Path(compile_cache_dir or Path.home() / ".cache" / "jaxserve" / "xla")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(cache))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        except OSError as e:  # a read-only home must not stop serving
            log.warning("persistent compilation cache disabled: %s", e)
    devices = jax.devices()
    platform = devices[0].platform
    if not _initialized and platform != "cpu":
        # Every program, not only those over 0.5 s: a GPU start compiles ~25 small ones (input unpacking per
        # token bucket, the sampler per rows bucket), each under 0.5 s but seconds together on every restart.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if not _initialized and platform in ("gpu", "cuda"):
        # Mosaic GPU kernels are lowered in Python (~0.7 s each) before the compilation cache is consulted; keep
        # their lowered modules beside it (pallas_kernels/mosaic_cache.py).
        from jaxserve.pallas_kernels import mosaic_cache
        try:
            mosaic_cache.install(Path(jax.config.jax_compilation_cache_dir or cache) / "mosaic_lowering")
        except OSError as e:
            log.warning("Mosaic lowering cache disabled: %s", e)
    wanted_gpu = device == "gpu" or any(p in os.environ.get("JAX_PLATFORMS", "") for p in ("cuda", "gpu", "rocm"))
    if wanted_gpu and platform == "cpu":
        raise PlatformError("a GPU was asked for (--device gpu or JAX_PLATFORMS) but JAX is running on CPU: the "
                            "CUDA plugin is missing or failed to load (pip install 'jaxserve[cuda13]' or [cuda12]; "
                            "check nvidia-smi and the jax-cuda plugin version against jaxlib)")
    if not _initialized and not quiet:
        kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
        print(f"jaxserve: jax {jax.__version__} platform={platform} devices={len(devices)} ({', '.join(kinds)})",
              flush=True)
    _initialized = True
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform
