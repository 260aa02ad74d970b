"""OpenAI API behaviour through the official `openai` client and raw HTTP, against the mock engine
(outputs worked out by hand: a choice is the prompt reversed, choice i shifted by +i code points)."""
from __future__ import annotations

import httpx
import openai
import pytest

from mock_engine import MockEngine
from server_harness import ServerThread, parse_sse

MODEL = "mock-model"


@pytest.fixture(scope="module")
def server():
    with ServerThread(MockEngine(max_model_len=256), profile_dir="/tmp/jaxserve-test-profile") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_completion_basic(client):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=16)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == "olleh" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6  # 5 chars + EOS
    assert r.usage.total_tokens == 11


def test_completion_length_and_defaults(client):
    r = client.completions.create(model=MODEL, prompt="abcdefghijklmnopqrstuvwxyz")  # default max_tokens 16
    assert r.choices[0].text == "zyxwvutsrqponmlk" and r.choices[0].finish_reason == "length"


def test_completion_n_and_batch_prompts(client):
    r = client.completions.create(model=MODEL, prompt=["ab", "xyz"], n=2, max_tokens=8)
    texts = {c.index: c.text for c in r.choices}
    assert texts == {0: "ba", 1: "cb", 2: "zyx", 3: "{zy"}  # index = prompt * n + sample
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 3 + 3 + 4 + 4


def test_completion_token_id_prompts(client):
    r = client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=5)
    assert r.choices[0].text == "ih"
    r = client.completions.create(model=MODEL, prompt=[[97], [98, 99]], max_tokens=5)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == ["a", "cb"]


def test_completion_echo_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text == "abccb"
    lp = c.logprobs
    assert lp.tokens == ["a", "b", "c", "c", "b"]
    assert lp.token_logprobs == [None, -1.0, -1.0, -0.5, -0.5]
    assert lp.text_offset == [0, 1, 2, 3, 4]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[3] == {"c": -0.5, "d": -1.0}


def test_completion_stop_strings_and_ids(client, server):
    r = client.completions.create(model=MODEL, prompt="abcdef", max_tokens=10, stop=["dc"])
    assert r.choices[0].text == "fe" and r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == "dc"
    r = client.completions.create(model=MODEL, prompt="abcdef", max_tokens=10, stop="dc",
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == "fedc"
    r = client.completions.create(model=MODEL, prompt="abcdef", max_tokens=10,
                                  extra_body={"stop_token_ids": [ord("d")]})
    assert r.choices[0].text == "fe" and r.choices[0].stop_reason == ord("d")


def test_sampling_fields_pass_through(client, server):
    r = client.completions.create(model=MODEL, prompt="seeded", max_tokens=3, seed=1234, temperature=0.3,
                                  top_p=0.9, presence_penalty=0.5, frequency_penalty=0.25,
                                  logit_bias={"65": 5.0},
                                  extra_body={"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2,
                                              "min_tokens": 1, "ignore_eos": True})
    p = server.engine.params[r.id]
    assert (p.seed, p.temperature, p.top_p, p.top_k, p.min_p) == (1234, 0.3, 0.9, 7, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.25, 1.2)
    assert p.logit_bias == {65: 5.0} and p.min_tokens == 1 and p.ignore_eos and p.max_tokens == 3


def test_generation_defaults_apply_when_unset(server, client):
    server.engine.generation_defaults = {"temperature": 0.6, "top_p": 0.8}
    try:
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=2, top_p=0.5)
        p = server.engine.params[r.id]
        assert p.temperature == 0.6 and p.top_p == 0.5
    finally:
        server.engine.generation_defaults = {}


def test_completion_stream_raw_sse(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"X-Request-Id": "rid-1"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "rid-1"
        events = parse_sse(r.read().decode())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 8,
                                                         "total_tokens": 11}
    text = {0: "", 1: ""}
    finish = {}
    for ev in events[:-2]:
        assert ev["object"] == "text_completion" and ev["id"].startswith("cmpl-")
        (ch,) = ev["choices"]
        text[ch["index"]] += ch["text"]
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert text == {0: "cba", 1: "dcb"} and finish == {0: "stop", 1: "stop"}


def test_stream_holds_back_partial_stop_string(client):
    chunks = list(client.completions.create(model=MODEL, prompt="xxabcdef", max_tokens=20, stop=["dcX"],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "fedcbaxx"


def test_chat_basic_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=2)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == ">tnatsissa<ih>resu<"
    content = r.choices[0].logprobs.content
    assert content[0].token == ">" and content[0].logprob == -0.5 and content[0].bytes == [62]
    assert [t.token for t in content[0].top_logprobs] == [">", "?"]
    assert r.usage.prompt_tokens == len("<user>hi<assistant>")


def test_chat_content_parts_system_and_stream(client):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "ok"}]}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]
    text = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
    assert text == {0: ">tna", 1: "?uob"}
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_chat_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=3)
    assert r.choices[0].message.content == ">tn" and r.choices[0].finish_reason == "length"


def test_models_version_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = httpx.get(server.url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == 256 and raw["data"][0]["root"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_tokenize_detokenize(server):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "hé"}).json()
    assert r == {"count": 2, "max_model_len": 256, "tokens": [104, 233]}
    r = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert r["count"] == len("<user>x<assistant>")
    assert httpx.post(server.url + "/detokenize", json={"tokens": [104, 233]}).json() == {"prompt": "hé"}


def test_request_id_generated_when_absent(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert r.headers["x-request-id"] == r.json()["id"]


def test_profiler_endpoints(server):
    assert httpx.post(server.url + "/stop_profile").status_code == 400  # not started
    assert httpx.post(server.url + "/start_profile").status_code == 200
    assert httpx.post(server.url + "/start_profile").status_code == 400  # already running
    assert httpx.post(server.url + "/stop_profile").status_code == 200
    assert server.engine.profile_calls == ["start:/tmp/jaxserve-test-profile", "stop"]


def test_profiler_disabled_is_404():
    with ServerThread(MockEngine()) as s:
        r = httpx.post(s.url + "/start_profile")
        assert r.status_code == 404 and "--profile-dir" in r.json()["error"]["message"]


def test_engine_lifecycle_calls(server):
    assert server.engine.started


def test_mock_satisfies_engine_protocol():
    from jaxserve.engine_protocol import AsyncLLMEngineProtocol

    assert isinstance(MockEngine(), AsyncLLMEngineProtocol)


def test_chunk_encoder_writes_what_json_dumps_would():
    """Streamed chunks are encoded with their header done once; the text must be the dict's own JSON (key order,
    separators, non-ASCII kept as is)."""
    import json

    from jaxserve.server.common import ChunkEncoder
    header = {"id": "cmpl-1", "object": "text_completion", "created": 1764250000, "model": "m\u00e9"}
    choices = [{"index": 0, "text": "AI 的未来 \"q\"\n", "logprobs": None, "finish_reason": None, "stop_reason": None}]
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    enc = ChunkEncoder(header)
    dumps = lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":"))  # noqa: E731 (streaming.sse's)
    assert enc(choices) == dumps({**header, "choices": choices})
    assert enc([], usage=usage) == dumps({**header, "choices": [], "usage": usage})
    assert json.loads(enc(choices, usage=usage)) == {**header, "choices": choices, "usage": usage}
