"""Driving engine streams from an HTTP request, with disconnects aborting the engine request.

`merge_outputs` runs one engine request per prompt (a batch prompt is several) and yields their
cumulative outputs interleaved as they come (vLLM's merge_async_iterators; one prompt reads its stream
directly). Leaving it early, for any reason (client gone, error, cancellation), aborts every engine
request not yet finished; the abort runs in its own task so a second cancellation cannot skip it.

`EngineResponse` is a raw ASGI response: it pulls events from a handler's async generator while a
sibling task waits on `receive()` for `http.disconnect` (uvicorn delivers it the moment the socket
closes, even when no token is due). A disconnect cancels the pull, which closes the generator and so
aborts the engine requests, for streaming and non-streaming requests alike. The first event is pulled
before the status line is sent, so errors found by the engine at admission (prompt too long) are
still a plain 400; an error after that is sent as `data: {"error": {...}}` then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import anyio

from jaxserve.outputs import RequestOutput
from jaxserve.server.errors import APIError, error_body

logger = logging.getLogger("jaxserve.server")

_cleanup_tasks: set[asyncio.Task] = set()  # strong refs, so cleanup tasks are not collected mid-run


async def _finish_cleanup(engine: Any, tasks: list[asyncio.Task], request_ids: list[str],
                          streams: tuple = ()) -> None:
    # abort first (frees the blocks now), then stop the per-prompt pumps (or close the one stream read directly)
    for rid in request_ids:
        try:
            await engine.abort(rid)
        except Exception:  # an abort failing must not hide the original outcome
            logger.exception("abort(%s) failed", rid)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        try:
            await stream.aclose()
        except Exception:
            logger.exception("closing an engine stream failed")


async def _one_prompt(engine: Any, prompt: str | list[int], params: Any,
                      request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """merge_outputs for one prompt (almost every request): the engine's stream read directly, without the pump
    task and the queue a batch needs (two task switches and a queue per streamed chunk)."""
    stream = engine.generate(prompt, params, request_id)
    finished = False
    try:
        try:
            async for out in stream:
                finished = finished or out.finished
                yield 0, out
        except ValueError as e:  # the engine's "can never fit" verdict: the client's fault
            raise APIError(400, str(e)) from None
    finally:
        await _shielded_cleanup(engine, [], [] if finished else [request_id], (stream,))


async def _shielded_cleanup(engine: Any, tasks: list[asyncio.Task], request_ids: list[str], streams=()) -> None:
    cleanup = asyncio.get_running_loop().create_task(_finish_cleanup(engine, tasks, request_ids, streams))
    _cleanup_tasks.add(cleanup)
    cleanup.add_done_callback(_cleanup_tasks.discard)
    with anyio.CancelScope(shield=True):
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:  # cancelled again: the cleanup task still runs on its own
            pass


def merge_outputs(engine: Any, prompts: list[str | list[int]], params: Any,
                  request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, cumulative RequestOutput) for each prompt's engine request, as they come."""
    if len(prompts) == 1:  # returned, not wrapped: one async generator frame less per chunk
        return _one_prompt(engine, prompts[0], params, request_id)
    return _merged(engine, prompts, params, request_id)


async def _merged(engine: Any, prompts: list[str | list[int]], params: Any,
                  request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            async for out in engine.generate(prompts[i], params, ids[i]):
                queue.put_nowait((i, out))
        except ValueError as e:  # the engine's "can never fit" verdict: the client's fault
            queue.put_nowait((i, APIError(400, str(e))))
        except Exception as e:
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    unfinished = set(ids)
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                if item.finished:
                    unfinished.discard(ids[i])
                yield i, item
    finally:
        await _shielded_cleanup(engine, tasks, [rid for rid in ids if rid in unfinished])


def sse(data: dict | str) -> bytes:
    """One SSE event: a dict is encoded here, a str is JSON text already (common.ChunkEncoder)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def send_json(send: Any, status: int, body: dict, headers: dict[str, str]) -> None:
    content = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content, "more_body": False})


class EngineResponse:
    """ASGI response for an engine-backed request: one JSON body (stream=False) or SSE events (dicts or JSON
    text)."""

    def __init__(self, events: AsyncIterator[dict | str], stream: bool, headers: dict[str, str]) -> None:
        self.events = events
        self.stream = stream
        self.headers = headers
        self.disconnected = False
        self.completed = False  # the last body chunk went out; a disconnect after that is normal

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self.completed:
                        self.disconnected = True
                        tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                try:
                    await self._respond(send)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
        if self.disconnected:
            logger.info("client disconnected: %s aborted", self.headers.get("X-Request-Id"))

    async def _respond(self, send: Any) -> None:
        try:
            first = await anext(self.events)
        except APIError as e:
            self.completed = True
            await send_json(send, e.status, e.body(), {**self.headers, **e.headers})
            return
        except Exception as e:
            logger.exception("request %s failed", self.headers.get("X-Request-Id"))
            self.completed = True
            await send_json(send, 500, error_body(500, f"internal error: {e!r}"), self.headers)
            return
        if not self.stream:
            self.completed = True
            await send_json(send, 200, first, self.headers)
            return
        raw = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
        raw += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": sse(first), "more_body": True})
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": sse(event), "more_body": True})
        except APIError as e:
            await send({"type": "http.response.body", "body": sse(e.body()), "more_body": True})
        except Exception as e:
            logger.exception("stream %s failed", self.headers.get("X-Request-Id"))
            body = sse(error_body(500, f"internal error: {e!r}"))
            await send({"type": "http.response.body", "body": body, "more_body": True})
        self.completed = True
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
