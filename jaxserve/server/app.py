"""The OpenAI-compatible Starlette app: `build_app(engine, server_args)`.

Request path of a generation: auth middleware (401/429) -> admission (503 while draining or with a
full waiting queue) -> body read with a size cap (413) and parsed as JSON whatever the Content-Type
(400) -> pydantic schema (400 naming the field) -> model name (404) -> unbuilt fields (400) ->
SamplingParams (400) -> EngineResponse, which drives the engine stream and aborts the engine request
if the client goes away. Nothing here blocks the event loop: template rendering and tokenization run
in worker threads, the engine runs in its own thread and is only awaited.

Lifespan: startup calls engine.start(), registers metrics and starts the stats log line; shutdown
(after uvicorn has drained connections, see serve.py) calls engine.shutdown(grace).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from jaxserve.metrics import ServerMetrics, log_stats_loop
from jaxserve.server import routes_misc
from jaxserve.server.args import ServerArgs
from jaxserve.server.auth import AuthMiddleware
from jaxserve.server.chat import chat_events, resolve_chat_template
from jaxserve.server.completions import completion_events
from jaxserve.server.errors import APIError, api_error_response, error_response, from_validation_error
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, check_unbuilt,
                                      to_sampling_params, unknown_fields)
from jaxserve.server.state import ServerState, new_request_id, read_json
from jaxserve.server.streaming import EngineResponse

logger = logging.getLogger("jaxserve.server")


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _generate(request: Request, chat: bool) -> Any:
    state = _state(request)
    request_id = new_request_id("chatcmpl" if chat else "cmpl")
    headers = {"X-Request-Id": request.headers.get("x-request-id") or request_id}
    try:
        state.admit()
        body = await read_json(request, state.args.max_request_body_bytes)
        schema = ChatCompletionRequest if chat else CompletionRequest
        try:
            req = schema.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        state.check_model(req.model)
        check_unbuilt(req, state.engine.model_config.max_logprobs)
        if unknown := unknown_fields(req):
            logger.warning("request %s: ignoring unknown fields %s", request_id, unknown)
        params = to_sampling_params(req, state.engine.generation_defaults or {})
        if chat:
            events = await chat_events(state, req, params, request_id)
        else:
            events = completion_events(state, req, params, request_id)
    except APIError as e:
        return api_error_response(APIError(e.status, e.message, e.param, {**headers, **e.headers}))
    if not state.args.disable_log_requests:
        logger.info("request %s (X-Request-Id %s): stream=%s n=%d %s", request_id, headers["X-Request-Id"],
                    req.stream, req.n, params)
    return EngineResponse(events, req.stream, headers)


async def completions(request: Request) -> Any:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Any:
    return await _generate(request, chat=True)


async def _http_error(request: Request, exc: HTTPException) -> Any:
    msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    return error_response(exc.status_code, msg.get(exc.status_code, str(exc.detail)), headers=exc.headers)


async def _api_error(request: Request, exc: APIError) -> Any:
    return api_error_response(exc)


async def _internal_error(request: Request, exc: Exception) -> Any:
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, f"internal error: {exc!r}")


def build_app(engine: Any, args: ServerArgs) -> Starlette:
    mc = engine.model_config
    state = ServerState(engine=engine, args=args, model_name=mc.served_model_name,
                        chat_template=resolve_chat_template(mc.chat_template),
                        metrics=ServerMetrics(engine, mc.served_model_name), started=int(time.time()))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        if args.log_stats_interval > 0:
            state.background.append(asyncio.create_task(log_stats_loop(engine, args.log_stats_interval)))
        logger.info("serving %s (max_model_len %d)", state.model_name, mc.max_model_len)
        try:
            yield
        finally:
            state.start_draining()
            for t in state.background:
                t.cancel()
            await engine.shutdown(state.grace_left())
            logger.info("engine shut down")

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        *routes_misc.routes(),
    ]
    api_key = args.resolved_api_key()
    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(AuthMiddleware, api_keys=[api_key] if api_key else [], rate_limit=args.rate_limit)],
        exception_handlers={HTTPException: _http_error, APIError: _api_error, Exception: _internal_error},
    )
    app.state.server = state
    return app
