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
                 "request_queue_time_seconds", "iteration_tokens_total"):
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
