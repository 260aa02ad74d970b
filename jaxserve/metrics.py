"""Prometheus metrics (vLLM's names, prefixed `jaxserve:`) and the periodic stats log line.

Two sources, one private CollectorRegistry (nothing global, so tests can build many apps):
- `EngineCollector` reads `engine.stats()` at scrape time: the request gauges, KV usage, token and
  preemption counters, prefix-cache counters, the per-step `iteration_tokens_total` histogram, the
  `cache_config_info` info metric, and device utilization/memory from NVML. The NVML metrics exist
  only when pynvml (nvidia-ml-py) imports and reports at least one GPU: absent, never faked.
- per-request histograms (TTFT, inter-token latency, queue time, e2e latency; vLLM v1's per-request time per
  output token, prefill, decode and inference times, prompt and generation token counts) and
  `request_success_total{finished_reason}`, fed by an engine listener called once per finished
  request with its RequestOutput.metrics (monotonic timestamps). The engine reports per-request
  first/last token times, not every token's, so inter-token latency is observed as the request's
  mean gap, once per gap ((last - first) / (tokens - 1), tokens - 1 times).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)

from jaxserve.engine_protocol import ITERATION_TOKENS_BUCKETS
from jaxserve.outputs import RequestOutput

logger = logging.getLogger("jaxserve.metrics")
P = "jaxserve:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def buckets_1_2_5(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including the first value >= limit (token-count buckets)."""
    out, base = [], 1
    while True:
        for m in (1, 2, 5):
            out.append(m * base)
            if m * base >= limit:
                return tuple(out)
        base *= 10


class _NVML:
    """GPU utilization (percent) and memory in use (bytes) per device, or nothing without NVML."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver, or no GPU: the metrics are absent
            self.handles = []

    def collect(self) -> list:
        if not self.handles:
            return []
        util = GaugeMetricFamily(P + "gpu_utilization", "GPU utilization in percent (NVML, last sample period).",
                                 labels=["gpu"])
        mem = GaugeMetricFamily(P + "gpu_memory_used_bytes", "GPU memory in use, bytes (NVML).", labels=["gpu"])
        for i, h in enumerate(self.handles):
            try:
                util.add_metric([str(i)], float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu))
                mem.add_metric([str(i)], float(self.nvml.nvmlDeviceGetMemoryInfo(h).used))
            except Exception:
                continue
        return [util, mem]


class EngineCollector:
    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.nvml = _NVML()

    def collect(self):
        s = self.engine.stats()
        m = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("num_requests_swapped", "Preempted requests whose KV blocks are in host memory.", s.num_swapped)
        yield gauge("kv_cache_usage_perc", "KV-cache usage, 0..1 of allocatable blocks.", s.kv_cache_usage)
        yield counter("num_preemptions", "Preemptions since start.", s.num_preemptions_total)
        yield counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded).", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries_total)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits_total)
        h = HistogramMetricFamily(P + "iteration_tokens_total", "Tokens scheduled per engine step.",
                                  labels=["model_name"])
        cum, buckets = 0, []
        bounds = [*(str(float(b)) for b in ITERATION_TOKENS_BUCKETS), "+Inf"]
        for le, count in zip(bounds, s.iteration_tokens.counts):
            cum += count
            buckets.append((le, cum))
        h.add_metric(m, buckets, sum_value=s.iteration_tokens.total)
        yield h
        if s.cache_config:
            info = InfoMetricFamily(P + "cache_config", "KV cache configuration.")
            info.add_metric([], {k: str(v) for k, v in s.cache_config.items()})
            yield info
        yield from self.nvml.collect()


class ServerMetrics:
    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        labels, r = ["model_name"], self.registry

        def hist(name: str, doc: str, buckets) -> Any:
            return Histogram(P + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        # vLLM v1's per-request histograms: one observation per finished request.
        self.req_tpot = hist("request_time_per_output_token_seconds",
                             "Per request: (last token - first token) / (output tokens - 1).", ITL_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token.", LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS)
        self.inference = hist("request_inference_time_seconds", "First scheduled to finished.", LATENCY_BUCKETS)
        mc = getattr(engine, "model_config", None)
        tok_buckets = buckets_1_2_5(getattr(mc, "max_model_len", None) or 1 << 20)
        self.prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per finished request.", tok_buckets)
        self.gen_tokens = hist("request_generation_tokens", "Output tokens per finished request (all its samples).",
                               tok_buckets)
        self.model_name = model_name
        r.register(EngineCollector(engine, model_name))
        engine.add_listener(self.on_request_finished)

    def on_request_finished(self, out: RequestOutput) -> None:
        """Engine listener (any thread); prometheus_client objects are thread-safe."""
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason), None) or "abort"
        self.success.labels(self.model_name, reason).inc()
        t = out.metrics
        if t is None:
            return
        if t.first_token_time is not None:
            self.ttft.observe(max(0.0, t.first_token_time - t.arrival_time))
        if t.first_scheduled_time is not None:
            self.queue.observe(max(0.0, t.first_scheduled_time - t.arrival_time))
        if t.finished_time is not None:
            self.e2e.observe(max(0.0, t.finished_time - t.arrival_time))
        if t.first_scheduled_time is not None and t.first_token_time is not None:
            self.prefill.observe(max(0.0, t.first_token_time - t.first_scheduled_time))
        if t.first_scheduled_time is not None and t.finished_time is not None:
            self.inference.observe(max(0.0, t.finished_time - t.first_scheduled_time))
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.gen_tokens.observe(sum(len(c.token_ids) for c in out.outputs))
        num = max((len(c.token_ids) for c in out.outputs), default=0)
        if t.first_token_time is not None and t.last_token_time is not None:
            self.decode.observe(max(0.0, t.last_token_time - t.first_token_time))
            if num > 1:
                gap = max(0.0, (t.last_token_time - t.first_token_time) / (num - 1))
                self.req_tpot.observe(gap)
                for _ in range(num - 1):
                    self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def log_stats_loop(engine: Any, interval: float) -> None:
    """vLLM's periodic line: throughput since the last line, batch sizes, KV usage, prefix hit rate.
    Fully idle intervals (no tokens, nothing running or waiting) are skipped to keep logs quiet."""
    prev, t_prev = engine.stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval)
        s, now = engine.stats(), time.monotonic()
        dt = max(now - t_prev, 1e-9)
        d_prompt = s.prompt_tokens_total - prev.prompt_tokens_total
        d_gen = s.generation_tokens_total - prev.generation_tokens_total
        d_q = s.prefix_cache_queries_total - prev.prefix_cache_queries_total
        d_hit = s.prefix_cache_hits_total - prev.prefix_cache_hits_total
        if d_prompt or d_gen or s.num_running or s.num_waiting:
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Swapped: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, "
                        "Prefix cache hit rate: %.1f%%", d_prompt / dt, d_gen / dt, s.num_running,
                        s.num_swapped, s.num_waiting, 100 * s.kv_cache_usage, 100 * d_hit / d_q if d_q else 0.0)
        prev, t_prev = s, now
