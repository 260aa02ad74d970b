"""Trace N steady decode steps with jax.profiler; print the top device ops and the GPU idle share.

Idle share = 1 - (union of device-op time) / (wall time of the traced steps). The trace's Chrome JSON
(`plugins/profile/*/*.trace.json.gz`) is read with gzip + json: device ops are the complete ("X")
events of processes whose name mentions a GPU/device stream.

  python scripts/profile_decode.py --model benchmarks/configs/llama3-8b.json --load-format dummy \
      --skip-tokenizer-init --dtype bfloat16 --batch-size 256 --steps 50 --trace-dir /tmp/trace
It also reads an existing trace: `--analyze DIR`.
"""
from __future__ import annotations

import argparse
import collections
import gc
import glob
import gzip
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def analyze(trace_dir: str, wall_s: float | None = None, top: int = 15) -> dict:
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        tr = json.load(f)
    events = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {p for p, n in pname.items() if "/device:" in n.lower() and "cpu" not in n.lower()}
    ops = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev_pids and e.get("dur", 0) > 0]
    host = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("jaxserve."):
            host[e["name"]] += e.get("dur", 0)
    for name, us in host.most_common():
        print(f"host phase {name:30s} {us / 1e3:9.2f} ms")
    host_top = host_self_times(events, pname, dev_pids, top)
    if not ops:
        print(f"no device ops in {files[-1]} (processes: {sorted(set(pname.values()))[:10]}): CPU run?")
        return {"host_phases_ms": {k: v / 1e3 for k, v in host.items()}, "host_top": host_top}
    by_name = collections.Counter()
    for e in ops:
        by_name[e["name"]] += e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
    busy = sum(t - s for s, t in _union(spans))
    span_us = spans[-1][1] - spans[0][0]
    per_dev = _per_device(ops, pname)
    wall_us = wall_s * 1e6 if wall_s else span_us
    total = sum(by_name.values())
    print(f"{'op':70s} {'ms':>9s} {'share':>6s}")
    for name, us in by_name.most_common(top):
        print(f"{name[:70]:70s} {us / 1e3:9.2f} {us / total:6.1%}")
    idle = 1 - busy / wall_us
    print(f"device busy {busy / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall: idle share {idle:.1%}")
    seq = op_sequence(ops)
    return {"busy_ms": busy / 1e3, "wall_ms": wall_us / 1e3, "idle_share": idle, "per_device": per_dev,
            "host_phases_ms": {k: v / 1e3 for k, v in host.items()},
            "top": [(n, us / 1e3) for n, us in by_name.most_common(top)], "host_top": host_top, "op_sequence": seq}


def op_sequence(ops: list, n: int = 60) -> list:
    """n consecutive device ops from the middle of the trace (one device), in order: (name, us, gap us before
    it). A layer's kernels repeat every few entries, so this shows what one layer launches and the gaps."""
    first_pid = min(e["pid"] for e in ops)
    dev = sorted((e for e in ops if e["pid"] == first_pid), key=lambda e: e["ts"])
    mid = len(dev) // 2
    out, prev_end = [], None
    for e in dev[mid:mid + n]:
        gap = 0.0 if prev_end is None else max(0.0, e["ts"] - prev_end)
        out.append((e["name"][:60], round(e["dur"], 2), round(gap, 2)))
        prev_end = e["ts"] + e["dur"]
    print("op sequence (middle of the trace, first device): name, us, gap before (us)")
    for name, us, gap in out[:40]:
        print(f"  {name:60s} {us:8.2f} {gap:7.2f}")
    return out


