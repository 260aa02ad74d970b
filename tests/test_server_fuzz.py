"""Hypothesis fuzz of the generation endpoints: a few hundred bodies mixing valid and invalid fields,
types and JSON shapes. Never a 5xx; every 4xx carries the OpenAI error object; /health stays 200."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mock_engine import MockEngine
from server_harness import ServerThread, parse_sse

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=8)
small_int = st.one_of(st.integers(-3, 40), anything)
prob = st.one_of(st.floats(-1, 3, allow_nan=False), anything)
prompt = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                   st.lists(st.integers(-5, 0x110005), max_size=10),
                   st.lists(st.lists(st.integers(0, 200), max_size=5), max_size=3), anything)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bad"]),
                                 "content": st.one_of(st.text(max_size=30), anything)})
common = {
    "model": st.one_of(st.just("mock-model"), st.text(max_size=5)), "max_tokens": small_int, "n": small_int,
    "temperature": prob, "top_p": prob, "top_k": small_int, "min_p": prob, "seed": st.one_of(st.integers(), anything),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), anything),
    "stop_token_ids": anything, "stream": st.booleans(),
    "stream_options": st.one_of(st.just({"include_usage": True}), anything), "presence_penalty": prob,
    "frequency_penalty": prob, "repetition_penalty": prob, "logit_bias": anything, "ignore_eos": st.booleans(),
    "min_tokens": small_int, "response_format": anything, "best_of": small_int, "tools": anything,
    "unknown_field": anything,
}
completion_body = st.fixed_dictionaries({"prompt": prompt},
                                        optional={**common, "echo": st.booleans(), "logprobs": small_int,
                                                  "suffix": anything})
chat_body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), anything)},
                                  optional={**common, "logprobs": st.booleans(), "top_logprobs": small_int})


@pytest.fixture(scope="module")
def server():
    with ServerThread(MockEngine(max_model_len=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:  # one client: building one per example costs an SSL context each
        yield c


def check(server, client, path, body):
    r = client.post(server.url + path, content=json.dumps(body))
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1]), events
    else:
        assert r.json()["choices"]


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(server, client, body):
    check(server, client, "/v1/completions", body)


@FUZZ
@given(body=chat_body)
def test_fuzz_chat(server, client, body):
    check(server, client, "/v1/chat/completions", body)


def test_health_after_fuzz(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert not server.engine.live and server.engine.num_waiting == 0
