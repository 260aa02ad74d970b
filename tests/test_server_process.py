"""The server as users run it: `python -m jaxserve.serve` in a subprocess (mock engine through the hidden
--engine-factory flag): --help, SIGTERM drain, the seed document's curl command, the Dockerfile,
and the legacy openai<1.0 client (slow: builds a small virtualenv, skips without PyPI)."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from jaxserve.config import EngineArgs
from server_harness import PYTHON, REPO, ServerThread, start_subprocess
from mock_engine import MockEngine


def test_help_explains_every_flag():
    out = subprocess.run([PYTHON, "-m", "jaxserve.serve", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    flags = ["--host", "--port", "--api-key", "--max-waiting-requests", "--rate-limit", "--profile-dir",
             "--max-request-body-bytes", "--uvicorn-log-level", "--disable-log-requests", "--log-stats-interval",
             "--shutdown-grace-seconds", "JAXSERVE_API_KEY", "VLLM_API_KEY"]
    flags += ["--" + f.replace("_", "-") for f in EngineArgs.HELP]
    missing = [f for f in flags if f not in out.stdout]
    assert not missing, missing
    assert "--engine-factory" not in out.stdout  # test-only, hidden


def test_sigterm_drains_in_flight_and_exits_0():
    proc, port = start_subprocess("--shutdown-grace-seconds", "10", factory="mock_engine:make_slow")
    try:
        body = {"prompt": "abcdefghijklmnopqrst", "max_tokens": 20, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = "\n".join(lines)
        events = [l[len("data: "):] for l in rest.splitlines() if l.startswith("data: ")]
        events = [e if e == "[DONE]" else json.loads(e) for e in events]
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"  # ran to the end during the drain
        assert time.monotonic() - t0 > 0.5
        assert proc.wait(timeout=20) == 0
        with pytest.raises(httpx.ConnectError):  # no longer listening
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read()
    assert "engine shut down" in log, log


def test_sigterm_grace_expiry_aborts_and_exits_0():
    proc, port = start_subprocess("--shutdown-grace-seconds", "0.5", factory="mock_engine:make_slow")
    try:
        body = {"prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # the stream is cut after the grace period
                for _ in lines:
                    pass
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 8  # not the 10 s the request wanted
    finally:
        if proc.poll() is None:
            proc.kill()


def test_draining_answers_503():
    with ServerThread(MockEngine()) as s:
        s.app.state.server.start_draining()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == 503
        assert httpx.get(s.url + "/health").status_code == 503


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


SEED_CURL = """curl http://localhost:8000/v1/completions -H "Authorization: Bearer sk-2025vLLM" \\
  -d '{"model": "meta-llama/Llama-2-7b-chat","prompt": "如何预防糖尿病","temperature": 0.7 }'"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_seed_document_curl_verbatim():
    """The founding document's server command and curl request, unchanged except the port when 8000 is taken."""
    port = 8000 if _port_free(8000) else None
    flags = ["--model", "meta-llama/Llama-2-7b-chat", "--served-model-name", "meta-llama/Llama-2-7b-chat",
             "--api-key", "sk-2025vLLM"]
    proc, port = start_subprocess(*flags) if port is None else _start_on(8000, flags)
    try:
        cmd = SEED_CURL.replace("localhost:8000", f"localhost:{port}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert body["object"] == "text_completion" and body["model"] == "meta-llama/Llama-2-7b-chat"
        assert body["choices"][0]["text"] == "病尿糖防预何如"
        nokey = subprocess.run(["bash", "-c", cmd.replace("sk-2025vLLM", "wrong") + " -w '%{http_code}'"],
                               capture_output=True, text=True, timeout=30)
        assert nokey.stdout.endswith("401")
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def _start_on(port: int, flags: list[str]):
    import server_harness

    real = server_harness.free_port
    server_harness.free_port = lambda: port
    try:
        return start_subprocess(*flags)
    finally:
        server_harness.free_port = real


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert any(l.startswith("ARG CUDA_IMAGE=nvidia/cuda:") for l in lines) or lines[0].startswith("FROM nvidia/cuda")
    assert any("pip install" in l and ".[${JAX_EXTRA}]" in l for l in lines)
    assert "ARG JAX_EXTRA=cuda13" in lines
    assert 'ENTRYPOINT ["python", "-m", "jaxserve.serve"]' in lines
    assert "EXPOSE 8000" in lines
    assert "JAXSERVE_HOST=0.0.0.0" in text  # bind all interfaces in the container, whatever args follow


@pytest.mark.slow
def test_legacy_openai_028_client(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    inst = subprocess.run([str(pip), "install", "--retries", "0", "--timeout", "10", "openai==0.28.1"],
                          capture_output=True, text=True, timeout=300)
    if inst.returncode != 0:
        pytest.skip(f"cannot install openai==0.28.1 (no PyPI?): {inst.stderr[-300:]}")
    proc, port = start_subprocess("--api-key", "sk-legacy", "--served-model-name", "meta-llama/Llama-2-7b-chat")
    script = textwrap.dedent(f"""
        import openai
        openai.api_base = "http://localhost:{port}/v1"
        openai.api_key = "sk-legacy"
        response = openai.Completion.create(model="meta-llama/Llama-2-7b-chat", prompt="写一篇量子计算科普文章",
                                            stream=True)
        print("STREAM", "".join(chunk["choices"][0]["text"] for chunk in response))
        r = openai.ChatCompletion.create(model="meta-llama/Llama-2-7b-chat", messages=[{{"role": "user", "content": "hi"}}])
        print("CHAT", r["choices"][0]["message"]["content"])
    """)
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "STREAM 章文普科算计子量篇一写" in out.stdout
        assert "CHAT >tnatsissa<ih>resu<" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=20)
