"""Online serving benchmark against a running OpenAI-compatible server (after vLLM's benchmark_serving.py).

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --dataset sharegpt-like \
        --num-prompts 500 --request-rate 8 --max-concurrency 64 --result-json out/serve.json --plot out/serve.png

Prompts are token ids sent to /v1/completions (so a --load-format dummy model can be driven without a
tokenizer or a text corpus), with ignore_eos=True and max_tokens = the chosen output length, streamed
with stream_options.include_usage so every request's output length is exact.

Datasets (all seeded with --seed):
- random: input length uniform in [L*(1-r), L] (--random-input-len L, --random-range-ratio r), output
  likewise from --random-output-len; token ids uniform in [--token-offset, --vocab-size).
- sharegpt-like: a synthetic stand-in for ShareGPT's length distribution, no data download: lognormal
  lengths with means 200 (input) / 180 (output), inputs clipped to [4, 1024], input + output to 2048
  (scripts/common.py, shared with bench_throughput.py); the realized means are printed and saved.

Arrivals: --request-rate inf sends everything at once; a finite rate r draws exponential gaps of mean
1/r seconds (a Poisson process). --max-concurrency caps requests in flight. --client-processes N splits the
prompts over N client processes that start together (the summary's client_cpu_busy says whether one is enough).

Reported (mean, median, p99; milliseconds): TTFT (send -> first token), TPOT ((latency - TTFT) /
(output tokens - 1)), ITL (gap between consecutive streamed chunks), E2E latency; request throughput,
output token throughput and total token throughput over the benchmark's wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sample, random_dataset, sharegpt_like_dataset  # noqa: E402  (scripts/common.py)


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def send_one(client: httpx.AsyncClient, url: str, model: str | None, s: Sample, headers: dict) -> Result:
    body = {"prompt": s.prompt, "max_tokens": s.output_len, "ignore_eos": True, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    res = Result(prompt_len=len(s.prompt))
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.error = ev["error"]["message"]
                    return res
                if ev.get("usage"):
                    res.output_len = ev["usage"]["completion_tokens"]
                # A chunk carries a token when it has text, or (token-id engines: empty text) is not the
                # finish-only chunk.
                ch = ev.get("choices")
                if ch and (ch[0].get("text") or ch[0].get("finish_reason") is None):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - t0
        res.output_len = res.output_len or chunks
        res.ok = True
    except (httpx.HTTPError, ValueError) as e:
        res.error = repr(e)
    return res


async def run(args: argparse.Namespace, samples: list[Sample], start_at: float | None = None, index: int = 0
              ) -> tuple[list[Result], float, float]:
    """Send the samples; (results, wall seconds, CPU seconds of this process meanwhile). start_at (time.time()):
    fire then, after the warm-up (the client processes of --client-processes start together), and measure the wall
    time from it. index: which client process this is (its arrival gaps)."""
    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sem = asyncio.Semaphore(args.max_concurrency or len(samples))
    # Client process `index`'s own arrival gaps; process 0 (and a lone client) draws what one client always drew.
    rng = np.random.default_rng(args.seed + 1 if index == 0 else [args.seed + 1, index])
    limits = httpx.Limits(max_connections=args.max_concurrency or len(samples) + 8)

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        async def guarded(s: Sample) -> Result:
            async with sem:
                return await send_one(client, url, args.model, s, headers)

        # one uncounted warm-up request
        await send_one(client, url, args.model, Sample(samples[0].prompt[:16], 4), headers)
        tasks = []
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        start, cpu0 = time.perf_counter(), time.process_time()
        for s in samples:
            tasks.append(asyncio.create_task(guarded(s)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu0
        if start_at is not None:
            return results, time.time() - start_at, cpu
        return results, time.perf_counter() - start, cpu


def _client_process(args: argparse.Namespace, samples: list[Sample], start_at: float, index: int, conn) -> None:
    conn.send(asyncio.run(run(args, samples, start_at, index)))
    conn.close()


def run_processes(args: argparse.Namespace, samples: list[Sample]) -> tuple[list[Result], float, float]:
    """--client-processes N: sample i goes to process i % N, each its own event loop and connections, all
    firing at one start time; (results, wall from that start to the last finish, mean busy share of a process).
    A finite --request-rate r becomes r / N per process (the union of N Poisson processes of rate r / N is one
    of rate r, each process drawing its own gaps); --max-concurrency c is shared out (c // N, plus one for the
    first c % N processes). N is capped by the prompts and by c."""
    import multiprocessing as mp

    n = min(args.client_processes, len(samples), args.max_concurrency or len(samples))
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0 + 0.5 * n  # spawning, imports and the warm-up requests happen before it
    procs, conns = [], []
    for i in range(n):
        r, w = ctx.Pipe(duplex=False)
        c = args.max_concurrency
        sub = argparse.Namespace(**{**vars(args), "request_rate": args.request_rate / n,
                                    "max_concurrency": c // n + (i < c % n) if c else None})
        p = ctx.Process(target=_client_process, args=(sub, samples[i::n], start_at, i, w), daemon=True)
        p.start()
        w.close()
        procs.append(p)
        conns.append(r)
    results, walls, busy = [], [], []
    for p, c in zip(procs, conns):
        res, wall, cpu = c.recv()
        p.join()
        results += res
        walls.append(wall)
        busy.append(cpu / wall if wall > 0 else 0.0)
    return results, max(walls), float(np.mean(busy))


# The server's own view, from its Prometheus histograms (jaxserve: and vllm: names alike): TTFT from the engine's
# arrival, the token gaps, the whole request, the queue. The first name found is taken.
ENGINE_HISTOGRAMS = {"ttft": ("time_to_first_token_seconds",),
                     "tpot": ("inter_token_latency_seconds", "time_per_output_token_seconds"),
                     "request_tpot": ("request_time_per_output_token_seconds",),
                     "e2el": ("e2e_request_latency_seconds",), "queue": ("request_queue_time_seconds",)}


def scrape_engine_histograms(base_url: str, headers: dict) -> dict[str, tuple[float, float]] | None:
    """{key: (sum, count)} of ENGINE_HISTOGRAMS from the server's /metrics, summed over label sets; None when the
    server has no /metrics (or no such histograms)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        r = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers, timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    found: dict[str, dict[str, list[float]]] = {}
    for fam in text_string_to_metric_families(r.text):
        base = fam.name.rsplit(":", 1)[-1]  # jaxserve:/vllm: prefixes
        for key, names in ENGINE_HISTOGRAMS.items():
            suffix = next((n for n in names if base == n), None)
            if fam.type == "histogram" and suffix is not None:
                acc = found.setdefault(key, {}).setdefault(suffix, [0.0, 0.0])
                for sample in fam.samples:
                    if sample.name.endswith("_sum"):
                        acc[0] += sample.value
                    elif sample.name.endswith("_count"):
                        acc[1] += sample.value
    out = {}
    for key, names in ENGINE_HISTOGRAMS.items():
        by_name = found.get(key, {})
        name = next((n for n in names if n in by_name), None)
        if name is not None:
            out[key] = tuple(by_name[name])
    return out or None


