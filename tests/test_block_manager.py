"""BlockManager in concrete scenarios: exact block ids, free-list order, hashes, copies, swaps (pure Python)."""
import pytest

from jaxserve.block_manager import BlockManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams


def make_request(rid, tokens, **sp):
    return Request(str(rid), list(tokens), SamplingParams(**sp))


def run_step(bm, req, num_new):
    """allocate + what the engine does after the step for these tokens."""
    bm.allocate(req, num_new)
    req.num_computed_tokens += num_new
    bm.cache_full_blocks(req)


def test_initial_free_list_skips_null_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert list(bm.free_blocks) == [1, 2, 3, 4, 5, 6, 7]
    assert bm.num_free_blocks == 7 and bm.usage == 0.0


def test_allocate_exact_ids_and_slots():
    bm = BlockManager(8, 4)
    req = make_request("a", range(10))
    assert bm.can_allocate(req, 10)
    bm.allocate(req, 10)
    assert req.block_ids == [1, 2, 3]
    assert list(bm.free_blocks) == [4, 5, 6, 7]
    assert bm.ref_counts[:4] == [0, 1, 1, 1]
    assert bm.usage == pytest.approx(3 / 7)
    assert [bm.slot(req, p) for p in (0, 3, 4, 9)] == [4, 7, 8, 13]
    # growth by one token within the last block takes nothing; past it takes the free-list head
    req.num_computed_tokens = 10
    bm.allocate(req, 2)
    assert req.block_ids == [1, 2, 3]
    bm.allocate(req, 3)
    assert req.block_ids == [1, 2, 3, 4]


def test_pool_exhaustion_never_hands_out_null_block():
    bm = BlockManager(4, 2)
    req = make_request("a", range(6))
    bm.allocate(req, 6)
    assert req.block_ids == [1, 2, 3] and 0 not in req.block_ids
    req.num_computed_tokens = 6
    assert not bm.can_allocate(req, 1)
    assert bm.usage == 1.0


def test_free_uncached_blocks_go_to_head_in_table_order():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, b = make_request("a", range(8)), make_request("b", range(8))
    bm.allocate(a, 8)
    bm.allocate(b, 8)  # a=[1,2], b=[3,4]
    bm.free(a)
    assert a.block_ids == [] and list(bm.free_blocks) == [1, 2, 5, 6, 7]
    bm.free(b)
    assert list(bm.free_blocks) == [3, 4, 1, 2, 5, 6, 7]


def test_cached_blocks_go_to_tail_deep_end_first():
    bm = BlockManager(8, 4)
    a = make_request("a", range(10))
    run_step(bm, a, 10)  # [1,2,3]; blocks 1 and 2 full and registered, 3 partial
    assert set(bm.block_hash) == {1, 2}
    bm.free(a)
    # partial block 3 is worthless -> head; cached 2 then 1 -> tail (the root is evicted last)
    assert list(bm.free_blocks) == [3, 4, 5, 6, 7, 2, 1]
    assert set(bm.block_hash) == {1, 2}  # still findable while free


def test_prefix_hit_revives_free_cached_blocks():
    bm = BlockManager(8, 4)
    a = make_request("a", range(10))
    run_step(bm, a, 10)
    bm.free(a)  # free: [3,4,5,6,7,2,1]
    b = make_request("b", list(range(8)) + [50, 51, 52, 53])
    assert bm.lookup_prefix(b) == 8
    assert bm.can_allocate(b, 4)
    bm.allocate(b, 4)
    assert b.block_ids == [1, 2, 3]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert list(bm.free_blocks) == [4, 5, 6, 7]
    assert bm.prefix_cache_queries == 10 + 12 and bm.prefix_cache_hits == 8


def test_prefix_hit_shares_blocks_in_use():
    bm = BlockManager(8, 4)
    a = make_request("a", range(10))
    run_step(bm, a, 10)
    b = make_request("b", range(9))
    bm.allocate(b, 1)  # (9-1)//4 = 2 blocks hit; the 9th token gets a new block
    assert b.block_ids == [1, 2, 4] and b.num_computed_tokens == 8
    assert bm.ref_counts[1:5] == [2, 2, 1, 1]


def test_whole_prompt_never_served_from_cache():
    bm = BlockManager(8, 4)
    a = make_request("a", range(8))
    run_step(bm, a, 8)
    assert set(bm.block_hash) == {1, 2}
    b = make_request("b", range(8))  # identical: only 1 block may hit, the last token must be computed
    assert bm.lookup_prefix(b) == 4
    bm.allocate(b, 4)
    assert b.block_ids == [1, 3]
    b.num_computed_tokens = 8
    bm.cache_full_blocks(b)  # block 3 duplicates block 2: first registration wins, 3 stays uncached
    assert bm.block_hash == {1: bm.block_hash[1], 2: bm.block_hash[2]}
    bm.free(b)
    assert list(bm.free_blocks) == [3, 4, 5, 6, 7]  # 3 to the head, 1 still held by a


