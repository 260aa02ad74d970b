"""Time from process start to first served token: the real server, cold and then warm compile cache.

Each run launches `python -m jaxserve.serve <server args> --port P --compile-cache-dir D` and times,
from Popen, (a) the first /health 200 and (b) the answer to a one-token /v1/completions request
(prompt as token ids, so --skip-tokenizer-init works), then sends SIGTERM and waits for the exit.
All runs share D, JAX's persistent compilation cache: run 1 starts from an empty D (unless
--keep-cache) and is cold; later runs reload the programs run 1 wrote. The engine's own startup
lines ("compiled N step shapes in X s", "engine ready in X s (weights Y s, compile Z s)") are read
from each run's log, so the table splits the wall time into weights, compile and the rest.

D is the script's --compile-cache-dir, never the server's default cache (run 1 empties it).
JAX writes only programs that took >= 0.5 s to compile (jaxserve/platform.py), so a model whose
programs compile faster than that leaves D empty and gains nothing from a warm start.

  python scripts/bench_startup.py --runs 2 --output-json startup.json -- \
      --model benchmarks/configs/llama3-8b.json --load-format dummy --skip-tokenizer-init \
      --dtype bfloat16 --max-model-len 2048
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

COMPILED = re.compile(r"compiled (\d+) step shapes in ([\d.]+) s")
READY = re.compile(r"engine ready in ([\d.]+) s \(weights ([\d.]+) s, compile ([\d.]+) s\)")
KV_LINE = re.compile(r"KV cache: (\d+) blocks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_size(d: Path) -> tuple[int, int]:
    """(files, bytes) under the compile cache folder."""
    files = [p for p in d.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def parse_log(text: str) -> dict:
    """The engine's startup figures; None where the line is missing (--enforce-eager prints no compile line)."""
    out = dict(compile_line=None, shapes=None, warmup_s=None, engine_ready_s=None, weights_s=None, compile_s=None,
               kv_blocks=None)
    for line in text.splitlines():
        if m := KV_LINE.search(line):  # the cache shape: a warm start must size the same one to reuse programs
            out.update(kv_blocks=int(m[1]))
        if m := COMPILED.search(line):
            out.update(compile_line=line[m.start():].strip(), shapes=int(m[1]), warmup_s=float(m[2]))
        if m := READY.search(line):
            out.update(engine_ready_s=float(m[1]), weights_s=float(m[2]), compile_s=float(m[3]))
    return out