def engine_means(before: dict | None, after: dict | None) -> dict:
    """engine_mean_{ttft,tpot,request_tpot,e2el,queue}_ms over the run (the warm-up requests included): histogram
    sums and counts after minus before. tpot is token-weighted (each request's mean gap once per gap);
    request_tpot is one value per request, the same statistic as the client's mean_tpot_ms."""
    out = {}
    for key in ENGINE_HISTOGRAMS:
        b, a = (before or {}).get(key, (0.0, 0.0)), (after or {}).get(key)
        n = a[1] - b[1] if a else 0
        out[f"engine_mean_{key}_ms"] = (a[0] - b[0]) / n * 1000.0 if n > 0 else None
    return out


def summarize(results: list[Result], wall: float, args: argparse.Namespace, samples: list[Sample]) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: np.asarray(xs, dtype=float) * 1000.0  # noqa: E731

    def stats(name: str, xs) -> dict:
        xs = ms(xs)
        if xs.size == 0:
            return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
        return {f"mean_{name}_ms": float(xs.mean()), f"median_{name}_ms": float(np.median(xs)),
                f"p99_{name}_ms": float(np.percentile(xs, 99))}

    tpot = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary = {
        "dataset": args.dataset, "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency, "duration_s": wall,
        "mean_input_len": float(np.mean([len(s.prompt) for s in samples])),
        "mean_output_len": float(np.mean([s.output_len for s in samples])),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "total_token_throughput": (in_tokens + out_tokens) / wall,
        **stats("ttft", [r.ttft for r in ok]), **stats("tpot", tpot),
        **stats("itl", [x for r in ok for x in r.itl]), **stats("e2el", [r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    return summary


def plot(results: list[Result], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    ok = [r for r in results if r.ok]
    series = {"TTFT (ms)": [r.ttft * 1e3 for r in ok],
              "TPOT (ms)": [(r.latency - r.ttft) / (r.output_len - 1) * 1e3 for r in ok if r.output_len > 1],
              "ITL (ms)": [x * 1e3 for r in ok for x in r.itl], "E2E latency (s)": [r.latency for r in ok]}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (name, xs) in zip(axes, series.items()):
        ax.hist(xs, bins=50)
        ax.set_title(name)
        ax.set_ylabel("requests" if "ITL" not in name else "token gaps")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to send (default: none; the server's own)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "sharegpt-like"], default="random")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--token-offset", type=int, default=100, help="lowest token id drawn (skips special ids)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client-processes", type=int, default=1,
                   help="client processes sharing the prompts (one Python client parsing every SSE chunk can be "
                        "the bottleneck at thousands of tokens/s: see client_cpu_busy in the summary)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--result-json", default=None)
    p.add_argument("--plot", default=None, help="PNG of the latency distributions (needs matplotlib)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.dataset == "random":
        samples = random_dataset(rng, args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, args.vocab_size, args.token_offset)
    else:
        samples = sharegpt_like_dataset(rng, args.num_prompts, args.vocab_size, args.token_offset)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    before = scrape_engine_histograms(args.base_url, headers)
    if args.client_processes > 1:
        results, wall, busy = run_processes(args, samples)
    else:
        results, wall, cpu = asyncio.run(run(args, samples))
        busy = cpu / wall if wall > 0 else 0.0
    summary = summarize(results, wall, args, samples)
    # The server's own means beside the client's: a gap between them is time spent outside the engine (HTTP, the
    # front-end's event loop, the client).
    summary.update(engine_means(before, scrape_engine_histograms(args.base_url, headers) if before else None))
    # A client process parses every SSE chunk it receives in Python: near 1.0 (busy all the time) the client, not
    # the server, sets the pace; then add --client-processes.
    summary["client_cpu_busy"] = busy
    for k, v in summary.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps({**summary, "args": vars(args)}, indent=2, default=str))
    if args.plot:
        summary["plot"] = plot(results, args.plot)
    return summary


if __name__ == "__main__":
    main()
