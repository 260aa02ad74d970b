"""The server's real engine on a tiny checkpoint, as a thread (AsyncLLMEngine) and as its own process
(MPAsyncLLMEngine): concurrent streams give the offline engine's tokens and logprobs, a consumer that goes away
aborts its request and frees its blocks, and a bad request fails only its own stream."""
import asyncio
import time

import pytest

from jaxserve.async_engine import AsyncLLMEngine
from jaxserve.config import EngineArgs
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams

ARGS = dict(model="tests/data/tiny/llama", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
            num_gpu_blocks_override=64, max_num_batched_tokens=32, max_num_seqs=8)
PROMPTS = [[3, 17, 42, 99, 5], list(range(10, 40)), [7] * 17]


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def start_engine(kind: str):
    """The server's engine on the tiny checkpoint: "thread" in this process (--disable-frontend-multiprocessing) or
    "process", its own (jaxserve/mp_engine.py, the default)."""
    if kind == "thread":
        eng = AsyncLLMEngine.from_engine_args(EngineArgs(**ARGS))
    else:
        from jaxserve.mp_engine import MPAsyncLLMEngine
        eng = MPAsyncLLMEngine.from_engine_args(EngineArgs(**ARGS))
    eng.start()
    return eng


def stop_engine(eng) -> None:
    asyncio.run(eng.shutdown(1.0))
    if hasattr(eng, "proc"):
        assert eng.proc.exitcode == 0  # it stopped when told to, not killed


@pytest.fixture(scope="module", params=["thread", "process"])
def engine(request):
    eng = start_engine(request.param)
    yield eng
    stop_engine(eng)


async def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_streams_match_offline_with_logprobs_and_abort_frees_blocks(engine):
    offline = LLM(**ARGS).generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(12, logprobs=2),
                                   use_tqdm=False)

    async def consume(i, p, stop_after=None):
        last, seen = None, 0
        async for out in engine.generate(p, greedy(12, logprobs=2), f"req-{i}"):
            assert len(out.outputs[0].token_ids) >= seen  # cumulative outputs only grow
            seen = len(out.outputs[0].token_ids)
            last = out
            if stop_after is not None and seen >= stop_after:
                break  # the client went away mid-stream
        return last

    async def main():
        outs = await asyncio.gather(*(consume(i, p) for i, p in enumerate(PROMPTS)),
                                    consume(9, PROMPTS[1] + [1, 2], stop_after=3))
        # the abort travels to the engine, which frees the blocks and reports it in its stats
        await _wait_for(lambda: engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0)
        return outs

    outs = asyncio.run(main())
    for got, want in zip(outs[:3], offline):
        g, w = got.outputs[0], want.outputs[0]
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason == "length"
        assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-5)
        assert [sorted(d) for d in g.logprobs] == [sorted(d) for d in w.logprobs]
        assert got.finished and got.prompt_token_ids == want.prompt_token_ids
    st = engine.stats()
    assert st.generation_tokens_total >= 3 * 12 + 3 and st.num_waiting == 0
    assert sum(st.iteration_tokens.counts) > 0
    assert not engine.errored


def test_bad_request_fails_only_its_stream_and_listeners_see_finished(engine):
    seen = []
    engine.add_listener(seen.append)

    async def main():
        with pytest.raises(ValueError, match="prompt token ids"):
            async for _ in engine.generate([10**6], greedy(4), "bad"):
                pass
        return [o async for o in engine.generate(PROMPTS[0], greedy(4), "good")][-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 4
    assert [o.request_id for o in seen] == ["good"]
    m = seen[0].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time  # the engine's clock, also across the pipe
    assert not engine.errored
