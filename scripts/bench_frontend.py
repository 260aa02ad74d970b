"""The HTTP front-end's own cost: a real server process with the mock engine, the burst sent at it, CPU counted.

With the engine in its own process (mp_engine.py), the server process does HTTP, JSON, SSE and the requests'
bookkeeping. This measures that alone: `python -m jaxserve.serve --engine-factory mock_engine:make` (tests/
mock_engine.py: tokens as fast as the event loop takes them, no device), bench_serving.py's burst against it,
and the server process's CPU time (user + system, from /proc) over the burst: ms per request and us per streamed
token. `--http h11|httptools` and `--loop asyncio|uvloop` pick uvicorn's implementations (auto: what is installed).
`--step-ms S` replaces the mock's free-running tokens with the real engine's rhythm: every S ms one token for every
running request, delivered to each stream's queue whether or not its client kept up (a stream that fell behind
merges what waits, as AsyncLLMEngine.generate does). Then the client's median TPOT against S says whether the
front-end keeps pace with steps of S ms at that many streams, and the CPU per step what it costs.
On a 2-core machine the client competes for the cores; compare rows of one run, alternated.

    python scripts/bench_frontend.py --rounds 3 --variants h11/asyncio httptools/uvloop
    python scripts/bench_frontend.py --step-ms 12 --output-len 200       # 320 streams in lockstep, 12 ms steps
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """import sys, runpy, uvicorn
http, loop = sys.argv.pop(1), sys.argv.pop(1)
init = uvicorn.Config.__init__
def patched(self, *a, **k):
    k.setdefault("http", http); k.setdefault("loop", loop); init(self, *a, **k)
