"""Host-side KV block allocator: free list, ref counts, prefix cache, copy-on-write, swap. No JAX.

Design note
-----------
The device KV cache is `num_blocks` blocks of `block_size` token slots. Block 0 is the null block: never
handed out, padding rows of block tables point at it and padding tokens write into it. A request's table
`req.block_ids` maps token position p to slot `block_ids[p // block_size] * block_size + p % block_size`.

Free list (a deque, ascending ids at start). Allocation pops from the head. A freed block whose ref count
drops to 0 goes
  * to the TAIL if it holds a cached (hashed) full block: it stays findable in the hash map until allocation
    pops it from the head, so eviction is LRU by time of release;
  * to the HEAD otherwise: its contents are worthless, so it is reused before any cached block is evicted.
A request's blocks are released last-to-first, so the deep end of a prefix chain is evicted before its
root (a chain whose root is gone can no longer be hit anyway).

Prefix cache. A full block's hash is hash((parent_hash, tuple(its token ids))), chained from the first
block (parent None), so equal hashes mean equal whole prefixes. Only full blocks whose K/V are computed are
registered (`cache_full_blocks`, after each step). On a request's first allocation the chain is looked up
and hit blocks are shared (ref + 1; a free cached block leaves the free list). At most num_tokens - 1
tokens are served, in whole blocks: the last token must be computed to get its logits. If two requests
compute the same block at once, the first registered wins; the other copy stays uncached.

Copy-on-write. Blocks are shared by prefix hits (always full, never written again) and by `fork` (n > 1
samples share the parent's partial last block). Before a request writes slots of a block with ref > 1,
`allocate` gives it a private block and records (src, dst) in `pending_copies`; the runner copies before the
forward pass. The last sharer to write finds ref == 1 and writes in place.

Swap. `swap_out` gives each device block of a request a host block of its own (shared device blocks are
duplicated on host) and frees the device blocks; `swap_in` reverses it. The runner must apply a step's
traffic in the order: swap out, swap in, block copies, then the forward pass (freed blocks may be reused
by the same step, and their old contents must be read first).
"""
from __future__ import annotations

from collections import deque

from jaxserve.request import Request

