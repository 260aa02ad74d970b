"""The server's engine in its own process (jaxserve/mp_engine.py).

- The delta wire rebuilds exactly the cumulative outputs the engine built (hand-made outputs with text that is
  revised, samples that fork later, logprobs and prompt logprobs that grow).
- On a tiny checkpoint (streams against the offline engine: tests/test_async_engine.py, run both ways): an n = 2
  request aborted before it forks ends its stream; start-up errors reach the caller; a killed engine process
  fails open streams instead of hanging them; the profiler runs in the engine process.
- The real server (`python -m jaxserve.serve` on the default SmolLM2) answers through the openai client from a
  child process, and SIGTERM leaves no engine process behind.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxserve.config import EngineArgs
from jaxserve.mp_engine import MPAsyncLLMEngine, OutputDecoder, OutputEncoder
from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams
from test_async_engine import ARGS, PROMPTS, greedy, start_engine, stop_engine  # the same tiny engine

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ the wire
def _lp(t, v):
    return {t: Logprob(v, 1, f"<{t}>")}


def _outputs() -> list[RequestOutput]:
    """Cumulative outputs of one request as the engine would hand them out, step by step (n = 2)."""
    m = RequestMetrics(arrival_time=1.0, first_token_time=2.0)
    plp = [None, _lp(5, -0.5)]
    steps = [
        # sample 0 only (the parent), text grows; prompt logprobs known
        [CompletionOutput(0, "Hel", [11], -0.1, [_lp(11, -0.1)])],
        # sample 1 forks in; sample 0's text is revised (an incomplete character resolved), not only grown
        [CompletionOutput(0, "Hé", [11, 12], -0.3, [_lp(11, -0.1), _lp(12, -0.2)]),
         CompletionOutput(1, "x", [13], -0.4, [_lp(13, -0.4)])],
        # no change for sample 0 this step; sample 1 stops on a stop string: its text is cut
        [CompletionOutput(0, "Hé", [11, 12], -0.3, [_lp(11, -0.1), _lp(12, -0.2)]),
         CompletionOutput(1, "x", [13, 14], -0.9, [_lp(13, -0.4), _lp(14, -0.5)], "stop", "y")],
        [CompletionOutput(0, "Hé!", [11, 12, 2], -1.0, [_lp(11, -0.1), _lp(12, -0.2), _lp(2, -0.7)], "stop", None),
         CompletionOutput(1, "x", [13, 14], -0.9, [_lp(13, -0.4), _lp(14, -0.5)], "stop", "y")],
    ]
    outs = []
    for i, comps in enumerate(steps):
        last = i == len(steps) - 1
        metrics = RequestMetrics(**{**m.__dict__, "finished_time": 9.0}) if last else m
        outs.append(RequestOutput("r1", "prompt text", [4, 5], list(plp), comps, last, metrics, 3))
    return outs


def test_wire_rebuilds_every_cumulative_output():
    enc, dec = OutputEncoder(), OutputDecoder()
    for want in _outputs():
        delta = pickle.loads(pickle.dumps(enc.encode(want)))  # what crosses the pipe
        got = dec.decode(delta)
        assert got == want
    assert not enc._sent and not dec._reqs  # a finished request leaves no state on either side


def test_wire_sends_only_what_is_new():
    enc = OutputEncoder()
    outs = _outputs()
    enc.encode(outs[0])
    rid, finished, samples, head = enc.encode(outs[1])
    assert head is None and not finished  # prompt fields went with the first output only
    (i0, ids0, keep0, tail0, lps0, *_), (i1, ids1, keep1, tail1, lps1, *_) = samples
    assert (i0, ids0, keep0, tail0, len(lps0)) == (0, [12], 0, "Hé", 1)  # revised text: sent whole
    assert (i1, ids1, keep1, tail1, len(lps1)) == (1, [13], 0, "x", 1)
    _, _, samples, _ = enc.encode(outs[2])
    assert samples[0][1:5] == ([], 2, "", [])  # nothing new for sample 0
    _, finished, _, head = enc.encode(outs[3])
    assert finished and head == {"metrics": outs[3].metrics}


# -------------------------------------------------------------------------------------- the engine process
@pytest.fixture(scope="module")
def engine():
    eng = start_engine("process")
    yield eng
    stop_engine(eng)


def test_abort_of_an_n2_request_before_it_forks_ends_its_stream(engine):
    """An n = 2 request aborted while it waits (its samples not forked yet, so the engine's abort output has one
    sample): the stream still ends, no listener sees the abort (as in-process), and no wire state is left."""
    seen = []
    engine.add_listener(seen.append)

    async def drain(gen):
        return [o async for o in gen]

    async def main():
        busy = [asyncio.create_task(drain(engine.generate(PROMPTS[1], greedy(60), f"busy-{i}"))) for i in range(8)]
        await asyncio.sleep(0.05)  # the 8 running requests fill max_num_seqs: the next one waits
        n2 = asyncio.create_task(drain(engine.generate(
            PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=1), "n2")))
        await asyncio.sleep(0.05)
        await engine.abort("n2")
        outs = await asyncio.wait_for(n2, 10)
        await asyncio.gather(*busy)
        return outs

    outs = asyncio.run(main())
    assert outs and outs[-1].finished and all(c.finish_reason == "abort" for c in outs[-1].outputs)
    assert "n2" not in [o.request_id for o in seen] and len(seen) == 8
    assert not engine._decoder._reqs


def test_profiler_runs_in_the_engine_process(engine, tmp_path):
    engine.start_profile(str(tmp_path))
    with pytest.raises(RuntimeError):
        engine.start_profile(str(tmp_path))

    async def main():
        return [o async for o in engine.generate(PROMPTS[0], greedy(3), "prof")][-1]

    assert asyncio.run(main()).finished
    engine.stop_profile()
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


def test_startup_error_reaches_the_caller():
    from jaxserve.engine_builder import StartupError
    with pytest.raises(StartupError, match="max_model_len"):
        MPAsyncLLMEngine.from_engine_args(EngineArgs(**{**ARGS, "num_gpu_blocks_override": 2}))


def test_killed_engine_process_fails_open_streams(tmp_path):
    """Also: stats are there before the first step (the ready message carries them, and adds not yet seen by the
    engine count as waiting); SIGTERM to the engine process alone is ignored (the front-end drains it); after the
    death, profiler calls and new requests fail at once."""
    eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**ARGS))
    st = eng.stats()
    assert (st.num_running, st.num_waiting, st.kv_cache_usage, st.cache_config["num_gpu_blocks"]) == (0, 0, 0.0, 64)
    eng._adds_sent += 2  # as if two adds were still in the pipe
    assert eng.stats().num_waiting == 2
    eng._adds_sent -= 2
    os.kill(eng.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert eng.proc.is_alive()

    async def main():
        gen = eng.generate(PROMPTS[1], greedy(90), "long")
        first = await gen.__anext__()
        assert not first.finished
        os.kill(eng.proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process"):
            async for _ in gen:
                pass
        assert eng.errored
        with pytest.raises(RuntimeError, match="died"):
            async for _ in eng.generate(PROMPTS[0], greedy(2), "after"):
                pass

    asyncio.run(asyncio.wait_for(main(), 60))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="engine process"):
        eng.start_profile(str(tmp_path))
    assert time.monotonic() - t0 < 5
    asyncio.run(eng.shutdown(0.1))


def test_engine_process_dies_with_its_front_end(tmp_path):
    """A front-end killed outright mid start-up (SIGKILL, the OOM killer: no cleanup runs, and the engine process
    reads no pipe until it is ready) takes its engine process with it at once, not after the engine's start-up
    (seconds here: this engine compiles its step shapes; minutes for a large model on a GPU)."""
    import json
    cfg = json.loads((REPO / ARGS["model"] / "config.json").read_text())
    (tmp_path / "deep.json").write_text(json.dumps({**cfg, "num_hidden_layers": 16}))  # ~1.5 s per shape to compile
    script = tmp_path / "front.py"
    args = {**ARGS, "model": str(tmp_path / "deep.json"), "load_format": "dummy", "enforce_eager": False}
    script.write_text(
        "import os, signal, sys, time\n"
        "from jaxserve.config import EngineArgs\n"
        "from jaxserve.mp_engine import MPAsyncLLMEngine\n"
        "def die():  # once the engine process has sent its config and is compiling\n"
        "    time.sleep(3)\n"
        "    import multiprocessing\n"
        "    print('ENGINE PID', multiprocessing.active_children()[0].pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':  # spawn re-imports the main module\n"
        f"    MPAsyncLLMEngine.from_engine_args(EngineArgs(**{args!r}), while_starting=die)\n")
    front = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = ""
    try:
        while not line.startswith("ENGINE PID"):  # the engine process prints to the same stdout
            line = front.stdout.readline()
            assert line, "the front-end exited before naming its engine process"
        engine_pid = int(line.split()[-1])
        front.wait(10)
        deadline = time.monotonic() + 2
        while _alive(engine_pid):
            assert time.monotonic() < deadline, "the engine process outlived its front-end"
            time.sleep(0.05)
    finally:
        if front.poll() is None:
            front.kill()
        if line.startswith("ENGINE PID") and _alive(int(line.split()[-1])):
            os.kill(int(line.split()[-1]), signal.SIGKILL)


@pytest.mark.slow
def test_engine_process_equals_the_engine_thread_on_smollm2():
    """The default SmolLM2 (real tokenizer) with the requests that exercise every field of the wire: stop strings
    (text cut, holdback while streaming), n = 2 with a seed (samples forking), logprobs and prompt logprobs, a
    stop token id. The engine process and the in-process engine thread give equal streams' last outputs."""
    from conftest import SMOL_FLAGS

    from jaxserve.async_engine import AsyncLLMEngine
    args = EngineArgs(**SMOL_FLAGS)
    requests = [
        ("Write a list of three fruits:", SamplingParams(temperature=0.0, max_tokens=24, stop=["orange"])),
        ("The capital of France is", SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, logprobs=2)),
        ("Count: one, two,", SamplingParams(temperature=0.0, max_tokens=10, prompt_logprobs=1, logprobs=1,
                                            stop=[" five"], include_stop_str_in_output=True)),
    ]

    async def run(engine):
        async def one(i, prompt, sp):
            outs = [o async for o in engine.generate(prompt, sp, f"r{i}")]
            texts = [c.text for o in outs for c in o.outputs]
            return outs[-1], texts
        return await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(requests)))

    mp_eng = MPAsyncLLMEngine.from_engine_args(args)
    try:
        got = asyncio.run(run(mp_eng))
    finally:
        asyncio.run(mp_eng.shutdown(1.0))
    thread_eng = AsyncLLMEngine.from_engine_args(args)
    thread_eng.start()
    try:
        want = asyncio.run(run(thread_eng))
    finally:
        asyncio.run(thread_eng.shutdown(1.0))
    for (g, g_texts), (w, w_texts) in zip(got, want):
        assert g.finished and w.finished
        assert g.prompt == w.prompt and g.prompt_token_ids == w.prompt_token_ids
        for a, b in zip(g.prompt_logprobs or [], w.prompt_logprobs or []):
            assert (a is None and b is None) or {t: round(lp.logprob, 4) for t, lp in a.items()} == \
                {t: round(lp.logprob, 4) for t, lp in b.items()}
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        assert len(g.outputs) == len(w.outputs)
        for a, b in zip(g.outputs, w.outputs):
            assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
                (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason)
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None:
                assert len(a.logprobs) == len(a.token_ids)
                assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
        # every streamed text was a prefix of the final one: nothing shown and then taken back
        final = {c.index: c.text for c in g.outputs}
        assert all(any(final[k].startswith(t) for k in final) for t in g_texts)
    # greedy: " apple, banana, and orange. ..." cut before the stop string; " three, four, five" kept with it
    assert got[0][0].outputs[0].finish_reason == "stop" and got[0][0].outputs[0].stop_reason == "orange"
    assert got[0][0].outputs[0].text == " apple, banana, and "
    assert got[2][0].outputs[0].text == " three, four, five" and got[2][0].outputs[0].stop_reason == " five"
    assert len(got[1][0].outputs) == 2 and got[2][0].prompt_logprobs is not None


