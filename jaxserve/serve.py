"""`python -m jaxserve.serve` (also the `jaxserve` script): CLI -> engine -> Starlette app -> uvicorn.

Flags: the engine's (EngineArgs.add_cli_args, vLLM's names) plus the server's (jaxserve/server/args.py).
With no --model the engine serves its embedded SmolLM2 default.

Shutdown on SIGTERM / Ctrl-C, using uvicorn's own machinery:
1. the server's `handle_exit` (`_make_server`) marks the app as draining: new generation requests get 503 + Retry-After
   and /health turns 503, so a load balancer stops sending;
2. uvicorn closes the listening socket and waits for in-flight responses up to
   --shutdown-grace-seconds (timeout_graceful_shutdown), then cancels what is left: each cancelled
   response aborts its engine request (jaxserve/server/streaming.py);
3. the lifespan shutdown calls engine.shutdown(grace left), and the process exits 0.
uvicorn re-raises a caught signal after shutdown, which for SIGTERM would kill the process with
status 143; that handler does not record the signal, so a drained shutdown exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys
from types import FrameType
from typing import Any

from jaxserve.config import EngineArgs
from jaxserve.platform import set_gil_switch_interval
from jaxserve.server.args import ServerArgs, add_server_args, server_args_from

# uvicorn and the app are imported in main(), while the engine process starts: the engine process imports this
# module again (multiprocessing's spawn re-imports __main__), which should cost it nothing.

logger = logging.getLogger("jaxserve.serve")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxserve.serve",
        description="OpenAI-compatible LLM server on JAX (/v1/completions, /v1/chat/completions, /metrics, ...).")
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))
    add_server_args(parser)
    return parser


def _import_server() -> None:
    import uvicorn  # noqa: F401

    import jaxserve.server.app  # noqa: F401


def build_engine(engine_args: EngineArgs, server_args: ServerArgs) -> Any:
    """The real engine, or (tests only) the fake named by --engine-factory module:function.

    The real engine runs in its own process (jaxserve/mp_engine.py) unless --disable-frontend-multiprocessing
    is given or the model spans several hosts (--num-processes > 1: process 0's engine leads the others'
    steps from this process)."""
    if server_args.engine_factory:
        module, _, fn = server_args.engine_factory.partition(":")
        return getattr(importlib.import_module(module), fn)(engine_args)
    if server_args.disable_frontend_multiprocessing or engine_args.num_processes > 1:
        from jaxserve.async_engine import AsyncLLMEngine  # imports JAX: only when a real engine is wanted

        return AsyncLLMEngine.from_engine_args(engine_args)
    from jaxserve.mp_engine import MPAsyncLLMEngine

    return MPAsyncLLMEngine.from_engine_args(engine_args, while_starting=_import_server)


def _make_server(config: Any, state: Any) -> Any:
    """uvicorn.Server whose exit handler drains the app first (see the module notes)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            state.start_draining()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting
            else:
                self.should_exit = True

    return _Server(config)


def _uvicorn_impls() -> tuple[str, str]:
    """What uvicorn's "auto" settings pick: httptools and uvloop where they import, else h11 and asyncio."""
    import importlib.util
    found = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return ("httptools" if found("httptools") else "h11"), ("uvloop" if found("uvloop") else "asyncio")


def main(argv: list[str] | None = None) -> int:
    ns = make_parser().parse_args(argv)
    engine_args, server_args = dataclasses.replace(EngineArgs.from_cli_args(ns), usage="server"), server_args_from(ns)
    level = server_args.uvicorn_log_level.upper()
    logging.basicConfig(level=getattr(logging, level, 5), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_gil_switch_interval()
    engine = build_engine(engine_args, server_args)
    import uvicorn

    from jaxserve.server.app import build_app
    app = build_app(engine, server_args)
    config = uvicorn.Config(app, host=server_args.host, port=server_args.port, lifespan="on",
                            log_level=server_args.uvicorn_log_level,
                            timeout_graceful_shutdown=max(server_args.shutdown_grace_seconds, 0.1))
    logging.getLogger("jaxserve").info("uvicorn: %s HTTP parser, %s event loop", *_uvicorn_impls())
    server = _make_server(config, app.state.server)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's startup-failure status (port taken, lifespan error)


if __name__ == "__main__":
    sys.exit(main())