def _union(spans: list) -> list:
    """Sorted (start, end) spans merged into disjoint intervals."""
    out: list = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _per_device(ops: list, pname: dict) -> dict:
    """Busy time of each device (its streams' ops merged), and with several devices the time when all of them
    are busy at once: pipeline stages that overlap show it."""
    by_dev = collections.defaultdict(list)
    for e in ops:
        name = pname.get(e["pid"], str(e["pid"]))
        dev = name.split("/device:")[-1].split()[0] if "/device:" in name else name
        by_dev[dev].append((e["ts"], e["ts"] + e["dur"]))
    unions = {d: _union(sp) for d, sp in by_dev.items()}
    res = {"busy_ms": {d: sum(t - s for s, t in u) / 1e3 for d, u in unions.items()}}
    if len(unions) > 1:
        common = None
        for u in unions.values():
            if common is None:
                common = u
                continue
            both, i, j = [], 0, 0
            while i < len(common) and j < len(u):
                s, t = max(common[i][0], u[j][0]), min(common[i][1], u[j][1])
                if s < t:
                    both.append([s, t])
                if common[i][1] < u[j][1]:
                    i += 1
                else:
                    j += 1
            common = both
        res["all_busy_ms"] = sum(t - s for s, t in common) / 1e3
        print("per device busy: " + ", ".join(f"{d} {ms:.1f} ms" for d, ms in res["busy_ms"].items())
              + f"; all devices busy at once {res['all_busy_ms']:.1f} ms")
    return res


def _self_times(evs: list, self_us: collections.Counter, count: collections.Counter) -> None:
    """Adds each event's self time (its duration less its children's) under its name, `#...#` stripped."""
    stack: list = []  # [end, name, child time, duration]

    def pop() -> None:
        _end, name, child, dur = stack.pop()
        self_us[name] += dur - child
        if stack:
            stack[-1][2] += dur
    for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1][0] <= e["ts"]:
            pop()
        name = re.sub(r"#.*", "", str(e["name"])).strip() or str(e["name"])
        count[name] += 1
        stack.append([e["ts"] + e["dur"], name, 0.0, e["dur"]])
    while stack:
        pop()


def host_self_times(events: list, pname: dict, dev_pids: set, top: int) -> dict:
    """Where the host's time goes: (1) on the thread that launches the forward, the events nested in
    `jaxserve.dispatch_forward` (XLA's TraceMe scopes, CUPTI's driver-API calls such as cuLaunchKernel or
    cuGraphLaunch, Python frames); (2) over all host threads, the non-Python events (a runtime that launches
    from a worker thread of its own shows there). Both by self time."""
    spans = [e for e in events if e.get("ph") == "X" and e.get("pid") not in dev_pids and e.get("dur", 0) > 0]
    by_thread = collections.defaultdict(list)
    for e in spans:
        by_thread[(e["pid"], e["tid"])].append(e)
    out = {}
    for title, select in (("on the launching thread, inside dispatch_forward", "fwd"),
                          ("all host threads, non-Python events", "all")):
        self_us, count = collections.Counter(), collections.Counter()
        for evs in by_thread.values():
            if select == "fwd":
                windows = [(e["ts"], e["ts"] + e["dur"]) for e in evs if e["name"] == "jaxserve.dispatch_forward"]
                if not windows:
                    continue
                evs = [e for e in evs if any(s <= e["ts"] < t for s, t in windows)]
            else:
                evs = [e for e in evs if not str(e["name"]).startswith("$")]
            _self_times(evs, self_us, count)
        rows = [(n, us / 1e3, count[n]) for n, us in self_us.most_common(top)]
        out[select] = rows
        print(f"{'host self time: ' + title:70s} {'ms':>9s} {'calls':>7s}")
        for n, ms, k in rows:
            print(f"  {n[:68]:68s} {ms:9.2f} {k:7d}")
    return out


def replay_forward(eng, call: tuple, n: int) -> dict:
    """The device time of one decode step's forward without the profiler: the same forward (same inputs, the
    KV cache threaded through) enqueued n times back to back, then waited for. When enqueueing one takes less
    than running one (launch_ms < device_ms), the device never waits and the figure is its busy time per step.
    Rewriting the same tokens' K/V into the same slots changes nothing. call: (the runner's method, its args)."""
    import jax
    runner = eng.runner
    fn, args = call
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    t1 = time.perf_counter()
    jax.block_until_ready((out, runner.kv_caches))
    t2 = time.perf_counter()
    res = {"device_ms": (t2 - t0) / n * 1e3, "launch_ms": (t1 - t0) / n * 1e3, "n": n}
    res["launch_bound"] = res["launch_ms"] > 0.9 * res["device_ms"]
    print(f"replayed forward x{n}: {res['device_ms']:.2f} ms each, enqueue {res['launch_ms']:.2f} ms each"
          + (" (launch-bound: an upper bound on device time)" if res["launch_bound"] else ""))
    return res


