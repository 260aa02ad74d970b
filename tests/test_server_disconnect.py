"""A client that goes away aborts its engine request at once and its KV blocks come back (read through
/metrics); plus a load test: 200 concurrent streams, 30% of them hanging up at random."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from mock_engine import MockEngine
from server_harness import ServerThread, metric_value, parse_sse, wait_for


def kv_usage(server) -> float:
    return metric_value(httpx.get(server.url + "/metrics").text, "jaxserve:kv_cache_usage_perc")


def test_disconnect_mid_stream_aborts_and_frees_blocks():
    engine = MockEngine(token_delay=0.05)
    with ServerThread(engine) as s:
        body = {"prompt": "abcdefgh", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert kv_usage(s) > 0
            rid = next(iter(engine.live))
        # the response is closed: the server must notice and abort well before the 10 s the request would take
        assert wait_for(lambda: rid in engine.aborted, timeout=2)
        assert kv_usage(s) == 0.0 and not engine.live


def test_disconnect_non_streaming_aborts():
    engine = MockEngine(token_delay=0.05)
    with ServerThread(engine) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 200, "ignore_eos": True},
                       timeout=0.3)
        assert wait_for(lambda: len(engine.aborted) == 1, timeout=2)
        assert kv_usage(s) == 0.0


def test_disconnect_while_waiting_leaves_queue():
    engine = MockEngine(token_delay=0.05, max_num_seqs=1)
    with ServerThread(engine) as s, httpx.Client() as c:
        busy = {"prompt": "abc", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with c.stream("POST", s.url + "/v1/completions", json=busy) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)
            with pytest.raises(httpx.ReadTimeout):  # queued behind the first, then gone
                httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=0.3)
            assert wait_for(lambda: engine.num_waiting == 0, timeout=2)
        assert wait_for(lambda: not engine.live, timeout=2)
        assert kv_usage(s) == 0.0


def test_load_200_streams_30pct_disconnect():
    """< 2 min: every client that read to the end got a well-formed stream; all blocks come back."""
    engine = MockEngine(token_delay=0.01, max_num_seqs=64)
    rng = random.Random(0)
    n_clients, max_tokens = 200, 12

    async def one(client: httpx.AsyncClient, url: str, i: int, leave_after: int | None) -> str:
        prompt = f"client-{i:03d}-abcdefghijkl"
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            if leave_after is not None:
                seen = 0
                async for _ in r.aiter_lines():
                    seen += 1
                    if seen >= leave_after:
                        return "left"
                return "left"
            raw = (await r.aread()).decode()
        events = parse_sse(raw)
        assert events[-1] == "[DONE]"
        assert events[-2]["usage"]["completion_tokens"] == max_tokens
        text = "".join(e["choices"][0]["text"] for e in events[:-2])
        assert text == prompt[::-1][:max_tokens]
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        return "done"

    async def main(url: str) -> list:
        limits = httpx.Limits(max_connections=n_clients + 10, max_keepalive_connections=n_clients + 10)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            tasks = [one(client, url, i, rng.randint(1, 2 * max_tokens) if rng.random() < 0.3 else None)
                     for i in range(n_clients)]
            return await asyncio.gather(*tasks)

    t0 = time.monotonic()
    with ServerThread(engine) as s:
        results = asyncio.run(main(s.url + "/v1/completions"))
        assert results.count("done") >= n_clients * 0.6
        assert wait_for(lambda: not engine.live and engine.num_waiting == 0, timeout=10)
        assert kv_usage(s) == 0.0
        assert httpx.get(s.url + "/health").status_code == 200
    assert time.monotonic() - t0 < 120
