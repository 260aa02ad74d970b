"""Regressions found in review: leaks and cache poisoning around n > 1 forking and async placeholders."""
from jaxserve.block_manager import BlockManager
from jaxserve.config import EngineArgs
from jaxserve.engine import LLMEngine
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

TINY = "tests/data/tiny/llama"


def test_placeholder_token_is_never_hashed_into_the_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = Request("r", [1, 2, 3], SamplingParams())
    bm.allocate(req, 3)
    req.num_computed_tokens = 3
    req.append_placeholder(0)  # token 4 is still on the device
    bm.allocate(req, 1)
    req.num_computed_tokens = 4  # the step computing position 3 was dispatched
    bm.cache_full_blocks(req)
    assert bm.hash_to_block == {}  # block 0 holds (1, 2, 3, -1): not registered
    req.append_token(7)  # the real token arrives
    bm.cache_full_blocks(req)
    assert list(bm.block_hash) == [req.block_ids[0]]


def test_abort_frees_forked_children_after_the_parent_finished():
    eng = LLMEngine.from_engine_args(EngineArgs(model=TINY, skip_tokenizer_init=True, enforce_eager=True,
                                                max_model_len=128, num_gpu_blocks_override=40))
    free = eng.block_manager.num_free_blocks
    eng.add_request("g", list(range(1, 22)), SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=50,
                                                            ignore_eos=True))
    while not any(r.parent is not None for r in eng.scheduler.running):
        eng.step()
    g = eng.groups["g"]
    parent = g.samples[0].req
    eng.scheduler.finish(parent, RequestStatus.FINISHED_STOPPED)  # sample 0 ended first
    g.samples[0].finish_reason = "stop"
    eng.step()
    eng.abort_request("g")
    assert not eng.scheduler.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == free
