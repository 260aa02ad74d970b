"""/metrics parses with prometheus_client's parser and carries vLLM's names under `jaxserve:`."""
from __future__ import annotations

import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.engine_protocol import EngineStats, TokenHistogram
from jaxserve.metrics import log_stats_loop
from mock_engine import MockEngine
from server_harness import ServerThread, metric_value


def test_metrics_names_and_values():
    engine = MockEngine()
    with ServerThread(engine) as s:
        for prompt in ("abc", "hello"):
            assert httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 16}).status_code == 200
        httpx.post(s.url + "/v1/completions", json={"prompt": "abcdef", "max_tokens": 2})
        text = httpx.get(s.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "inter_token_latency_seconds",
                 "request_queue_time_seconds", "iteration_tokens_total", "request_time_per_output_token_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert families["jaxserve:" + name].type == "histogram", name
    for name in ("num_requests_waiting", "num_requests_running", "num_requests_swapped", "kv_cache_usage_perc"):
        assert families["jaxserve:" + name].type == "gauge", name
    for name in ("generation_tokens", "prompt_tokens", "num_preemptions", "prefix_cache_queries",
                 "prefix_cache_hits", "request_success"):
        assert families["jaxserve:" + name].type == "counter", name
    assert families["jaxserve:cache_config_info"].type == "gauge"  # info metrics are gauges in text format
    assert metric_value(text, "jaxserve:cache_config_info", block_size="16", num_gpu_blocks="1024") == 1.0
    # no NVML in the test environment: the GPU metrics are absent, not faked
    assert "jaxserve:gpu_utilization" not in families and "jaxserve:gpu_memory_used_bytes" not in families
    assert metric_value(text, "jaxserve:prompt_tokens_total") == 3 + 5 + 6
    assert metric_value(text, "jaxserve:generation_tokens_total") == 4 + 6 + 2
    assert metric_value(text, "jaxserve:request_success_total", finished_reason="stop") == 2
    assert metric_value(text, "jaxserve:request_success_total", finished_reason="length") == 1
    assert metric_value(text, "jaxserve:e2e_request_latency_seconds_count", model_name="mock-model") == 3
    assert metric_value(text, "jaxserve:inter_token_latency_seconds_count") == 3 + 5 + 1
    assert metric_value(text, "jaxserve:iteration_tokens_total_count") == 12  # one step per token (n=1)
    assert metric_value(text, "jaxserve:iteration_tokens_total_bucket", le="1.0") == 12
    assert metric_value(text, "jaxserve:num_requests_running") == 0


def test_token_histogram_buckets():
    h = TokenHistogram()
    for n in (1, 2, 8, 9, 100000):
        h.observe(n)
    assert h.counts[0] == 1 and h.counts[1] == 2 and h.counts[2] == 1 and h.counts[-1] == 1
    assert h.total == 100020


async def _run_log_loop(engine):
    import asyncio

    task = asyncio.create_task(log_stats_loop(engine, 0.05))
    await asyncio.sleep(0.02)
    engine.s = EngineStats(num_running=2, num_waiting=1, kv_cache_usage=0.5, prompt_tokens_total=100,
                           generation_tokens_total=50, prefix_cache_queries_total=100, prefix_cache_hits_total=25)
    await asyncio.sleep(0.06)
    task.cancel()


def test_stats_log_line(caplog):
    import asyncio

    class E:
        s = EngineStats()

        def stats(self):
            return self.s

    with caplog.at_level(logging.INFO, logger="jaxserve.metrics"):
        asyncio.run(_run_log_loop(E()))
    (line,) = [r.getMessage() for r in caplog.records if "throughput" in r.getMessage()]
    assert "Running: 2 reqs" in line and "Waiting: 1 reqs" in line and "GPU KV cache usage: 50.0%" in line
    assert "Prefix cache hit rate: 25.0%" in line


def test_per_request_histograms_from_hand_timed_outputs():
    """vLLM v1's per-request histograms, fed two finished requests with hand-set timestamps."""
    import pytest

    from jaxserve.metrics import ServerMetrics, buckets_1_2_5
    from jaxserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

    class Engine:
        class model_config:
            max_model_len = 300

        def add_listener(self, fn):
            self.fn = fn

        def stats(self):
            return EngineStats()

    assert buckets_1_2_5(300) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    eng = Engine()
    m = ServerMetrics(eng, "m")
    # request a: arrived 10.0, scheduled 10.5, first token 11.0, 5 tokens, last token 13.0, finished 13.0
    a = RequestOutput("a", None, [1, 2, 3], None, [CompletionOutput(0, "", [7] * 5, finish_reason="length")], True,
                      RequestMetrics(10.0, 10.5, 11.0, 13.0, 13.0))
    # request b: n=2 samples of 3 and 1 tokens; first token 2.25 after scheduling at 0.0, last at 3.25
    b = RequestOutput("b", None, [4] * 40, None, [CompletionOutput(0, "", [7] * 3, finish_reason="stop"),
                                                   CompletionOutput(1, "", [8], finish_reason="stop")], True,
                      RequestMetrics(0.0, 0.0, 2.25, 3.25, 3.5))
    eng.fn(a)
    eng.fn(b)
    text = m.render().decode()
    v = lambda name, **kw: metric_value(text, "jaxserve:" + name, **kw)  # noqa: E731
    assert v("request_time_per_output_token_seconds_count") == 2
    assert v("request_time_per_output_token_seconds_sum") == pytest.approx(2.0 / 4 + 1.0 / 2)
    assert v("request_prefill_time_seconds_sum") == pytest.approx(0.5 + 2.25)
    assert v("request_decode_time_seconds_sum") == pytest.approx(2.0 + 1.0)
    assert v("request_inference_time_seconds_sum") == pytest.approx(2.5 + 3.5)
    assert v("request_prompt_tokens_sum") == 3 + 40 and v("request_prompt_tokens_bucket", le="5.0") == 1
    assert v("request_generation_tokens_sum") == 5 + 4 and v("request_generation_tokens_bucket", le="5.0") == 2
    assert v("request_generation_tokens_bucket", le="500.0") == 2
    # the token-weighted inter-token histogram: one observation per gap (4 for a, 2 for b's longest sample)
    assert v("inter_token_latency_seconds_count") == 4 + 2
    assert v("inter_token_latency_seconds_sum") == pytest.approx(2.0 + 1.0)
