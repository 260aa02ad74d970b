"""The real AsyncLLMEngine (engine thread + asyncio streams) on a tiny checkpoint: concurrent streams give the
same tokens as the offline engine, a consumer that goes away aborts its request and frees its blocks, and a bad
request fails only its own stream."""
import asyncio

import pytest

from jaxserve.async_engine import AsyncLLMEngine
from jaxserve.config import EngineArgs
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams

ARGS = dict(model="tests/data/tiny/llama", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
            num_gpu_blocks_override=64, max_num_batched_tokens=32, max_num_seqs=8)
PROMPTS = [[3, 17, 42, 99, 5], list(range(10, 40)), [7] * 17]


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_engine_args(EngineArgs(**ARGS))
    eng.start()
    yield eng
    asyncio.run(eng.shutdown(1.0))


def test_streams_match_offline_and_abort_frees_blocks(engine):
    offline = LLM(**ARGS).generate([{"prompt_token_ids": p} for p in PROMPTS], greedy(12), use_tqdm=False)
    free = engine.engine.block_manager.num_free_blocks

    async def consume(i, p, stop_after=None):
        last, seen = None, 0
        async for out in engine.generate(p, greedy(12), f"req-{i}"):
            assert len(out.outputs[0].token_ids) >= seen  # cumulative outputs only grow
            seen = len(out.outputs[0].token_ids)
            last = out
            if stop_after is not None and seen >= stop_after:
                break  # the client went away mid-stream
        return last

    async def main():
        outs = await asyncio.gather(*(consume(i, p) for i, p in enumerate(PROMPTS)),
                                    consume(9, PROMPTS[1] + [1, 2], stop_after=3))
        for _ in range(100):  # the abort travels to the engine thread
            if engine.engine.block_manager.num_free_blocks == free:
                break
            await asyncio.sleep(0.02)
        return outs

    outs = asyncio.run(main())
    assert [o.outputs[0].token_ids for o in outs[:3]] == [o.outputs[0].token_ids for o in offline]
    assert all(o.finished for o in outs[:3])
    assert engine.engine.block_manager.num_free_blocks == free
    assert not engine.errored


def test_bad_request_fails_only_its_stream(engine):
    async def main():
        with pytest.raises(ValueError):
            async for _ in engine.generate([10**6], greedy(4), "bad"):
                pass
        got = [o async for o in engine.generate(PROMPTS[0], greedy(4), "good")]
        return got[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.outputs[0].token_ids) == 4
    assert not engine.errored
