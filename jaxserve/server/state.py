"""Per-app server state, request body reading, and admission control.

Admission: while draining (SIGTERM received) or once `--max-waiting-requests` requests are waiting
in the engine (engine.stats().num_waiting), a new generation request gets 503 with Retry-After.
The check reads the engine's queue, so a burst arriving within one engine step can overshoot the
limit by that burst; it bounds queueing delay, it is not an exact semaphore.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request

from jaxserve.metrics import ServerMetrics
from jaxserve.server.args import ServerArgs
from jaxserve.server.errors import APIError


@dataclass
class ServerState:
    engine: Any
    args: ServerArgs
    model_name: str
    chat_template: str | None
    metrics: ServerMetrics
    started: int
    draining: bool = False
    drain_started: float | None = None  # time.monotonic() of the SIGTERM
    profiling: bool = False
    background: list = field(default_factory=list)

    def start_draining(self) -> None:
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()

    def grace_left(self) -> float:
        spent = 0.0 if self.drain_started is None else time.monotonic() - self.drain_started
        return max(0.0, self.args.shutdown_grace_seconds - spent)

    def check_alive(self) -> None:
        if self.engine.errored:
            raise APIError(503, f"engine is dead: {self.engine.dead_error!r}", headers={"Retry-After": "30"})

    def admit(self) -> None:
        if self.draining:
            raise APIError(503, "server is shutting down", headers={"Retry-After": "5"})
        self.check_alive()
        limit = self.args.max_waiting_requests
        if limit is not None:
            waiting = self.engine.stats().num_waiting
            if waiting >= limit:
                raise APIError(503, f"server busy: {waiting} requests waiting (limit {limit})",
                               headers={"Retry-After": "1"})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON whatever Content-Type says (curl -d declares form encoding)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body
