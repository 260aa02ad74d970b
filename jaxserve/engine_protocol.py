"""The narrow interface between the OpenAI server and the engine (JetStream style).

The server (jaxserve/server/) is written against `AsyncLLMEngineProtocol` only; the real
`jaxserve.async_engine.AsyncLLMEngine` and the test fake `tests/mock_engine.py` both satisfy it.
No JAX here.

Contract notes the server relies on:
- `generate` yields cumulative `RequestOutput`s (all text so far per choice) until `.finished`.
  It raises `ValueError` (message with the numbers) for a request that can never fit
  (prompt_len + max_tokens > max_model_len, token id out of range, more blocks than exist);
  the server turns that into a 400. Any other exception is a real fault (500, or an `error`
  event once a stream has started).
- `abort(request_id)` frees the request's KV blocks at once and is a no-op for an unknown or
  already finished id (the server may call it after the stream ended).
- `stats()` is cheap and thread-safe: it is read on the event loop at every /metrics scrape,
  by the periodic stats log line, and by admission control (`num_waiting`) on every request.
- listeners registered with `add_listener(fn)` get `fn(RequestOutput)` once per finished request
  (any thread), with `.metrics` filled: the server derives TTFT, ITL, queue time, e2e latency and
  `request_success_total{finished_reason}` from it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, runtime_checkable

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

# Upper bounds of the `iteration_tokens_total` histogram (tokens scheduled in one engine step), vLLM's.
ITERATION_TOKENS_BUCKETS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class TokenHistogram:
    """Cumulative histogram the engine keeps of tokens per step; the server exports it as is.

    `counts[i]` = steps with tokens <= ITERATION_TOKENS_BUCKETS[i] (non-cumulative per bucket;
    the last slot is +Inf). The engine calls `observe(n)` once per step.
    """

    counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))
    total: int = 0  # sum of observed token counts

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
        self.total += num_tokens


@dataclass
class EngineStats:
    """A snapshot of engine counters; totals are monotonic since start."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_cache_usage: float = 0.0  # 0..1 of allocatable blocks in use
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0  # prompt tokens computed (prefix-cache hits not counted)
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0  # tokens looked up
    prefix_cache_hits_total: int = 0  # tokens found
    iteration_tokens: TokenHistogram = field(default_factory=TokenHistogram)
    # Static cache facts for the `cache_config_info` metric (block_size, num_gpu_blocks, ...).
    cache_config: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class AsyncLLMEngineProtocol(Protocol):
    """What `jaxserve.async_engine.AsyncLLMEngine` provides to the server."""

    model_config: Any  # jaxserve.config.ModelConfig: served_model_name, max_model_len, model, chat_template
    tokenizer: Any  # jaxserve.tokenizer.Tokenizer, or None with skip_tokenizer_init
    generation_defaults: dict  # sampling defaults from generation_config.json
    errored: bool
    dead_error: BaseException | None

    @classmethod
    def from_engine_args(cls, args: Any) -> "AsyncLLMEngineProtocol": ...

    def start(self) -> None: ...

    def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def add_listener(self, fn: Callable[[RequestOutput], None]) -> None: ...

    def start_profile(self, dir: str) -> None: ...

    def stop_profile(self) -> None: ...

    async def shutdown(self, grace_s: float) -> None: ...