NULL_BLOCK = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_host_blocks = num_host_blocks
        self.free_blocks: deque[int] = deque(range(1, num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: dict[int, int] = {}  # block -> its hash, while registered
        self.hash_to_block: dict[int, int] = {}  # the inverse
        # Per request: hashes of the leading full blocks already registered (or tried), for chaining.
        self._req_hashes: dict[Request, list[int]] = {}
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) copy-on-write, drained per step
        self.free_host_blocks: deque[int] = deque(range(num_host_blocks))
        self.host_tables: dict[Request, list[int]] = {}  # swapped-out requests' host blocks, in order
        # Metrics, in tokens (vLLM's prefix cache hit rate = hits / queries).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def num_allocatable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-unreferenced ones included."""
        return len(self.free_blocks)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self.free_host_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_allocatable_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def slot(self, req: Request, pos: int) -> int:
        return req.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---- prefix cache --------------------------------------------------------------------------------
    def _block_tokens(self, req: Request, i: int) -> tuple[int, ...]:
        return tuple(req.all_token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _lookup(self, req: Request) -> tuple[list[int], list[int]]:
        """(hit blocks, their hashes): the longest cached chain of req's full blocks, leaving >= 1 token."""
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return blocks, hashes  # prompt logprobs need every prompt position's logits (vLLM skips the cache too)
        parent = None
        for i in range((req.num_tokens - 1) // self.block_size):
            h = hash((parent, self._block_tokens(req, i)))
            b = self.hash_to_block.get(h)
            if b is None:
                break  # the chain breaks at the first miss
            blocks.append(b)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def lookup_prefix(self, req: Request) -> int:
        """Tokens the prefix cache would serve if req were allocated now (0 unless it has no blocks yet)."""
        if not self._is_first_allocation(req):
            return 0
        return len(self._lookup(req)[0]) * self.block_size

    def cache_full_blocks(self, req: Request) -> None:
        """Register req's computed full blocks not yet registered (call after num_computed_tokens advances)."""
        if not self.enable_prefix_caching:
            return
        hashes = self._req_hashes.setdefault(req, [])
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if req.placeholder_row is not None:  # the last token is still on the device (-1 here): not hashable yet
            num_full = min(num_full, (req.num_tokens - 1) // self.block_size)
        for i in range(len(hashes), num_full):
            h = hash((hashes[-1] if hashes else None, self._block_tokens(req, i)))
            hashes.append(h)
            b = req.block_ids[i]
            if h not in self.hash_to_block and b not in self.block_hash:
                self.hash_to_block[h] = b
                self.block_hash[b] = h

    # ---- low-level block moves ---------------------------------------------------------------------------
    def _pop_free(self) -> int:
        b = self.free_blocks.popleft()
        h = self.block_hash.pop(b, None)
        if h is not None:  # evict the least recently released cached block
            del self.hash_to_block[h]
        self.ref_counts[b] = 1
        return b

    def _decref(self, b: int) -> None:
        self.ref_counts[b] -= 1
        assert self.ref_counts[b] >= 0, f"block {b} freed twice"
        if self.ref_counts[b] == 0:
            if b in self.block_hash:
                self.free_blocks.append(b)  # keep it findable; evicted last
            else:
                self.free_blocks.appendleft(b)  # nothing worth keeping: reuse first

    def _release_table(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # deep end of the chain first, so it is evicted before the root
            self._decref(b)

    # ---- allocation ----------------------------------------------------------------------------------
    @staticmethod
    def _is_first_allocation(req: Request) -> bool:
        return not req.block_ids and req.num_computed_tokens == 0

    def _num_blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Free-list blocks that allocate(req, num_new_tokens) would take."""
        if self._is_first_allocation(req):
            hit, _ = self._lookup(req)
            revived = sum(1 for b in hit if self.ref_counts[b] == 0)  # cached blocks taken off the free list
            return revived + self.blocks_for(len(hit) * self.block_size + num_new_tokens) - len(hit)
        total = self.blocks_for(req.num_computed_tokens + num_new_tokens)
        first_written = req.num_computed_tokens // self.block_size
        cow = sum(1 for b in req.block_ids[first_written:total] if self.ref_counts[b] > 1)
        return max(0, total - len(req.block_ids)) + cow

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self._num_blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Make req's table cover num_computed + num_new_tokens tokens, with private blocks where it writes.

        On the first allocation (no blocks, nothing computed) the prefix cache is applied first: hit blocks
        become the head of the table and req.num_computed_tokens / num_cached_tokens advance past them;
        num_new_tokens counts from there (use `lookup_prefix` to size it beforehand).
        """
        # The scheduler calls can_allocate first; re-checking here would double the hot path's cost.
        if self._is_first_allocation(req):
            hit, hashes = self._lookup(req)
            for b in hit:
                if self.ref_counts[b] == 0:
                    self.free_blocks.remove(b)  # revive: ref 0 -> 1
                self.ref_counts[b] += 1
            req.block_ids = list(hit)
            self._req_hashes[req] = hashes
            req.num_computed_tokens = len(hit) * self.block_size
            if req.num_output_tokens == 0:
                req.num_cached_tokens = req.num_computed_tokens
            if self.enable_prefix_caching:
                self.prefix_cache_queries += req.num_tokens
                self.prefix_cache_hits += req.num_computed_tokens
        table = req.block_ids
        total = self.blocks_for(req.num_computed_tokens + num_new_tokens)
        for i in range(req.num_computed_tokens // self.block_size, min(total, len(table))):
            src = table[i]
            if self.ref_counts[src] > 1:  # shared and about to be written: copy on write
                dst = self._pop_free()
                self.pending_copies.append((src, dst))
                self._decref(src)
                table[i] = dst
        while len(table) < total:
            table.append(self._pop_free())

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def free(self, req: Request) -> None:
        """Release all of req's device and host blocks (finish, abort, or preemption by recompute)."""
        dead = set(req.block_ids)
        # A copy into a block being released was never run and must not run into its next owner.
        self.pending_copies = [(s, d) for s, d in self.pending_copies if d not in dead]
        self._release_table(req.block_ids)
        req.block_ids = []
        self._req_hashes.pop(req, None)
        self.free_host_blocks.extend(self.host_tables.pop(req, []))

    def fork(self, parent: Request, child: Request) -> None:
        """child shares all of parent's blocks (copy-on-write when either writes a shared block)."""
        assert not child.block_ids, "child already has blocks"
        for b in parent.block_ids:
            self.ref_counts[b] += 1
        child.block_ids = list(parent.block_ids)
        self._req_hashes[child] = list(self._req_hashes.get(parent, []))

    # ---- swap ------------------------------------------------------------------------------------------
    def can_swap_out(self, req: Request) -> bool:
        return len(req.block_ids) <= self.num_free_host_blocks

    def swap_out(self, req: Request) -> list[tuple[int, int]]:
        """Move req's blocks to host; returns [(device block, host block)] in table order."""
        assert self.can_swap_out(req), "call can_swap_out first"
        # A block that is the dst of a not-yet-run copy holds nothing yet: read its src instead.
        pending_src = {d: s for s, d in self.pending_copies}
        mapping = [(pending_src.get(b, b), self.free_host_blocks.popleft()) for b in req.block_ids]
        self.host_tables[req] = [h for _, h in mapping]
        dead = set(req.block_ids)
        self.pending_copies = [(s, d) for s, d in self.pending_copies if d not in dead]
        self._release_table(req.block_ids)
        req.block_ids = []
        self._req_hashes.pop(req, None)  # rebuilt by cache_full_blocks after swap-in
        return mapping

    def can_swap_in(self, req: Request, num_new_tokens: int = 0) -> bool:
        """Room to bring req back and then allocate(req, num_new_tokens)."""
        total = self.blocks_for(req.num_computed_tokens + num_new_tokens)
        return max(len(self.host_tables[req]), total) <= self.num_free_blocks

    def swap_in(self, req: Request) -> list[tuple[int, int]]:
        """Bring req's blocks back into fresh device blocks; returns [(host block, device block)]."""
        host = self.host_tables.pop(req)
        assert len(host) <= self.num_free_blocks, "call can_swap_in first"
        req.block_ids = [self._pop_free() for _ in host]
        self.free_host_blocks.extend(host)
        return list(zip(host, req.block_ids))