# ---------------------------------------------------------------------------------------- the real server
def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _start_server(tmp_path, flags: list[str], timeout: float = 240):
    """(Popen, port) of `python -m jaxserve.serve` with the real engine (its own process), once /health is 200."""
    from server_harness import start_subprocess
    return start_subprocess(*flags, factory=None, timeout=timeout, log_path=tmp_path / "server.log")


@pytest.mark.slow
def test_real_server_answers_from_an_engine_process_and_sigterm_leaves_none(tmp_path):
    """The default SmolLM2 behind `python -m jaxserve.serve`: the openai client's greedy chat answer (streamed
    and not) comes through the engine process, and SIGTERM ends both processes with status 0."""
    import openai
    from conftest import SMOL_FLAGS

    proc, port = _start_server(tmp_path, [x for k, v in SMOL_FLAGS.items() for x in ("--" + k.replace("_", "-"),
                                                                                       str(v))])
    try:
        kids = _children(proc.pid)
        assert kids, "no engine process"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        model = client.models.list().data[0].id
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=20)
        assert "Paris" in whole.choices[0].message.content
        chunks = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=20,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 20
        while any(_alive(k) for k in kids):
            assert time.monotonic() < deadline, f"engine process {kids} outlived the server"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_real_server_under_concurrent_streams_with_disconnects_leaks_nothing(tmp_path):
    """48 streams at once through the real server and its engine process (tiny checkpoint): a third of the clients
    hang up after two chunks, the rest read to the end. Every finished stream has all its tokens, and once the
    last one ends the engine reports no running request and no used KV block (/metrics)."""
    import json

    import httpx as hx

    proc, port = _start_server(tmp_path, [
        "--model", ARGS["model"], "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "128",
        "--num-gpu-blocks-override", "64", "--max-num-batched-tokens", "32", "--max-num-seqs", "8",
        "--disable-log-requests"], timeout=120)
    url = f"http://127.0.0.1:{port}"

    def metric(text, name):
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"jaxserve:{name}{{"))

    async def client(i, c):
        body = {"prompt": [3 + i, 17, 42, 99, 5 + i], "max_tokens": 16, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        chunks, tokens = 0, None
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if i % 3 == 0 and chunks == 2:
                        return None  # hang up mid-stream
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
        return tokens

    async def main():
        async with hx.AsyncClient(timeout=120, limits=hx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(client(i, c) for i in range(48)))

    try:
        done = asyncio.run(main())
        assert all(n is None for n in done[::3])
        assert all(n == 16 for i, n in enumerate(done) if i % 3)  # usage of every stream read to the end
        deadline = time.monotonic() + 20
        while True:
            m = hx.get(f"{url}/metrics").text
            if metric(m, "num_requests_running") == 0 and metric(m, "kv_cache_usage_perc") == 0:
                break
            assert time.monotonic() < deadline, "requests or KV blocks left after every client ended"
            time.sleep(0.1)
        assert hx.get(f"{url}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
