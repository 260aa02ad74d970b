"""Helpers for the server tests: a real uvicorn server on a loopback port, in a thread (sharing the
mock engine with the test) or in a subprocess (`python -m jaxserve.serve --engine-factory ...`)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.args import ServerArgs

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with bound_socket() as s:
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving build_app(engine, ServerArgs(**kw)) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, engine, **kw) -> None:
        kw.setdefault("log_stats_interval", 0)
        kw.setdefault("disable_log_requests", True)
        kw.setdefault("shutdown_grace_seconds", 1.0)
        self.engine = engine
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.args = ServerArgs(host="127.0.0.1", port=self.port, **kw)
        self.app = build_app(engine, self.args)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def start_subprocess(*flags: str, factory: str | None = "mock_engine:make", env: dict | None = None,
                     timeout: float = 30, log_path=None) -> tuple:
    """(Popen, port) of `python -m jaxserve.serve --engine-factory <factory> --port P <flags>`, once /health is 200.
    factory None: the real engine. log_path: the server's output goes to that file (a real engine logs more than
    an unread pipe holds) instead of a pipe."""
    port = free_port()
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    e.update(env or {})
    cmd = [PYTHON, "-m", "jaxserve.serve", *(["--engine-factory", factory] if factory else []), "--port", str(port),
           "--log-stats-interval", "0", *flags]
    if log_path is None:
        proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if log_path is None else Path(log_path).read_text()[-3000:]
            raise RuntimeError(f"server exited {proc.returncode}: {out}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not come up")


def parse_sse(raw: str) -> list:
    """SSE text -> list of parsed `data:` payloads (dicts, or the string "[DONE]"); asserts the framing."""
    events = []
    assert raw.endswith("\n\n"), raw[-200:]
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_value(text: str, name: str, **labels) -> float | None:
    """A sample's value from Prometheus text (parsed with prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_for(pred, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
