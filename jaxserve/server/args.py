"""Server-side flags (the engine's come from EngineArgs.add_cli_args), vLLM's names where vLLM has one."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int | None = None
    rate_limit: float | None = None
    profile_dir: str | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    uvicorn_log_level: str = "info"
    disable_log_requests: bool = False
    log_stats_interval: float = 10.0
    shutdown_grace_seconds: float = 30.0
    disable_frontend_multiprocessing: bool = False
    engine_factory: str | None = None  # tests only: "module:function" building a fake engine

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("JAXSERVE_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=os.environ.get("JAXSERVE_HOST", ServerArgs.host),
                   help="Address to bind (default: $JAXSERVE_HOST, else 127.0.0.1; the Docker image sets "
                        "JAXSERVE_HOST=0.0.0.0 so `docker run <image> --model ...` is reachable).")
    g.add_argument("--port", type=int, default=ServerArgs.port, help="TCP port (default 8000).")
    g.add_argument("--api-key", default=None,
                   help="Require `Authorization: Bearer <key>` on /v1/*, /tokenize, /detokenize and the "
                        "profiler endpoints. Also read from JAXSERVE_API_KEY or VLLM_API_KEY.")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="Admission control: once this many requests wait for the engine, new ones get 503 "
                        "with Retry-After (default: unlimited).")
    g.add_argument("--rate-limit", type=float, default=None,
                   help="Requests per second allowed per API key (per client address without a key); "
                        "token bucket with a burst of max(1, rate); over it: 429 (default: off).")
    g.add_argument("--profile-dir", default=None,
                   help="Enable POST /start_profile and /stop_profile, writing jax.profiler traces here.")
    g.add_argument("--max-request-body-bytes", type=int, default=ServerArgs.max_request_body_bytes,
                   help="Largest request body accepted; larger is 413 (default 16 MiB).")
    g.add_argument("--uvicorn-log-level", default=ServerArgs.uvicorn_log_level,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="Log level of uvicorn and of the server (default info).")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="Do not log each request's id, prompt size and sampling parameters.")
    g.add_argument("--log-stats-interval", type=float, default=ServerArgs.log_stats_interval,
                   help="Seconds between engine stats log lines (throughput, batch, KV usage); 0 disables.")
    g.add_argument("--shutdown-grace-seconds", type=float, default=ServerArgs.shutdown_grace_seconds,
                   help="On SIGTERM: stop admitting (503), let in-flight requests finish for this long, "
                        "then abort them and exit 0 (default 30).")
    g.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="Run the engine in the server's process (one thread) instead of its own process. In one "
                        "process the HTTP work and the engine share the GIL, which slows steps under load.")
    g.add_argument("--engine-factory", default=None, help=argparse.SUPPRESS)
    return parser


def server_args_from(ns: argparse.Namespace) -> ServerArgs:
    return ServerArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerArgs)})
