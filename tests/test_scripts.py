"""scripts/bench_throughput.py, bench_startup.py, run_batch.py and the other scripts, tiny, on CPU.

The tiny llama (tests/data/tiny/llama: vocab 512, 256 positions, no tokenizer) runs with
--skip-tokenizer-init, so prompts are token ids and text fields come back empty. One slow test runs
run_batch on the embedded SmolLM2 for text prompts and the chat template.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "data" / "tiny" / "llama")
SCRIPTS = REPO / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


run_batch = load_script("run_batch")


# ------------------------------------------------------------------------------------- bench_throughput
def test_bench_throughput_tiny_cli(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_throughput.py"), "--model", TINY, "--skip-tokenizer-init",
         "--num-prompts", "8", "--input-len", "32", "--output-len", "16", "--disable-tqdm",
         "--peak-tflops", "1", "--peak-tbps", "0.1", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requests/s" in proc.stdout and "output tokens/s" in proc.stdout and "MFU" in proc.stdout
    r = json.loads(out.read_text())
    assert r["num_requests"] == 8
    assert r["total_input_tokens"] == 8 * 32
    assert r["total_output_tokens"] == 8 * 16  # ignore_eos: every request runs to its output length
    assert r["requests_per_s"] > 0 and r["tokens_per_s"] > r["output_tokens_per_s"] > 0
    # 16 decode steps at least (prefill may take extra steps); bandwidth and MFU follow from the counts
    assert r["engine_steps"] >= 16
    assert r["achieved_weight_tbps"] == pytest.approx(
        r["weight_bytes_per_step"] * r["engine_steps"] / r["elapsed_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
    assert r["bandwidth_share"] == pytest.approx(r["achieved_weight_tbps"] / 0.1)


def test_bench_throughput_weight_bytes_match_the_tiny_checkpoint():
    sys.path.insert(0, str(SCRIPTS))
    import common
    from jaxserve.models.arch import arch_from_dict

    cfg = json.loads((Path(TINY) / "config.json").read_text())
    d, v, i, L = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = d * (nh + 2 * nkv) * hd + nh * hd * d + 3 * d * i + 2 * d
    arch = arch_from_dict(cfg)
    # read per step: layers + final norm + LM head; the (untied) input embedding is a gather, not counted
    assert common.weight_bytes_per_step(arch, 4) == 4 * (L * per_layer + d + v * d)
    assert common.detect_peaks("NVIDIA H100 80GB HBM3") == (790.0, 3.0)
    assert common.detect_peaks("cpu") == (None, None)


# ---------------------------------------------------------------------------------------- bench_startup
def test_bench_startup_cold_then_warm(tmp_path):
    """Two real server starts on one compile cache: the second reloads what the first compiled.
    JAX caches only programs that took >= 0.5 s to compile (jaxserve/platform.py); the 2-layer tiny
    llama compiles faster than that and would leave the cache empty, so this is the tiny config with
    16 layers (unrolled: ~1.5 s per forward bucket on CPU) and dummy weights. ~15 s in all."""
    cfg = json.loads((Path(TINY) / "config.json").read_text())
    (tmp_path / "deep.json").write_text(json.dumps({**cfg, "num_hidden_layers": 16}))
    cache, out = tmp_path / "xla", tmp_path / "startup.json"
    server = (f"--model {tmp_path / 'deep.json'} --load-format dummy --skip-tokenizer-init --max-model-len 128 "
              "--max-num-batched-tokens 32 --max-num-seqs 4 --num-gpu-blocks-override 64")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_startup.py"), "--runs", "2", "--compile-cache-dir", str(cache),
         "--log-dir", str(tmp_path / "logs"), "--timeout", "120", "--output-json", str(out), "--server-args", server],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cold, warm = json.loads(out.read_text())["runs"]
    assert (cold["cache"], warm["cache"]) == ("cold", "warm")
    for r in (cold, warm):
        assert r["error"] is None and r["completion_tokens"] == 1 and r["exit_code"] == 0, r
        assert 0 < r["health_s"] <= r["first_token_s"]
        assert r["shapes"] == 3 and "compiled 3 step shapes" in r["compile_line"]  # buckets 8/16/32
    assert cold["cache_files_before"] == 0 and cold["cache_files_after"] > 0
    assert warm["compile_s"] < cold["compile_s"]
    assert "warm start to first token" in proc.stdout


# -------------------------------------------------------------------------------------------- run_batch
def line(cid, body, url="/v1/completions") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


REQUESTS = [
    line("greedy", {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0}),
    line("two-prompts-n2", {"prompt": [[9, 10, 11], [12, 13]], "max_tokens": 3, "n": 2, "seed": 1,
                            "ignore_eos": True}),
    line("chat-without-tokenizer", {"messages": [{"role": "user", "content": "hi"}]}, url="/v1/chat/completions"),
    "{not json",
    line("too-long", {"prompt": list(range(1, 300)), "max_tokens": 4}),  # over max_model_len 256
    line("bad-field", {"prompt": [1, 2], "temperature": -1}),
    line("wrong-url", {"prompt": [1, 2]}, url="/v1/embeddings"),
    line("greedy-again", {"prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True}),
]


def batch_args(tmp_path: Path) -> list[str]:
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(REQUESTS) + "\n")
    return ["-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", TINY, "--skip-tokenizer-init",
            "--disable-tqdm", "--max-inflight", "2", "--enforce-eager", "--max-num-seqs", "8"]


def read_out(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]


def check_full_output(rows: list[dict]) -> dict:
    by_id = {r["custom_id"]: r for r in rows if r["custom_id"] is not None}
    assert len(rows) == len(REQUESTS) and len(by_id) == len(REQUESTS) - 1  # the bad-JSON line has no id
    for cid in ("greedy", "two-prompts-n2", "greedy-again"):
        r = by_id[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        assert r["id"].startswith("batch_req_")
        assert r["response"]["body"]["object"] == "text_completion"
    u = by_id["greedy"]["response"]["body"]["usage"]
    assert u["prompt_tokens"] == 4 and 1 <= u["completion_tokens"] <= 5
    assert by_id["greedy-again"]["response"]["body"]["usage"]["completion_tokens"] == 5  # ignore_eos
    two = by_id["two-prompts-n2"]["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]  # prompt i, sample j -> i * n + j
    assert two["usage"]["completion_tokens"] == 4 * 3 and two["usage"]["prompt_tokens"] == 3 + 2
    for cid, param in (("chat-without-tokenizer", "messages"), ("too-long", None), ("bad-field", "temperature"),
                       ("wrong-url", "url")):
        r = by_id[cid]
        assert r["response"]["status_code"] == 400 and r["error"]["message"], r
        assert r["response"]["body"]["error"]["param"] == param, r
    anon = [r for r in rows if r["custom_id"] is None]
    assert len(anon) == 1 and "invalid JSON" in anon[0]["error"]["message"]
    return by_id


def test_run_batch_lines_and_errors(tmp_path):
    summary = run_batch.main(batch_args(tmp_path))
    assert summary["ok"] == 3 and summary["errors"] == len(REQUESTS) - 3
    check_full_output(read_out(tmp_path))
    # a second run finds everything answered and changes nothing
    before = (tmp_path / "out.jsonl").read_text()
    again = run_batch.main(batch_args(tmp_path))
    assert again["skipped_done"] == len(REQUESTS) and (tmp_path / "out.jsonl").read_text() == before


def test_run_batch_resumes_after_interruption(tmp_path, monkeypatch):
    real_write = run_batch.Writer.write
    calls = []

    def write_then_die(self, obj):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill lands after three lines reached the file
        calls.append(obj["custom_id"])
        real_write(self, obj)

    monkeypatch.setattr(run_batch.Writer, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_batch.main(batch_args(tmp_path))
    monkeypatch.setattr(run_batch.Writer, "write", real_write)
    first = read_out(tmp_path)
    assert len(first) == 3
    # a half-written line from a kill mid-write is dropped, not parsed
    with open(tmp_path / "out.jsonl", "a") as f:
        f.write('{"id": "batch_req_cut", "custom_id": "greedy-ag')
    summary = run_batch.main(batch_args(tmp_path))
    assert summary["skipped_done"] == 3
    rows = read_out(tmp_path)
    assert rows[:3] == first  # the finished lines were kept, not redone
    check_full_output(rows)


@pytest.mark.slow
def test_run_batch_text_and_chat_on_default_model(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join([
        line("paris", {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
        line("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2},
             url="/v1/chat/completions"),
        line("zh", {"prompt": "AI 的未来发展", "max_tokens": 4, "echo": True, "logprobs": 1}),
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    from conftest import SMOL_FLAGS  # the shared SmolLM2 shapes: programs come from the compilation cache

    flags = [x for k, v in SMOL_FLAGS.items() for x in ("--" + k.replace("_", "-"), str(v))]
    summary = run_batch.main(["-i", str(inp), "-o", str(out), "--disable-tqdm", *flags])
    assert summary["ok"] == 3 and summary["errors"] == 0
    by_id = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    assert "Paris" in by_id["paris"]["choices"][0]["text"]
    chat = by_id["chat"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in chat["choices"][0]["message"]["content"]
    assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"]
    zh = by_id["zh"]["choices"][0]
    assert zh["text"].startswith("AI 的未来发展")  # echo
    assert zh["logprobs"]["tokens"] and zh["logprobs"]["token_logprobs"][0] is None  # first prompt token


# ----------------------------------------------------------------------------------------- bench_kernels
@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    """The kernel benchmark only runs for real on a GPU; its --smoke mode (tiny sizes, interpreted kernels)
    keeps it from breaking unseen: every implementation row agrees with the first (the Triton kernel) and the
    JSON and plot are written."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_kernels.py"), "--smoke", "--out", str(tmp_path), "--only", "decode",
         "prefill", "kv_write"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    rows = [x for x in r["rows"] if x["kind"] in ("decode", "prefill")]
    assert {x["impl"] for x in rows if x["kind"] == "decode"} == {"ours", "ours_mosaic", "ours_mosaic_persistent",
                                                                    "jax_bundled", "xla"}
    chained = [x for x in rows if x["kind"] == "decode" and x["impl"] != "xla" and "us_chained" in x]
    assert {x["impl"] for x in chained} == {"ours", "ours_mosaic", "ours_mosaic_persistent", "jax_bundled"}
    assert all(x["us_chained"] > 0 for x in chained)  # --smoke chains the first cell only
    assert {x["impl"] for x in rows if x["kind"] == "prefill"} == {"ours", "ours_mosaic", "xla"}
    assert not [x for x in rows if "error" in x]
    assert all(x["max_err_vs_first"] < 2e-2 for x in rows)  # bf16 against our Triton kernel's output
    assert any(x["kind"] == "kv_write" and x["impl"] == "pallas" for x in r["rows"])
    assert (tmp_path / "kernels.png").stat().st_size > 0
    assert r["partial"] is False


