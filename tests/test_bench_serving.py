"""scripts/bench_serving.py drives the mock server end to end and reports sane numbers."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from mock_engine import MockEngine
from server_harness import REPO, ServerThread

spec = importlib.util.spec_from_file_location("bench_serving", REPO / "scripts" / "bench_serving.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_serving"] = bench  # dataclasses look their module up while the class is built
spec.loader.exec_module(bench)


def test_sharegpt_like_lengths():
    samples = bench.sharegpt_like_dataset(np.random.default_rng(0), 5000, vocab=32000, offset=100)
    ins = np.array([len(s.prompt) for s in samples])
    outs = np.array([s.output_len for s in samples])
    assert ins.max() <= 1024 and ins.min() >= 4 and (ins + outs).max() <= 2048 and outs.min() >= 1
    assert 170 < ins.mean() < 210 and 150 < outs.mean() < 190  # lognormal means 200 / 180, pulled down by caps
    again = bench.sharegpt_like_dataset(np.random.default_rng(0), 5000, vocab=32000, offset=100)
    assert [s.prompt for s in again[:5]] == [s.prompt for s in samples[:5]]  # seeded


def test_bench_against_mock(tmp_path):
    with ServerThread(MockEngine(max_model_len=4096, token_delay=0.001)) as s:
        out = tmp_path / "r.json"
        summary = bench.main(["--base-url", s.url, "--dataset", "random", "--num-prompts", "24",
                              "--random-input-len", "32", "--random-output-len", "8", "--random-range-ratio", "0.5",
                              "--request-rate", "200", "--max-concurrency", "8", "--result-json", str(out),
                              "--plot", str(tmp_path / "r.png")])
        assert summary["completed"] == 24 and summary["failed"] == 0
        saved = json.loads(out.read_text())
        for k in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "request_throughput", "output_throughput"):
            assert saved[k] is not None and saved[k] > 0, k
        # ignore_eos + max_tokens: each request produced exactly its output length
        assert saved["total_output_tokens"] == round(saved["mean_output_len"] * 24)
        # the server's own view from /metrics: every request and every token gap it saw in the run
        assert saved["engine_mean_ttft_ms"] > 0 and saved["engine_mean_e2el_ms"] >= saved["engine_mean_ttft_ms"]
        assert saved["engine_mean_tpot_ms"] > 0
        # one per request, as the client's mean TPOT is (and not mixed up with the token-weighted histogram)
        assert saved["engine_mean_request_tpot_ms"] > 0
        summary = bench.main(["--base-url", s.url, "--dataset", "sharegpt-like", "--num-prompts", "8"])
        assert summary["completed"] == 8


def test_engine_means_from_histogram_deltas():
    """Hand-computed: 3 requests' TTFTs summing to 0.9 s after 1 earlier request (0.1 s) -> 0.3 s each; no
    /metrics before or after -> None."""
    before = {"ttft": (0.1, 1.0), "tpot": (0.5, 50.0)}
    after = {"ttft": (1.0, 4.0), "tpot": (2.5, 250.0), "e2el": (6.0, 3.0)}
    m = bench.engine_means(before, after)
    assert m["engine_mean_ttft_ms"] == pytest.approx(300.0) and m["engine_mean_tpot_ms"] == pytest.approx(10.0)
    assert m["engine_mean_e2el_ms"] == pytest.approx(2000.0) and m["engine_mean_queue_ms"] is None
    assert all(v is None for v in bench.engine_means(None, None).values())


def test_client_processes_share_the_prompts(tmp_path):
    """--client-processes 2: every prompt is sent once (outputs add up to the dataset's lengths), from two
    processes that start together, and each process's CPU share is reported."""
    with ServerThread(MockEngine(max_model_len=4096, token_delay=0.001)) as s:
        args = ["--base-url", s.url, "--dataset", "random", "--num-prompts", "10", "--random-input-len", "16",
                "--random-output-len", "6", "--random-range-ratio", "0.5", "--seed", "3"]
        one = bench.main(args)
        two = bench.main(args + ["--client-processes", "2"])
        capped = bench.main(args + ["--client-processes", "20", "--max-concurrency", "3"])  # 3 processes, 1 each
    want = sum(x.output_len for x in bench.random_dataset(np.random.default_rng(3), 10, 16, 6, 0.5, 32000, 100))
    for summary in (one, two, capped):
        assert summary["completed"] == 10 and summary["failed"] == 0
        assert summary["total_output_tokens"] == want
        assert 0 < summary["client_cpu_busy"] < 1.5
    assert two["duration_s"] < 30