def test_lru_eviction_order():
    bm = BlockManager(5, 2)  # allocatable 1..4
    a = make_request("a", [1, 2, 3, 4])
    run_step(bm, a, 4)  # [1,2] both cached
    bm.free(a)
    assert list(bm.free_blocks) == [3, 4, 2, 1]
    c = make_request("c", [9, 9, 8, 8, 7, 7])
    bm.allocate(c, 6)  # pops 3, 4, then evicts cached 2 (released before 1)
    assert c.block_ids == [3, 4, 2]
    assert 2 not in bm.block_hash and set(bm.block_hash) == {1}
    d = make_request("d", [1, 2, 3, 4, 5])
    assert bm.lookup_prefix(d) == 2  # the chain breaks at the evicted block


def test_prefix_caching_disabled_no_hits_no_counters():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = make_request("a", range(10))
    run_step(bm, a, 10)
    assert bm.block_hash == {}
    b = make_request("b", range(10))
    assert bm.lookup_prefix(b) == 0
    bm.allocate(b, 10)
    assert b.block_ids == [4, 5, 6] and bm.prefix_cache_queries == 0


def test_fork_and_copy_on_write():
    bm = BlockManager(8, 4)
    p = make_request("p", range(6))
    run_step(bm, p, 6)  # [1,2]; block 2 holds tokens 4,5 (partial)
    c = make_request("c", range(6))
    bm.fork(p, c)
    assert c.block_ids == [1, 2] and bm.ref_counts[1:3] == [2, 2]
    c.num_computed_tokens = 6
    c.append_token(100)
    p.append_token(200)
    assert bm.can_allocate(c, 1)
    bm.allocate(c, 1)  # writes slot 6 in shared block 2 -> private copy
    assert c.block_ids == [1, 3]
    assert bm.take_pending_copies() == [(2, 3)] and bm.pending_copies == []
    assert bm.ref_counts[1:4] == [2, 1, 1]
    bm.allocate(p, 1)  # p is now block 2's only holder: writes in place
    assert p.block_ids == [1, 2] and bm.pending_copies == []


def test_copy_on_write_counts_toward_can_allocate():
    bm = BlockManager(4, 4)  # allocatable 1..3
    p = make_request("p", range(6))
    run_step(bm, p, 6)  # [1,2], free [3]
    c = make_request("c", range(6))
    bm.fork(p, c)
    c.num_computed_tokens = 6
    c.append_token(1)
    c.append_token(2)
    c.append_token(3)  # 9 tokens: writes 6..8 -> CoW block 2 and a new block 3rd = 2 blocks, only 1 free
    assert not bm.can_allocate(c, 3)
    assert bm.can_allocate(c, 2)


def test_free_drops_copies_into_released_blocks():
    bm = BlockManager(8, 4)
    p = make_request("p", range(6))
    run_step(bm, p, 6)
    c = make_request("c", range(6))
    bm.fork(p, c)
    c.num_computed_tokens = 6
    c.append_token(7)
    bm.allocate(c, 1)
    assert bm.pending_copies == [(2, 3)]
    bm.free(c)
    assert bm.pending_copies == [] and bm.ref_counts[1:4] == [1, 1, 0]


def test_swap_out_and_in_mappings():
    bm = BlockManager(8, 4, enable_prefix_caching=False, num_host_blocks=4)
    a = make_request("a", range(10))
    run_step(bm, a, 10)  # [1,2,3]
    assert bm.can_swap_out(a)
    assert bm.swap_out(a) == [(1, 0), (2, 1), (3, 2)]
    assert a.block_ids == [] and list(bm.free_blocks) == [1, 2, 3, 4, 5, 6, 7]
    assert list(bm.free_host_blocks) == [3] and bm.host_tables[a] == [0, 1, 2]
    other = make_request("o", range(3))
    bm.allocate(other, 3)  # takes block 1 meanwhile
    assert bm.can_swap_in(a, 1)
    assert bm.swap_in(a) == [(0, 2), (1, 3), (2, 4)]
    assert a.block_ids == [2, 3, 4] and list(bm.free_host_blocks) == [3, 0, 1, 2]
    assert a not in bm.host_tables


def test_swap_out_needs_host_room_and_reads_pending_copy_src():
    bm = BlockManager(8, 4, num_host_blocks=2)
    p = make_request("p", range(6))
    run_step(bm, p, 6)
    big = make_request("big", range(9))
    bm.allocate(big, 9)
    assert not bm.can_swap_out(big)  # 3 blocks, 2 host blocks
    c = make_request("c", range(6))
    bm.fork(p, c)
    c.num_computed_tokens = 6
    c.append_token(7)
    bm.allocate(c, 1)  # c = [1, dst] with a pending copy (2, dst)
    dst = c.block_ids[1]
    assert bm.pending_copies == [(2, dst)]
    # the copy has not run, so dst holds nothing yet: swap out reads src 2 instead, and the copy is dropped
    assert bm.swap_out(c) == [(1, 0), (2, 1)]
    assert bm.pending_copies == []


def test_free_swapped_request_returns_host_blocks():
    bm = BlockManager(8, 4, num_host_blocks=4)
    a = make_request("a", range(5))
    run_step(bm, a, 5)
    bm.swap_out(a)
    assert bm.num_free_host_blocks == 2
    bm.free(a)
    assert bm.num_free_host_blocks == 4 and bm.num_free_blocks == 7


def test_invalid_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(1, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(8, 0)