def test_bench_kernels_keeps_rows_of_a_cut_off_run(tmp_path):
    """Every row a section adds is in results.json at once (marked partial), so a device call killed at its time
    limit still brings back what it measured; rows added with +=, extend or append all count, once each."""
    import argparse
    sys.path.insert(0, str(SCRIPTS))
    import bench_kernels as bk
    args = argparse.Namespace(out=str(tmp_path), interpret=True, copy_bw=1.0, matmul_flops=2.0, all_rows=[])
    a = bk.Rows(args, [dict(n=0)])
    a.append(dict(n=1))
    b = bk.Rows(args)
    b += [dict(n=2), dict(n=3)]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["partial"] is True and [x["n"] for x in r["rows"]] == [0, 1, 2, 3]
    assert list(a) == [dict(n=0), dict(n=1)] and list(b) == [dict(n=2), dict(n=3)]


@pytest.mark.slow
def test_bench_kernels_prefill_sweep_smoke(tmp_path):
    """The Mosaic prefill sweep (interpreted, one warpgroup, the mixed case: prefix hits and decode rows): every
    tuning runs and agrees with the Triton kernel."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_kernels.py"), "--smoke", "--out", str(tmp_path), "--only",
         "prefill_sweep"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 2 and {r["case"] for r in rows} == {"mixed"}  # (64 keys, 2 stages), (128 keys, 4 stages)
    assert {(r["keys"], r["stages"]) for r in rows} == {(64, 2), (128, 4)}
    assert not [r for r in rows if "error" in r]
    assert all(r["max_err_vs_triton"] < 2e-2 for r in rows)


# ---------------------------------------------------------------------------------------- plot_batch_scaling
def test_plot_batch_scaling_reads_both_json_kinds(tmp_path):
    """bench_latency rows and a profile_decode step (its un-profiled time wins) make one series; a PNG is written."""
    sys.path.insert(0, str(SCRIPTS))
    import plot_batch_scaling
    lat = tmp_path / "lat.json"
    lat.write_text(json.dumps({"results": [{"batch": 64, "decode_step_ms": 8.0}, {"batch": 1, "decode_step_ms": 5.0}]}))
    prof = tmp_path / "prof.json"
    prof.write_text(json.dumps({"batch": 256, "step_ms": 19.0, "step_ms_unprofiled": 12.8}))
    out = tmp_path / "s.png"
    series = plot_batch_scaling.main(["--out", str(out), "--series", "gpu", str(lat), str(prof)])
    assert series == {"gpu": [(1, 5.0), (64, 8.0), (256, 12.8)]}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- profile_decode
def test_profile_decode_trace_arithmetic():
    """On a hand-made trace: busy time per device, the time both devices are busy at once, and host self times."""
    sys.path.insert(0, str(SCRIPTS))
    import collections

    import profile_decode as pd
    assert pd._union([(5, 7), (0, 2), (1, 3), (7, 9)]) == [[0, 3], [5, 9]]
    pname = {1: "/device:GPU:0 (stream)", 2: "/device:GPU:1 (stream)"}
    ops = [dict(pid=1, ts=0, dur=10), dict(pid=1, ts=5, dur=10), dict(pid=1, ts=30, dur=5),   # GPU 0: [0,15] [30,35]
           dict(pid=2, ts=10, dur=10), dict(pid=2, ts=32, dur=10)]                             # GPU 1: [10,20] [32,42]
    res = pd._per_device(ops, pname)
    assert res["busy_ms"] == {"GPU:0": 0.020, "GPU:1": 0.020}
    assert res["all_busy_ms"] == pytest.approx(0.008)  # [10,15] and [32,35]
    # a parent of 10 us with children of 3 and 4 us: self 3; a child named with #args# is grouped by its name
    evs = [dict(name="launch", ts=0, dur=10), dict(name="cuLaunchKernel#a=1#", ts=1, dur=3),
           dict(name="cuLaunchKernel#a=2#", ts=5, dur=4)]
    self_us, count = collections.Counter(), collections.Counter()
    pd._self_times(evs, self_us, count)
    assert self_us == {"launch": 3, "cuLaunchKernel": 7} and count["cuLaunchKernel"] == 2


def test_profile_decode_op_sequence():
    """The op sequence takes one device's ops from the middle of the trace, in time order, with the idle gap
    before each."""
    sys.path.insert(0, str(SCRIPTS))
    import profile_decode as pd
    ops = [dict(pid=2, ts=0, dur=1, name="other device")] + [
        dict(pid=1, ts=10 * i, dur=4, name=f"op{i}") for i in (3, 0, 2, 1)]  # unsorted; 6 us gaps
    seq = pd.op_sequence(ops, n=3)
    assert seq == [("op2", 4, 0.0), ("op3", 4, 6.0)]


# ------------------------------------------------------------------------------------------ bench_frontend
def test_bench_frontend_counts_the_server_process_cpu(tmp_path):
    """A real server on the mock engine, free-running and in lockstep steps: every request completes, the server's
    CPU is counted, and with steps every stream gets its tokens no faster than one per step."""
    from server_harness import free_port
    sys.path.insert(0, str(SCRIPTS))
    import bench_frontend
    args = ["--num-prompts", "6", "--output-len", "5", "--rounds", "1", "--variants", "h11/asyncio",
            "--out", str(tmp_path)]
    rows = bench_frontend.main([*args, "--port", str(free_port())])
    stepped = bench_frontend.main([*args, "--port", str(free_port()), "--step-ms", "40"])
    for r in rows + stepped:
        assert r["server_cpu_s"] > 0 and r["us_per_token"] > 0
    assert stepped[0]["median_tpot_ms"] >= 35  # one token per 40 ms step at most
    assert stepped[0]["engine_mean_tpot_ms"] >= 35  # the server's /metrics saw the steps' rhythm too


def test_bench_dispatch_times_launches_by_argument_count(tmp_path):
    """One CPU device: a row per (buffers, donated) with a positive host time, written to the JSON; more arrays
    cost more to launch than fewer (hundreds against a few)."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_dispatch
    out = tmp_path / "d.json"
    rows = bench_dispatch.main(["--buffers", "2", "400", "--donated", "0", "--devices", "1", "--calls", "20",
                                "--output-json", str(out)])
    assert [(r["buffers"], r["donated"]) for r in rows] == [(2, 0), (400, 0)]
    assert json.loads(out.read_text()) == rows
    assert 0 < rows[0]["host_us_per_call"] < rows[1]["host_us_per_call"]


