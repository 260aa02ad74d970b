"""Async scheduling (step k dispatched before step k-1's tokens reach the host) must not change outputs:
greedy, seeded sampling, n > 1 forking, stop strings, max_tokens=1, chunked prefill, with and without overlap."""
import pytest

from jaxserve import SamplingParams
from jaxserve.llm import LLM

PROMPTS = ["What is the capital of France?", "def fib(n):", "AI 的未来发展",
           "Once upon a time there was a very long story that" * 3, "Hello"]
PARAMS = [SamplingParams(temperature=0, max_tokens=24),
          SamplingParams(temperature=0.9, seed=7, max_tokens=30),
          SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=20, n=3),
          SamplingParams(temperature=0, max_tokens=40, stop=["."]),
          SamplingParams(temperature=1.0, seed=11, max_tokens=1)]


def _run(async_scheduling: bool, dispatch_thread: bool = False):
    llm = LLM(enforce_eager=True, max_model_len=1024, num_gpu_blocks_override=400, max_num_batched_tokens=64,
              max_num_seqs=8, async_scheduling=async_scheduling, dispatch_thread=dispatch_thread)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    eng = llm.llm_engine
    assert eng.block_manager.num_free_blocks == 399  # every block back (block 0 is the null page)
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs], eng


@pytest.mark.slow
def test_async_overlap_same_outputs():
    sync, _ = _run(False)
    overlap, eng = _run(True)
    assert overlap == sync
    threaded, eng_t = _run(True, dispatch_thread=True)  # device launches from the dispatch thread
    assert eng_t._dispatcher is not None
    assert threaded == sync
    assert [len(o) for o in overlap] == [1, 1, 3, 1, 1]
    assert overlap[4][0][2] == "length" and len(overlap[4][0][0]) == 1
    assert "." not in overlap[3][0][1]


def test_wait_device_drains_the_dispatch_thread():
    # A profile waits on the KV cache between steps; with launches queued on the dispatch thread the arrays it
    # reads may be donated by a launch still to run, so wait_device drains the queue first.
    llm = LLM(enforce_eager=True, max_model_len=256, num_gpu_blocks_override=64, max_num_batched_tokens=32,
              max_num_seqs=4, dispatch_thread=True)
    eng = llm.llm_engine
    for i in range(3):
        eng.add_request(str(i), [5, 6, 7, 8 + i], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for _ in range(4):
        eng.step()
        eng.wait_device()
        assert eng._dispatcher._work_queue.empty()
        assert not any(x.is_deleted() for x in __import__("jax").tree.leaves(eng.runner.kv_caches))