def http(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def one_run(i: int, cmd: list[str], base: str, log_path: Path, timeout: float, prompt: list[int]) -> dict:
    r = dict(run=i, health_s=None, first_token_s=None, completion_tokens=0, exit_code=None, shutdown_s=None,
             error=None, log=str(log_path))
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while r["health_s"] is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} before /health was ok")
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"no /health 200 within {timeout:.0f} s")
                try:
                    if http(base + "/health", timeout=1.0)[0] == 200:
                        r["health_s"] = time.perf_counter() - t0
                except OSError:  # not listening yet (the engine is built before uvicorn binds)
                    time.sleep(0.05)
            left = max(timeout - (time.perf_counter() - t0), 1.0)
            status, body = http(base + "/v1/completions", dict(prompt=prompt, max_tokens=1, temperature=0.0,
                                                               ignore_eos=True), timeout=left)
            if status != 200:
                raise RuntimeError(f"/v1/completions answered {status}: {body[:300]!r}")
            r["first_token_s"] = time.perf_counter() - t0
            r["completion_tokens"] = json.loads(body)["usage"]["completion_tokens"]
        except (RuntimeError, OSError) as e:
            r["error"] = str(e)
        finally:
            t1 = time.perf_counter()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                r["exit_code"] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                r["exit_code"] = proc.wait()
                r["error"] = r["error"] or "no exit within 60 s of SIGTERM (killed)"
            r["shutdown_s"] = time.perf_counter() - t1
    r.update(parse_log(log_path.read_text(errors="replace")))
    return r


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="server starts; run 1 is cold, the rest warm (default 2)")
    p.add_argument("--server-args", default="", help="server/model flags as one string (also: after --)")
    p.add_argument("--compile-cache-dir", default=str(Path.home() / ".cache" / "jaxserve" / "bench_startup"),
                   help="the servers' persistent compile cache; emptied before run 1 unless --keep-cache "
                        "(default ~/.cache/jaxserve/bench_startup, apart from the serving default)")
    p.add_argument("--keep-cache", action="store_true", help="do not empty the cache first (run 1 is warm too)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run to the first token")
    p.add_argument("--prompt-len", type=int, default=4, help="prompt token ids of the one-token request")
    p.add_argument("--log-dir", default=None, help="where the server logs go (default: a temp folder)")
    p.add_argument("--target-s", type=float, default=20.0, help="issue 7's bound on warm first-token time")
    p.add_argument("--output-json", default=None)
    ns = p.parse_args(argv)
    server_args = shlex.split(ns.server_args) + extra
    if any(a.split("=")[0] == "--compile-cache-dir" for a in server_args):
        p.error("give --compile-cache-dir to this script (it empties the folder before the cold run), not the server")
    if any(a.split("=")[0] in ("--port", "--host") for a in server_args):
        p.error("--port and --host are this script's: the server binds 127.0.0.1")

    # `timeout` SIGTERMs this process only: exit through one_run's finally, which stops the server too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cache = Path(ns.compile_cache_dir).expanduser()
    if not ns.keep_cache and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    logs = Path(ns.log_dir or tempfile.mkdtemp(prefix="bench_startup_"))
    logs.mkdir(parents=True, exist_ok=True)
    port = ns.port or free_port()
    cmd = [sys.executable, "-m", "jaxserve.serve", *server_args, "--host", "127.0.0.1", "--port", str(port),
           "--compile-cache-dir", str(cache)]
    print("server:", shlex.join(cmd), flush=True)
    prompt = [1 + i % 100 for i in range(ns.prompt_len)]  # small ids: valid in any vocabulary

    runs = []
    for i in range(1, ns.runs + 1):
        warm = i > 1 or ns.keep_cache
        files, nbytes = cache_size(cache)
        r = one_run(i, cmd, f"http://127.0.0.1:{port}", logs / f"run{i}.log", ns.timeout, prompt)
        r.update(cache="warm" if warm else "cold", cache_files_before=files, cache_bytes_before=nbytes)
        r["cache_files_after"], r["cache_bytes_after"] = cache_size(cache)
        runs.append(r)
        print(f"run {i} ({r['cache']}): health {fmt(r['health_s'])} s, first token {fmt(r['first_token_s'])} s, "
              f"exit {r['exit_code']}" + (f", Error: {r['error']}" if r["error"] else ""), flush=True)
        if r["error"]:
            print(f"  log tail ({r['log']}):\n" + "".join(Path(r["log"]).read_text().splitlines(True)[-15:]))

    cols = ["run", "cache", "health_s", "first_token_s", "engine_ready_s", "weights_s", "compile_s", "kv_blocks",
            "cache_files_after"]
    rows = [cols] + [[fmt(r[c]) for c in cols] for r in runs]
    widths = [max(len(row[j]) for row in rows) for j in range(len(cols))]
    print()
    for row in rows:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
    for r in runs:
        print(f"run {r['run']} server: {r['compile_line'] or '(no compile line: --enforce-eager?)'}")
    warm_ft = [r["first_token_s"] for r in runs if r["cache"] == "warm" and r["first_token_s"] is not None]
    if warm_ft:
        best = min(warm_ft)
        print(f"warm start to first token: {best:.2f} s (target <= {ns.target_s:.0f} s: "
              f"{'met' if best <= ns.target_s else 'missed'})")
    result = dict(server_cmd=cmd, compile_cache_dir=str(cache), target_s=ns.target_s, runs=runs)
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if all(r["error"] is None and r["completion_tokens"] == 1 for r in res["runs"]) else 1)
