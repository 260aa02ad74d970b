"""scripts/bench_serving.py drives the mock server end to end and reports sane numbers."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np

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
        summary = bench.main(["--base-url", s.url, "--dataset", "sharegpt-like", "--num-prompts", "8"])
        assert summary["completed"] == 8


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