uvicorn.Config.__init__ = patched
sys.argv[0] = "jaxserve.serve"
runpy.run_module("jaxserve.serve", run_name="__main__")
"""


def make_stepped(args=None):
    """--engine-factory bench_frontend:make_stepped: the mock engine with tokens in lockstep steps
    (BENCH_FRONTEND_STEP_MS, default 12), one per running request per step."""
    import asyncio

    import mock_engine
    from jaxserve.outputs import RequestMetrics, RequestOutput

    step_s = float(os.environ.get("BENCH_FRONTEND_STEP_MS", "12")) / 1e3

    class Stepped(mock_engine.MockEngine):
        steps = 0
        ticker = None

        async def generate(self, prompt, params, request_id):
            ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
            max_tokens = self._check(ids, params)
            q: asyncio.Queue = asyncio.Queue()
            choice = mock_engine._Choice(0, ids, params, self.tokenizer)
            metrics = RequestMetrics(arrival_time=time.monotonic())
            self.live[request_id] = (q, choice, max_tokens, ids, metrics)
            if self.ticker is None or self.ticker.done():  # one clock, however requests come and go
                self.ticker = asyncio.get_running_loop().create_task(self._tick())
            try:
                while True:
                    out = await q.get()
                    while not out.finished and not q.empty():  # fell behind: the newest output has it all
                        out = q.get_nowait()
                    yield out
                    if out.finished:
                        return
            finally:
                self.live.pop(request_id, None)

        async def _tick(self):
            loop = asyncio.get_running_loop()
            while self.live:
                t0 = loop.time()
                Stepped.steps += 1
                for rid, (q, c, max_tokens, ids, metrics) in list(self.live.items()):
                    k = len(c.out.token_ids)
                    c.step(k, last=k == max_tokens - 1)
                    o = c.out
                    snap = type(o)(o.index, o.text, list(o.token_ids), o.cumulative_logprob, None, o.finish_reason,
                                   o.stop_reason)  # a new cumulative output per step, as the front-end decoder makes
                    now = time.monotonic()
                    metrics.first_token_time = metrics.first_token_time or now
                    metrics.last_token_time = now
                    out = RequestOutput(rid, None, ids, None, [snap], o.finish_reason is not None, metrics)
                    q.put_nowait(out)
                    self.gen_tokens += 1
                    if out.finished:  # the server's /metrics histograms: the engine's own TTFT and token gaps
                        metrics.finished_time = now
                        for fn in self.listeners:
                            fn(out)
                await asyncio.sleep(max(0.0, step_s - (loop.time() - t0)))

    return Stepped(**({} if args is None else dict(served_model_name=args.served_model_name or "m",
                                                     max_model_len=args.max_model_len or 4096,
                                                     max_num_seqs=args.max_num_seqs or 1024,
                                                     num_blocks=args.num_gpu_blocks_override or 10 ** 6)))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(variant: str, port: int, bench_args: list[str], out: Path, step_ms: float | None) -> dict:
    http, loop = variant.split("/")
    path = [str(REPO / "tests"), str(REPO / "scripts"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "BENCH_FRONTEND_STEP_MS": str(step_ms or 0)}
    factory = "bench_frontend:make_stepped" if step_ms else "mock_engine:make"
    server = subprocess.Popen([sys.executable, "-c", LAUNCH, http, loop, "--engine-factory", factory,
                               "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", "1024",
                               "--num-gpu-blocks-override", "1000000", "--served-model-name", "m",
                               "--disable-log-requests"],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c0 = cpu_s(server.pid)
        res = out / f"{variant.replace('/', '_')}.json"
        subprocess.run([sys.executable, str(REPO / "scripts" / "bench_serving.py"), "--base-url",
                        f"http://127.0.0.1:{port}", "--model", "m", "--result-json", str(res), *bench_args],
                       check=True, capture_output=True, cwd=REPO)
        busy = cpu_s(server.pid) - c0
    finally:
        server.terminate()
        server.wait(30)
    r = json.loads(res.read_text())
    n, tokens = r["completed"], r["total_output_tokens"]
    return dict(variant=variant, server_cpu_s=busy, ms_per_request=busy / n * 1e3, us_per_token=busy / tokens * 1e6,
                duration_s=r["duration_s"], mean_ttft_ms=r["mean_ttft_ms"], median_tpot_ms=r["median_tpot_ms"],
                engine_mean_ttft_ms=r.get("engine_mean_ttft_ms"), engine_mean_tpot_ms=r.get("engine_mean_tpot_ms"))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["h11/asyncio", "auto/auto"],
                    help="uvicorn http/loop pairs (h11, httptools, auto / asyncio, uvloop, auto)")
    ap.add_argument("--rounds", type=int, default=2, help="the variants alternate this many times")
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--output-len", type=int, default=None,
                    help="every request this many tokens (random prompts of 200 tokens); default: ShareGPT-like")
    ap.add_argument("--step-ms", type=float, default=None,
                    help="tokens in lockstep steps of this many ms (the real engine's rhythm); default: free-running")
    ap.add_argument("--port", type=int, default=8137)
    ap.add_argument("--out", default="/tmp/bench_frontend")
    ap.add_argument("--output-json", default=None)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = (["--dataset", "random", "--random-input-len", "200", "--random-output-len", str(a.output_len)]
            if a.output_len else ["--dataset", "sharegpt-like"])
    bench_args = [*data, "--num-prompts", str(a.num_prompts), "--request-rate", "inf", "--vocab-size", "20000"]
    rows = []
    for _ in range(a.rounds):
        for v in a.variants:
            r = one(v, a.port, bench_args, out, a.step_ms)
            rows.append(r)
            print(f"{v:20s} server CPU {r['server_cpu_s']:.2f} s: {r['ms_per_request']:.2f} ms/request, "
                  f"{r['us_per_token']:.1f} us/token; run {r['duration_s']:.2f} s, mean TTFT {r['mean_ttft_ms']:.0f} "
                  f"ms, median TPOT {r['median_tpot_ms']:.2f} ms"
                  + (f"; the engine's own mean TTFT {r['engine_mean_ttft_ms']:.0f} ms, token gap "
                     f"{r['engine_mean_tpot_ms']:.2f} ms" if r["engine_mean_ttft_ms"] is not None else ""), flush=True)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
