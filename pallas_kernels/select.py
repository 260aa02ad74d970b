"""Which attention implementation a device gets.

The choice is a pure function of (platform, compute capability, requested name), decided once when the engine
is built and passed down; nothing reads an environment variable or global behind the config's back.

  cpu (and anything unknown)      -> "xla"          pure-jnp reference.py, compiled by XLA
  gpu, sm 9.x (Hopper)            -> best measured: "pallas_mosaic" (Mosaic GPU decode kernel, Triton prefill) if
                                     MOSAIC_FASTEST, else "pallas_triton" (see MOSAIC_FASTEST for the figures)
  gpu, sm 8.x (Ampere/Ada)        -> "pallas_triton"
  gpu, older / unknown capability -> "xla"
"""

from __future__ import annotations

import jax

BACKENDS = ("xla", "pallas_triton", "pallas_mosaic")

# Whether the engine should run decode with the Mosaic GPU kernel (paged_decode_mgpu.py) rather than the Triton
# one on Hopper. As a kernel Mosaic wins wherever the KV read is large (H100: B=64 ctx 2048 203 us = 2.65 TB/s vs
# Triton 251 us, bundled 301 us) and at batch 1 (ctx 2048: 38 vs 47 us). Session 3 kept Triton because the
# batch-256 step looked host-bound under the profiler, which inflates launches. Timed without the profiler in one
# H100 call (2026-11-26, docs/PERF.md "Session 5"), Mosaic is faster in the engine at every batch: batch 256
# 12.14 vs 12.70 ms/step (replayed forward 11.43 vs 12.10), batch 64 7.38 vs 7.67 ms, batch 1 5.70 vs 5.74 ms.
# --attention-backend pallas_triton still picks Triton.
MOSAIC_FASTEST = True

# Prefill steps under pallas_mosaic: 0 = the Triton ragged prefill, 1 or 2 = the Mosaic prefill kernel with that
# many compute warpgroups per tile (ragged_prefill_mgpu.py). H100, 2026-11-26 (docs/PERF.md "Session 5"), share of
# the matmul rate on 8 x 2048 tokens / a mixed chunked batch: Triton 25.7% / 21.2%; Mosaic, one warpgroup 37.8% /
# 32.0%, two 35.7% / 30.8%. Engine end to end against XLA on the same GPU: SmolLM2 shape 32/32 greedy tokens
# identical on all six prompts (top-5 logprobs within 0.016); Llama-3-8B shape like Triton's (near-flat random
# weights flip argmaxes after 3-27 tokens; within 0.22).
# Session 8 (H100, docs/PERF.md "Session 8"): 3 = FA3's layout (two compute warpgroups taking turns on the tensor
# cores, a producer warpgroup, 128 keys per step): 53.4% / 42.2% of the matmul rate against one warpgroup's 46.3% /
# 35.1% in the same run (padding rows now zeroed by the kernel in both); SmolLM2 shape 32/32 greedy tokens
# identical against XLA on all six prompts (within 0.016), Llama-3-8B shape within 0.16. Steps below 2048 tokens
# keep one warpgroup (ragged_prefill_mgpu.FA3_MIN_TOKENS: warm start).
MOSAIC_PREFILL_WARPGROUPS = 3

# Decode steps under pallas_mosaic whose batch x kv heads reach this many items take the persistent Mosaic decode
# kernel (paged_decode_mgpu.MosaicDecodeTuning.workers: one CUDA block per SM, each walking a run of (sequence,
# kv head) items through one TMA ring); smaller ones keep one block per item and split. 0 (or less) = never.
# Session 9 (H100, docs/PERF.md "Session 9", same call): kernel alone, 16 calls in one program, Llama-3-8B heads,
# block 16: persistent vs grid at B=256 (2048 items) 226.0 vs 232.3 us (ctx 512), 775.1 vs 777.2 (ctx 2048), 2941 vs
# 2935 (ctx 8192): a tie within run-to-run noise; at B=128 and below it is slower (ctx 256: 74.2 vs 69.4 us;
# B=1 ctx 8192: 184 vs 33 us, no split). Engine batch-256 step: attention 3.63 vs 3.76 ms per step (the grid
# kernel's f32 output slice is gone), device busy 1% lower. So from 2048 items only.
MOSAIC_DECODE_PERSISTENT_MIN_ITEMS = 2048
MOSAIC_PREFILL_CHOICES = (0, 1, 2, 3)  # what --mosaic-prefill-warpgroups takes (3: FA3 layout, 2 + a producer)


