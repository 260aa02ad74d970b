"""AsyncLLMEngine: one engine-loop thread drives LLMEngine.step(); each request gets an async stream.

The event loop never runs a device step: `generate` puts an "add" command on a queue that the
engine thread drains between steps, and the thread hands outputs back with
`loop.call_soon_threadsafe`. Validation errors (ValueError, the server's 400) travel back the
same way as the stream's first item. If the loop thread dies, every open stream gets the error
and `errored` turns true (the server's /health answers 503).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from jaxserve.engine import LLMEngine
from jaxserve.engine_protocol import EngineStats, TokenHistogram
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger("jaxserve")
_END = object()


def cache_config(engine: LLMEngine) -> dict:
    """The static cache facts of the `cache_config_info` metric."""
    cc = engine.config.cache
    return dict(block_size=cc.block_size, num_gpu_blocks=engine.runner.num_blocks,
                enable_prefix_caching=cc.enable_prefix_caching, swap_space=cc.swap_space,
                gpu_memory_utilization=cc.gpu_memory_utilization)


def engine_stats(s: dict, hist: TokenHistogram, unseen_adds: int, cache: dict) -> EngineStats:
    """LLMEngine.stats() -> EngineStats; unseen_adds: requests sent but not yet taken by the engine (waiting)."""
    return EngineStats(
        num_running=s["num_running"], num_waiting=s["num_waiting"] + unseen_adds,
        num_swapped=s["num_swapped"], kv_cache_usage=s["kv_cache_usage"],
        num_preemptions_total=s["num_preemptions_total"], prompt_tokens_total=s["prompt_tokens_total"],
        generation_tokens_total=s["generation_tokens_total"],
        prefix_cache_queries_total=s["prefix_cache_queries_total"],
        prefix_cache_hits_total=s["prefix_cache_hits_total"], iteration_tokens=hist, cache_config=dict(cache))


def _deliver(items) -> None:
    """On the event loop: put each output on its stream; a finished one also ends the stream."""
    for q, out in items:
        q.put_nowait(out)
        if out.finished:
            q.put_nowait(_END)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.generation_defaults = engine.generation_defaults
        self.errored = False
        self.dead_error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners: list[Callable[[RequestOutput], None]] = []
        self._hist = TokenHistogram()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._profiling = False
        engine.finished_listeners.append(lambda g, out: [fn(out) for fn in self._listeners])

    @classmethod
    def from_engine_args(cls, args) -> AsyncLLMEngine:
        return cls(LLMEngine.from_engine_args(args))

    # ----------------------------------------------------------------------------------- the loop
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop:
                self._drain_commands()
                if not eng.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outs = eng.step()
                self._hist.observe(eng.stats_counters["last_step_tokens"])
                self._emit_step(outs)
        except BaseException as e:  # noqa: BLE001 - the loop must report any death
            log.exception("engine loop died")
            self.dead_error, self.errored = e, True
            for rid in list(self._streams):
                self._emit(rid, e, final=True)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, *a = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                rid, prompt, params = a
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as e:  # noqa: BLE001 - one bad request must not kill the loop
                    self._emit(rid, e, final=True)
            elif cmd == "abort":
                out = self.engine.abort_request(a[0])
                if out is not None:
                    self._emit(a[0], out, final=True)

    def _emit_step(self, outs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams with one wake-up per event loop, not one per request."""
        by_loop: dict = {}
        for out in outs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            by_loop.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the client's loop is closed
                pass

    def _emit(self, rid: str, item, final: bool) -> None:
        entry = self._streams.get(rid)
        if entry is None:
            return
        loop, q = entry
        if final:
            self._streams.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
            if final:
                loop.call_soon_threadsafe(q.put_nowait, _END)
        except RuntimeError:  # the client's loop is closed
            pass

    # -------------------------------------------------------------------------------- the requests
    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        if self.errored:
            raise RuntimeError(f"the engine loop has died: {self.dead_error!r}")
        if isinstance(prompt, str) and self.tokenizer is not None:
            # Tokenize here, in a worker thread, not on the engine thread between device steps.
            ids = await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, prompt)
            prompt = {"prompt": prompt, "prompt_token_ids": ids}
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        if self.errored:  # died between the check above and registering: its sweep may have missed us
            self._streams.pop(request_id, None)
            raise RuntimeError(f"the engine loop has died: {self.dead_error!r}")
        self._submit(("add", request_id, prompt, sampling_params))
        finished = False
        try:
            while True:
                item = await q.get()
                # Outputs are cumulative: a consumer that fell behind skips to the newest one (one SSE
                # chunk with several tokens), so a slow client costs the loop less, not more.
                while isinstance(item, RequestOutput) and not item.finished and not q.empty():
                    item = q.get_nowait()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the consumer went away (client disconnect): free the KV blocks now
                self._streams.pop(request_id, None)
                self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, cmd: tuple) -> None:
        """Hand a command to the engine loop (drained between steps)."""
        self._commands.put(cmd)
        self._wake.set()

    def _has_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def add_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        self._listeners.append(fn)

    def stats(self) -> EngineStats:
        return engine_stats(self.engine.stats(), self._hist, self._commands.qsize(), cache_config(self.engine))

    # ---------------------------------------------------------------------------------- profiling
    def start_profile(self, dir: str) -> None:
        import jax
        if self._profiling:
            raise RuntimeError("a profile is already being recorded")
        jax.profiler.start_trace(dir)
        self._profiling = True

    def stop_profile(self) -> None:
        import jax
        if not self._profiling:
            raise RuntimeError("no profile is being recorded")
        jax.profiler.stop_trace()
        self._profiling = False

    async def shutdown(self, grace_s: float) -> None:
        """Let in-flight requests finish for up to grace_s, abort the rest, stop the loop."""
        deadline = time.monotonic() + grace_s
        while self._has_requests() and time.monotonic() < deadline and not self.errored:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            await self.abort(rid)
        await asyncio.sleep(0.1)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
