"""The non-generation endpoints: /v1/models, /health, /metrics, /version, /tokenize, /detokenize,
/start_profile, /stop_profile (the last two answer 404 unless the server runs with --profile-dir)."""
from __future__ import annotations

from importlib import metadata
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxserve.server.chat import render_chat
from jaxserve.server.errors import APIError, bad_request, error_response, from_validation_error
from jaxserve.server.protocol import DetokenizeRequest, TokenizeRequest
from jaxserve.server.state import ServerState, read_json


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _version() -> str:
    try:
        return metadata.version("jaxserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


async def models(request: Request) -> Response:
    s = _state(request)
    mc = s.engine.model_config
    card = {"id": s.model_name, "object": "model", "created": s.started, "owned_by": "jaxserve",
            "root": mc.model, "parent": None, "max_model_len": mc.max_model_len, "permission": []}
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    s = _state(request)
    if s.engine.errored:
        return error_response(503, f"engine is dead: {s.engine.dead_error!r}")
    if s.draining:
        return error_response(503, "server is shutting down")
    return Response(status_code=200)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def version(request: Request) -> Response:
    return JSONResponse({"version": _version()})


async def _parse(request: Request, schema: Any) -> Any:
    s = _state(request)
    body = await read_json(request, s.args.max_request_body_bytes)
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
    s.check_model(req.model)
    if s.engine.tokenizer is None:
        raise bad_request("this server runs with --skip-tokenizer-init: no tokenizer", None)
    return s, req


async def tokenize(request: Request) -> Response:
    s, req = await _parse(request, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of `prompt` or `messages`", "prompt")
    if req.messages is not None:
        tokens = await render_chat(s, req.messages, req.add_generation_prompt)
    else:
        tokens = await anyio.to_thread.run_sync(
            lambda: s.engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
    return JSONResponse({"count": len(tokens), "max_model_len": s.engine.model_config.max_model_len,
                         "tokens": list(tokens)})


async def detokenize(request: Request) -> Response:
    s, req = await _parse(request, DetokenizeRequest)
    try:
        text = await anyio.to_thread.run_sync(lambda: s.engine.tokenizer.decode(req.tokens))
    except (ValueError, OverflowError, IndexError) as e:
        raise bad_request(f"cannot decode these tokens: {e}", "tokens") from None
    return JSONResponse({"prompt": text})


def _profile_dir(s: ServerState) -> str:
    if not s.args.profile_dir:
        raise APIError(404, "profiling is disabled: start the server with --profile-dir DIR")
    return s.args.profile_dir


async def start_profile(request: Request) -> Response:
    s = _state(request)
    folder = _profile_dir(s)
    if s.profiling:
        raise bad_request("a profile is already being recorded; POST /stop_profile first")
    await anyio.to_thread.run_sync(s.engine.start_profile, folder)
    s.profiling = True
    return JSONResponse({"status": "profiling", "dir": folder})


async def stop_profile(request: Request) -> Response:
    s = _state(request)
    folder = _profile_dir(s)
    if not s.profiling:
        raise bad_request("no profile is being recorded; POST /start_profile first")
    await anyio.to_thread.run_sync(s.engine.stop_profile)
    s.profiling = False
    return JSONResponse({"status": "stopped", "dir": folder})


def routes() -> list[Route]:
    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/start_profile", start_profile, methods=["POST"]),
        Route("/stop_profile", stop_profile, methods=["POST"]),
    ]
