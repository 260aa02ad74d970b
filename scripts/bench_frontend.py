"""The HTTP front-end's own cost: a real server process with the mock engine, the burst sent at it, CPU counted.

With the engine in its own process (mp_engine.py), the server process does HTTP, JSON, SSE and the requests'
bookkeeping. This measures that alone: `python -m jaxserve.serve --engine-factory mock_engine:make` (tests/
mock_engine.py: tokens as fast as the event loop takes them, no device), bench_serving.py's burst against it,
and the server process's CPU time (user + system, from /proc) over the burst: ms per request and us per streamed
token. `--http h11|httptools` and `--loop asyncio|uvloop` pick uvicorn's implementations (auto: what is installed).
On a 2-core machine the client competes for the cores; compare rows of one run, alternated.

    python scripts/bench_frontend.py --rounds 3 --variants h11/asyncio httptools/uvloop
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


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(variant: str, port: int, bench_args: list[str], out: Path) -> dict:
    http, loop = variant.split("/")
    path = [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    server = subprocess.Popen([sys.executable, "-c", LAUNCH, http, loop, "--engine-factory", "mock_engine:make",
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
                duration_s=r["duration_s"], mean_ttft_ms=r["mean_ttft_ms"], median_tpot_ms=r["median_tpot_ms"])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["h11/asyncio", "auto/auto"],
                    help="uvicorn http/loop pairs (h11, httptools, auto / asyncio, uvloop, auto)")
    ap.add_argument("--rounds", type=int, default=2, help="the variants alternate this many times")
    ap.add_argument("--num-prompts", type=int, default=320)
    ap.add_argument("--output-len", type=int, default=None,
                    help="every request this many tokens (random prompts of 200 tokens); default: ShareGPT-like")
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
            r = one(v, a.port, bench_args, out)
            rows.append(r)
            print(f"{v:20s} server CPU {r['server_cpu_s']:.2f} s: {r['ms_per_request']:.2f} ms/request, "
                  f"{r['us_per_token']:.1f} us/token; run {r['duration_s']:.2f} s, mean TTFT {r['mean_ttft_ms']:.0f} "
                  f"ms, median TPOT {r['median_tpot_ms']:.2f} ms", flush=True)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