def profile_prefill(eng, ns, rng) -> None:
    import jax

    from jaxserve.sampling_params import SamplingParams

    def round_(tag: str) -> tuple[float, int]:
        for i in range(ns.batch_size):
            ids = rng.integers(10, eng.arch.vocab_size - 10, ns.input_len).tolist()
            eng.add_request(f"{tag}{i}", ids, SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=1))
        n, t0 = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            n += 1
        eng.wait_device()
        return time.perf_counter() - t0, n
    round_("warm")
    mb0 = eng.runner.microbatched_steps
    plain, n = round_("plain")
    print(f"prefill of {ns.batch_size} x {ns.input_len} tokens without the profiler: {plain * 1e3:.1f} ms in {n} "
          f"steps ({ns.batch_size * ns.input_len / plain:,.0f} tok/s; {eng.runner.microbatched_steps - mb0} steps "
          f"as two pipeline micro-batches)")
    jax.profiler.start_trace(ns.trace_dir)
    wall, n = round_("traced")
    jax.profiler.stop_trace()
    res = analyze(ns.trace_dir, wall)
    res.update(phase="prefill", prefill_ms=plain * 1e3, steps=n, tokens=ns.batch_size * ns.input_len,
               microbatched_steps=eng.runner.microbatched_steps - mb0)
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(res, indent=1))