def attention_backend(platform: str, compute_capability: tuple[int, int] | None = None,
                      override: str | None = None) -> str:
    """Returns one of BACKENDS.

    Args:
      platform: "cpu", "gpu" (or "cuda"/"rocm"), "tpu", ...
      compute_capability: (major, minor) for NVIDIA GPUs, e.g. (9, 0) for H100.
      override: a name from BACKENDS (or "auto"/None); a Pallas backend the device cannot run raises ValueError.
    """
    platform = "gpu" if platform in ("gpu", "cuda") else platform
    if override not in (None, "auto"):
        if override not in BACKENDS:
            raise ValueError(f"unknown attention backend {override!r}; choose from {BACKENDS} or 'auto'")
        if override == "xla":
            return override
        if platform != "gpu" or compute_capability is None or compute_capability < (8, 0):
            raise ValueError(f"{override} needs an NVIDIA GPU with sm >= 8.0, got {platform} {compute_capability}")
        if override == "pallas_mosaic" and compute_capability[0] != 9:
            raise ValueError(f"pallas_mosaic is Hopper-only (sm 9.x); got sm {compute_capability}")
        return override
    if platform != "gpu" or compute_capability is None:
        return "xla"
    if compute_capability[0] == 9:
        return "pallas_mosaic" if MOSAIC_FASTEST else "pallas_triton"
    if compute_capability[0] == 8:
        return "pallas_triton"
    return "xla"  # pre-Ampere, or Blackwell until measured there


def device_attention_backend(device: jax.Device | None = None, override: str | None = None) -> str:
    """attention_backend for a concrete device (default: the first device)."""
    device = device or jax.devices()[0]
    cc = getattr(device, "compute_capability", None)  # "9.0" on CUDA devices
    cap = tuple(int(x) for x in cc.split(".")[:2]) if isinstance(cc, str) and cc[:1].isdigit() else None
    return attention_backend(device.platform, cap, override)


KV_WRITE_BACKENDS = ("xla", "pallas_triton", "jax_triton")


# From the H100 run of bench_kernels.py --kv-write (Llama-3-8B layer, bf16, us per write; docs/PERF.md): Pallas
# wins up to a few hundred tokens (T=64: 2.5-3.3 vs XLA 3.6, jax-triton ~10 launch-bound), jax-triton from ~2048
# (T=2048: 10.5 vs Pallas 12.5, XLA 43.5; T=8192: 29.6 vs 43 and 156).
JAX_TRITON_MIN_TOKENS = 2048


def kv_write_backend(platform: str, num_tokens: int = 0, override: str | None = None,
                     triton_ok: bool | None = None) -> str:
    """Which KV-cache write a step of `num_tokens` new tokens gets: one of KV_WRITE_BACKENDS.

    auto: "xla" (kv_write's scatter) off GPUs; on GPUs the Pallas kernel, or the jax-triton one from
    JAX_TRITON_MIN_TOKENS tokens where jax_triton imports (triton_ok; default: probe it).

    Args:
      platform: "cpu", "gpu" (or "cuda"/"rocm"), "tpu", ...
      num_tokens: the step's (padded) token count, a static shape.
      override: a name from KV_WRITE_BACKENDS (or "auto"/None); a Triton one off a GPU raises ValueError.
    """
    gpu = platform in ("gpu", "cuda")
    if override in (None, "auto"):
        if not gpu:
            return "xla"
        if num_tokens >= JAX_TRITON_MIN_TOKENS:
            if triton_ok is None:
                from jaxserve.pallas_kernels.kv_write_triton import triton_available
                triton_ok = triton_available()
            if triton_ok:
                return "jax_triton"
        return "pallas_triton"
    if override not in KV_WRITE_BACKENDS:
        raise ValueError(f"unknown kv write backend {override!r}; choose from {KV_WRITE_BACKENDS} or 'auto'")
    if override != "xla" and not gpu:
        raise ValueError(f"{override} kv write needs an NVIDIA GPU, got {platform}")
    return override


def mosaic_decode_tuning(batch: int, num_kv_heads: int, min_items: int = MOSAIC_DECODE_PERSISTENT_MIN_ITEMS):
    """The Mosaic decode kernel's tuning for a decode step of `batch` rows: persistent from min_items items."""
    from jaxserve.pallas_kernels.paged_decode_mgpu import DEFAULT_MOSAIC_DECODE, MosaicDecodeTuning
    if min_items > 0 and batch * num_kv_heads >= min_items:
        return MosaicDecodeTuning(workers=-1)
    return DEFAULT_MOSAIC_DECODE
