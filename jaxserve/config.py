"""Engine configuration: one frozen EngineConfig of small sub-configs, built from EngineArgs whose
fields and CLI flags keep vLLM's names (`--block-size`, `--gpu-memory-utilization`, ...).

Each component takes only the sub-config it needs. Nothing is read from the environment behind the
config's back; the one exception is where JAX itself must be told before its backend starts
(memory preallocation), which `jaxserve.platform` does from these values.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a local HF folder (resolved path)
    served_model_name: str
    tokenizer: str | None  # folder; None with skip_tokenizer_init
    dtype: str  # "bfloat16" | "float16" | "float32" after resolving "auto"
    max_model_len: int
    load_format: str = "auto"  # "auto" | "dummy" | "safetensors"
    seed: int = 0
    skip_tokenizer_init: bool = False
    chat_template: str | None = None
    max_logprobs: int = 20


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 0.0  # GiB of host memory for preempted KV; 0 = recompute
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_memory: int | None = None  # bytes; the CPU rule when set
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    num_processes: int = 1  # jax.distributed processes (hosts); process 0 schedules and serves
    process_id: int = 0
    coordinator_address: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: "object"  # jaxserve.scheduler.SchedulerConfig
    parallel: ParallelConfig
    device: str = "auto"  # "auto" | "cpu" | "gpu"
    enforce_eager: bool = False
    compile_cache_dir: str | None = None
    async_scheduling: bool = True
    dispatch_thread: bool = False


def _bool(v: str) -> bool:
    return v.lower() in ("1", "true", "yes", "on")


@dataclass
class EngineArgs:
    """User-facing knobs with vLLM's names. `None` model means the embedded default (SmolLM2-135M-Instruct)."""

    model: str | None = None
    served_model_name: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    chat_template: str | None = None
    max_logprobs: int = 20
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 0.0
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pp_microbatch_tokens: int = 1024
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    device: str = "auto"
    enforce_eager: bool = False
    compile_cache_dir: str | None = None
    compile_threads: int | None = None
    async_scheduling: bool = True
    dispatch_thread: bool | None = None
    attention_backend: str = "auto"
    mosaic_prefill_warpgroups: int | None = None
    # Not a flag: who runs the engine ("offline" or "server", set by `python -m jaxserve.serve`), for defaults
    # that differ between the two, as vLLM's usage context does.
    usage: str = dataclasses.field(default="offline", metadata={"cli": False})

    HELP = {
        "model": "Local HF model folder (config.json + safetensors). Default: the embedded SmolLM2-135M-Instruct.",
        "served_model_name": "Model name clients send in requests (default: the --model value).",
        "tokenizer": "HF tokenizer folder (default: the model folder).",
        "skip_tokenizer_init": "Do not load a tokenizer: prompts and outputs are token ids only.",
        "dtype": "Weight/activation dtype: auto (follow the checkpoint), bfloat16, float16, float32.",
        "max_model_len": "Context length (prompt + output). Default: the model's max_position_embeddings.",
        "load_format": "auto (safetensors), or dummy (random weights from config.json, for benchmarks).",
        "seed": "Seed for dummy weights and for requests that give no seed.",
        "chat_template": "Jinja chat template (file path or inline) overriding the tokenizer's.",
        "max_logprobs": "Largest top-N logprobs a request may ask for.",
        "block_size": "Tokens per KV-cache page (16, 32, 64 or 128).",
        "gpu_memory_utilization": "Share of device memory for weights + activations + KV cache (0..1].",
        "swap_space": "GiB of host memory for KV blocks of preempted requests (0: preemption recomputes).",
        "enable_prefix_caching": "Reuse KV blocks of identical prompt prefixes (true/false).",
        "num_gpu_blocks_override": "Exact number of KV blocks (tests and experts).",
        "kv_cache_memory": "Bytes for the KV cache; the rule on CPU, where no memory statistics exist.",
        "kv_cache_dtype": "KV cache dtype: auto (the model dtype).",
        "max_num_seqs": "Most requests running at once. Default 512 on 80 GB GPUs (>= 40 GiB usable), 256 elsewhere.",
        "max_num_batched_tokens": "Token budget per step (also the chunked-prefill chunk). Default on 80 GB GPUs "
                                  "(>= 40 GiB usable) 4096 in the server and 8192 offline; 2048 on smaller ones, "
                                  "512 on CPU.",
        "tensor_parallel_size": "Devices to shard each layer over (tensor parallelism).",
        "pipeline_parallel_size": "Pipeline stages (layers split evenly; each stage on its own tp devices).",
        "pp_microbatch_tokens": "With pipeline stages, steps of at least this many tokens run as two micro-batches "
                                "so that consecutive stages work at once (0 = never). Small steps are bound by "
                                "weight reads, which micro-batches would double, so they run whole.",
        "coordinator_address": "host:port of process 0 for multi-host jax.distributed (with --num-processes > 1).",
        "num_processes": "Processes (hosts) in a multi-host run; process 0 schedules and serves, the others follow.",
        "process_id": "This process's index in a multi-host run (0 = the leader).",
        "device": "auto, cpu or gpu. gpu fails loudly if JAX fell back to CPU.",
        "enforce_eager": "Compile step shapes lazily instead of at warm-up.",
        "compile_cache_dir": "JAX persistent compilation cache folder (default ~/.cache/jaxserve/xla); the "
                             "compiled step programs are kept beside it (jaxserve_programs/), so a restart loads "
                             "them without tracing (JAXSERVE_PROGRAM_STORE=0: off).",
        "compile_threads": "Compile the warm-up shapes from this many threads, before the KV cache is allocated "
                           "(concurrent autotuning needs device memory), then run them (1 = one by one). Default: "
                           "8 on one GPU (capped at the CPU count; the H100's warm start took 16.9 s instead of "
                           "23.1 s, with steps as fast), else 1; 2 once the first shape loads from the persistent "
                           "cache (what is left is tracing, which holds the GIL). Shapes the program store holds "
                           "load from it, with no thread. Not with pipeline stages or several hosts.",
        "async_scheduling": "Prepare step t+1 on the host while the device runs step t.",
        "dispatch_thread": "Launch device work from a second host thread, so the launch cost of a step overlaps "
                           "the engine's Python work (with async scheduling). Default: on for GPUs (measured faster "
                           "on the H100, docs/PERF.md), off on CPU.",
        "attention_backend": "auto (the device's fastest: Pallas kernels on GPU, XLA on CPU), xla, pallas_triton, "
                             "pallas_mosaic (Hopper).",
        "mosaic_prefill_warpgroups": "With pallas_mosaic: 0 runs prefill with the Triton kernel, 1 or 2 with the "
                                     "Mosaic prefill kernel and that many warpgroups per tile, 3 with FA3's "
                                     "layout (two compute warpgroups taking turns and a producer warpgroup) "
                                     "for steps of 2048 tokens or more, one warpgroup below. "
                                     "Default: the measured best (docs/PERF.md).",
    }

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            kind = f.type if isinstance(f.type, str) else str(f.type)
            if "bool" in kind:
                parser.add_argument(flag, type=_bool, nargs="?", const=True, default=default,
                                    help=cls.HELP[f.name] + f" (default: {default})")
            elif "int" in kind:
                parser.add_argument(flag, type=int, default=default, help=cls.HELP[f.name])
            elif "float" in kind:
                parser.add_argument(flag, type=float, default=default, help=cls.HELP[f.name])
            else:
                parser.add_argument(flag, type=str, default=default, help=cls.HELP[f.name])
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)})