# ------------------------------------------------------------------------------------------- step_memory
def test_step_memory_finds_every_stages_pages_aliased(tmp_path):
    """PP=2 over 2 CPU devices, tiny llama (2 layers: one a stage; 2 kv heads x 16 dims, f32): each stage's program
    of every warm-up shape aliases its layer's k and v pages (1024 pages of 16 tokens: 2 x 1024 x 16 x 16 x 4 bytes
    = 2 MiB each) to the donated inputs, and nothing of that size is a temporary."""
    import os
    out = tmp_path / "m.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "step_memory.py"), "--model", TINY, "--skip-tokenizer-init",
         "--pipeline-parallel-size", "2", "--num-gpu-blocks-override", "1024", "--enforce-eager", "--max-model-len",
         "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    page = 2 * 1024 * 16 * 16 * 4
    assert sorted({(r["T"], r["decode_only"]) for r in rows}) == [(8, False), (16, False)]
    assert sorted(r["program"] for r in rows) == ["stage0", "stage0", "stage1", "stage1"]
    for r in rows:
        assert r["page_bytes"] == page and r["alias"] == 2 * page and r["out"] >= r["alias"], r
        assert r["temp"] < page and not r["copy_suspected"], r
    assert "one layer's k pages on one device: 2.0 MiB" in proc.stdout