def main() -> None:
    from jaxserve.config import EngineArgs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--trace-dir", default="/tmp/jaxserve-trace")
    p.add_argument("--analyze", default=None, help="only analyze an existing trace folder")
    p.add_argument("--output-json", default=None)
    p.add_argument("--replay", type=int, default=20,
                   help="time the last decode step's forward this many times back to back (0: off)")
    p.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                   help="prefill: trace the steps that prefill --batch-size prompts of --input-len tokens (pipeline "
                        "micro-batches show there), after one untraced round that compiles them")
    p.add_argument("--host-profile", action="store_true", help="also cProfile the host side of the steps")
    p.add_argument("--plain-rounds", type=int, default=1,
                   help="time the --steps steps without the profiler this many times in a row (the figure used is "
                        "the first round's; the others show whether the step time moves within one process)")
    p.add_argument("--two-program-step", action="store_true",
                   help="unpack the step's inputs in a program of their own, then run the forward, as pipeline "
                        "stages do (the A/B of the one-program step; compiled lazily, so use with --enforce-eager)")
    ns = p.parse_args()
    from jaxserve.platform import set_gil_switch_interval
    set_gil_switch_interval()  # JAXSERVE_GIL_SWITCH_MS, as the server reads it
    if ns.analyze:
        analyze(ns.analyze)
        return
    import jax
    import numpy as np

    from jaxserve.engine import LLMEngine
    from jaxserve.sampling_params import SamplingParams
    eng = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    if ns.two_program_step:
        eng.runner.fuse_unpack = False
    rng = np.random.default_rng(0)
    if ns.phase == "prefill":
        return profile_prefill(eng, ns, rng)
    max_tokens = eng.model_config.max_model_len - ns.input_len - 1
    need = 1 + 5 + ns.steps * (max(1, ns.plain_rounds) + 1 + ns.host_profile)  # first token, steady, timed rounds
    if need > max_tokens:  # else sequences finish mid-run and later rounds time a smaller batch
        raise SystemExit(f"--steps {ns.steps} x {max(1, ns.plain_rounds)} rounds (+ the traced round"
                         f"{' and the host profile' if ns.host_profile else ''}) need {need} new tokens per sequence; "
                         f"max_model_len {eng.model_config.max_model_len} - --input-len {ns.input_len} leaves "
                         f"{max_tokens}")
    for i in range(ns.batch_size):
        ids = rng.integers(10, eng.arch.vocab_size - 10, ns.input_len).tolist()
        eng.add_request(str(i), ids, SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=max_tokens))
    while any(r.is_prefill for r in eng.scheduler.running) or eng.scheduler.num_waiting:
        eng.step()
    last = {}
    # A step runs one of these: the packed inputs' one program (one stage, one process), or the plain forward
    # after its inputs were unpacked (pipeline stages) or as host arrays (multi-host).
    forwards = {name: getattr(eng.runner, name) for name in ("run_packed_forward", "run_forward")}

    def capture(fn):
        def run(*args):  # the step's forward and its inputs, for the replay below
            last["call"] = fn, args
            return fn(*args)
        return run
    for name, fn in forwards.items():
        setattr(eng.runner, name, capture(fn))
    for _ in range(5):  # steady state, every shape compiled
        eng.step()
    eng.wait_device()
    for name in forwards:
        delattr(eng.runner, name)  # the class's methods again
    replay = None
    if ns.replay and "call" in last:
        replay = replay_forward(eng, last["call"], ns.replay)
    elif ns.replay:  # pipeline micro-batches go through forward_microbatched, not run_forward
        print("no whole-step forward to replay (micro-batched steps): replay skipped")
    gc_ms: list[tuple[int, float]] = []  # (generation, ms) of the cyclic GC's collections during the rounds
    gc_t0 = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_ms.append((info["generation"], (time.perf_counter() - gc_t0[0]) * 1e3))
    gc.callbacks.append(on_gc)
    rounds = []
    for r in range(max(1, ns.plain_rounds)):  # the same steps without the profiler (CUPTI slows every launch)
        t0 = time.perf_counter()
        marks = [t0]
        for _ in range(ns.steps):
            eng.step()
            marks.append(time.perf_counter())
        eng.wait_device()
        step_ms = np.diff(marks) * 1e3  # host-side time between step() returns: async, so a spread, not a device time
        full = [ms for g, ms in gc_ms if g == 2]
        rounds.append(dict(step_ms=(time.perf_counter() - t0) / ns.steps * 1e3,
                           median_ms=float(np.median(step_ms)), max_ms=float(step_ms.max()),
                           gc_full=len(full), gc_full_ms=max(full, default=0.0)))
        gc_ms.clear()
        print(f"{ns.steps} decode steps at batch {ns.batch_size} without the profiler: {rounds[-1]['step_ms']:.2f} "
              f"ms/step (between step() returns: median {rounds[-1]['median_ms']:.2f}, max {rounds[-1]['max_ms']:.2f}; "
              f"{rounds[-1]['gc_full']} full gc, longest {rounds[-1]['gc_full_ms']:.1f} ms)"
              + (f" [round {r + 1}, contexts from {ns.input_len + 6 + r * ns.steps} tokens]"
                 if ns.plain_rounds > 1 else ""))
    gc.callbacks.remove(on_gc)
    plain = rounds[0]["step_ms"] / 1e3
    jax.profiler.start_trace(ns.trace_dir)
    t0 = time.perf_counter()
    for _ in range(ns.steps):
        eng.step()
    eng.wait_device()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    if ns.host_profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(ns.steps):
            eng.step()
        eng.wait_device()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    print(f"{ns.steps} decode steps at batch {ns.batch_size}: {wall / ns.steps * 1e3:.2f} ms/step")
    res = analyze(ns.trace_dir, wall)
    if replay:
        share = 1 - replay["device_ms"] / (plain * 1e3)
        print(f"idle share without the profiler: 1 - replayed forward {replay['device_ms']:.2f} ms / step "
              f"{plain * 1e3:.2f} ms = {share:.1%}")
        res.update(replay=replay, idle_share_unprofiled=share)
    res.update(step_ms=wall / ns.steps * 1e3, step_ms_unprofiled=plain * 1e3, plain_rounds=rounds,
               gil_switch_ms=sys.getswitchinterval() * 1e3, batch=ns.batch_size, backend=eng.runner.model.backend.name)
    if ns.output_json:
        Path(ns.output_json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
