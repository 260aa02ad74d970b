"""Paged decode attention in Pallas, Mosaic GPU lowering (Hopper: TMA + wgmma).

Design note.
- Same contract and split-K scheme as paged_decode.py (the Triton twin): one CUDA block per (kv head h,
  sequence b, split s) owns all G query heads of kv head h. wgmma needs M = 64 rows, so the group sits in rows
  0..Gp-1 (Gp = G rounded up to 8, the TMA tile) of a zeroed 64-row q tile in shared memory; the padded rows
  cost tensor-core time only, which decode has to spare (it is bound by KV bytes).
- K/V stay in the cache layout [Hkv, N, S, D]. Each step covers `keys_per_step` keys = ppcb pages; the block
  issues one TMA copy per page (a page of one kv head is a contiguous [S, D] tile) into a `num_stages`-deep ring
  of shared-memory slots, so the copies for the next steps are in flight while wgmma and the softmax run on
  this one. A slot's barrier expects ppcb arrivals (one per page copy).
- Keys past seq_len inside the last step (the tail of the last page, and pages past the sequence, which the
  table pads with in-range ids) are masked to -inf in the logits; V rows there are zeroed in shared memory
  before the PV product, since 0 * NaN would poison the output (tests fill unused slots with NaN).
- The softmax runs in base 2 with the scale folded into one multiply (exp2 is a single MUFU op); lse is
  written back in natural log for merge_splits, shared with the Triton kernel.
- bf16/f16 only (wgmma has no f32 operands); f32 callers use the Triton kernel. keys_per_step must be a
  multiple of 64 (the wgmma layout of the V tile that is masked) and of the block size.
- The Mosaic GPU interpreter (`interpret=True` here -> plgpu's CPU interpreter) runs it in the CPU tests; the
  same kernel lowers to Mosaic GPU IR on a CPU host (tests/gpu_lowering.py), which catches layout errors
  before any GPU time is spent.
Measurements: docs/PERF.md (scripts/bench_kernels.py, "mosaic" column).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxserve.pallas_kernels.checks import check_paged_args
from jaxserve.pallas_kernels.paged_decode import group_queries, grouped_decode, ungrouped_shape

_ROWS = 64  # wgmma's M
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_SMEM_BUDGET = 220 * 1024
_TARGET_BLOCKS = 132  # one block per H100 SM; the ring of TMA copies keeps each SM's memory pipe busy


@dataclasses.dataclass(frozen=True)
class MosaicDecodeTuning:
    """keys_per_step: keys per wgmma step (multiple of 64 and of the block size); 0 = 128 (64 when batch x kv
    heads < 32), or the block size if larger. num_stages: depth of the TMA ring (trimmed to fit shared memory).
    num_splits: split-K partitions; 0 = fill the SMs.
    workers: 0 = one CUDA block per (kv head, sequence, split); else the persistent kernel, whose blocks each take
    a run of (sequence, kv head) items with one TMA ring across them (-1: one block per SM). See `_persistent_call`.

    The auto choices come from the H100 sweep (docs/PERF.md, session 3): 128 keys per step was the best tuning
    at B=8, 64 and 256 (ctx 2048) and at B=8 ctx 8192, by 1-6%; at B=1 64 keys and more splits did better."""
    keys_per_step: int = 0
    num_stages: int = 4
    num_splits: int = 0
    workers: int = 0

    def resolve(self, batch: int, num_kv_heads: int, pages_per_seq: int, block_size: int,
                head_dim: int, itemsize: int) -> "MosaicDecodeTuning":
        keys = self.keys_per_step or max(64 if batch * num_kv_heads < 32 else 128, block_size)
        if keys % 64 or keys % block_size:
            raise ValueError(f"keys_per_step {keys} must be a multiple of 64 and of block_size {block_size}")
        ppcb = keys // block_size
        steps_per_seq = -(-pages_per_seq // ppcb)
        splits, workers = self.num_splits, self.workers
        if workers:  # persistent: no split; a worker's items share one ring
            splits = 1
            workers = min(_num_sms() if workers < 0 else workers, batch * num_kv_heads)
        elif splits == 0:
            want = max(1, _TARGET_BLOCKS // max(1, batch * num_kv_heads))
            splits = max(1, min(want, steps_per_seq // 2, 16))
        persistent = bool(workers)
        # Where even one stage is too big (head_dim 256 at 128 keys), an automatic key count halves within its
        # rules; then the ring takes as many of the asked stages as fit.
        while (_smem_bytes(keys, 1, head_dim, itemsize, persistent) > _SMEM_BUDGET and not self.keys_per_step
               and keys // 2 >= 64 and (keys // 2) % 64 == 0 and (keys // 2) % block_size == 0):
            keys //= 2
        stages = self.num_stages
        while stages > 1 and _smem_bytes(keys, stages, head_dim, itemsize, persistent) > _SMEM_BUDGET:
            stages -= 1
        if _smem_bytes(keys, stages, head_dim, itemsize, persistent) > _SMEM_BUDGET:
            raise ValueError(f"the Mosaic decode kernel does not fit shared memory at head_dim {head_dim}, "
                             f"{keys} keys per step (block_size {block_size}): "
                             f"{_smem_bytes(keys, stages, head_dim, itemsize, persistent)} > {_SMEM_BUDGET} bytes")
        return dataclasses.replace(self, keys_per_step=keys, num_stages=stages, num_splits=splits, workers=workers)


def _smem_bytes(keys: int, stages: int, head_dim: int, itemsize: int, persistent: bool) -> int:
    """Shared memory of one block: the K/V ring, plus two q and two output tiles (persistent) or one q tile, an f32
    output tile and the lse row (grid)."""
    fixed = (4 * _ROWS * head_dim * itemsize if persistent
             else _ROWS * head_dim * (itemsize + 4) + 4 * _ROWS)
    return fixed + stages * 2 * keys * head_dim * itemsize


def _num_sms() -> int:
    """Streaming multiprocessors of the default device (an H100's 132 where jax does not say, e.g. on CPU)."""
    dev = jax.devices()[0]
    n = getattr(dev, "core_count", 0) if dev.platform == "gpu" else 0
    return n or _TARGET_BLOCKS


DEFAULT_MOSAIC_DECODE = MosaicDecodeTuning()


def _tiled(shape, dtype):
    """Shared memory in the wgmma operand layout: (8, 128 bytes) tiles, 128-byte swizzle."""
    minor = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128)))


class PageRing:
    """A `stages`-deep ring of shared-memory K/V slots filled by TMA, `ppcb` page copies per step of T keys.

    Step c (of c0..c1) goes to slot (c - c0) % stages; a slot's barrier expects ppcb arrivals (one per copy).
    page(i) -> the page id of the sequence's i-th page (a scalar read from the block table in GMEM)."""

    def __init__(self, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, page, h, ppcb, stages, c0, c1):
        self.k_ref, self.v_ref, self.k_smem, self.v_smem = k_ref, v_ref, k_smem, v_smem
        self.k_bar, self.v_bar, self.page, self.h = k_bar, v_bar, page, h
        self.ppcb, self.stages, self.c0, self.c1 = ppcb, stages, c0, c1
        self.S = k_ref.shape[2]
        self.T = k_smem.shape[1]

    def issue(self, c, slot, k=True, v=True):
        """Step c's page copies into `slot`: keys, values or both (a producer warpgroup refills K and V apart,
        as each is released)."""
        S = self.S
        for j in range(self.ppcb):
            page = self.page(c * self.ppcb + j)
            if k:
                plgpu.copy_gmem_to_smem(self.k_ref.at[self.h, page], self.k_smem.at[slot, pl.ds(j * S, S)],
                                        self.k_bar.at[slot])
            if v:
                plgpu.copy_gmem_to_smem(self.v_ref.at[self.h, page], self.v_smem.at[slot, pl.ds(j * S, S)],
                                        self.v_bar.at[slot])

    def prime(self):
        for i in range(self.stages):
            @pl.when(self.c0 + i < self.c1)
            def _():
                self.issue(self.c0 + i, i)


def online_softmax(s, c, m_i, l_i, acc, *, qk_scale: float, mask=None):
    """One step of the online softmax in base 2: s f32[64, T] raw logits of step c (keys c*T ..), m_i/l_i f32[64]
    (m in log2 units), acc f32[64, D] -> (p f32[64, T], m_new, l_new, acc rescaled). mask(s, key) masks the
    scaled logits given the keys' positions (None: every key is seen)."""
    s = s * qk_scale  # (64, T) in log2 units
    if mask is not None:
        key = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + c * s.shape[1]
        s = mask(s, key)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p, m_new, l_i, acc


def zero_v_tail(ring: PageRing, c, slot, kv_len):
    """On the step that holds key kv_len - 1, zero the V rows at or past kv_len in the slot: they may be NaN, and
    0 * NaN would poison the PV product."""
    T, D = ring.T, ring.v_smem.shape[2]

    @pl.when((c + 1) * T > kv_len)
    def _():
        row = plgpu.broadcasted_iota(jnp.int32, (T, D), 0, layout=plgpu.Layout.WGMMA) + c * T
        v = ring.v_smem.at[slot]
        v[...] = jnp.where(row < kv_len, v[...], jnp.zeros((T, D), v.dtype))
        plgpu.commit_smem()


def qk_product(q_smem, k_slot, *, interpret: bool, during=None):
    """q_smem [64, D] x k_slot [T, D]^T -> f32[64, T] (wgmma). during() runs while the wgmma is in flight (FA3's
    schedule barrier). The CPU interpreter has no wgmma: there the same product is a jnp dot."""
    if interpret:
        s = lax.dot_general(q_smem[...], k_slot[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if during is not None:
            during()
        return s

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_slot.transpose((1, 0)))
        if during is not None:
            during()
        return acc_ref[...]
    return pl.run_scoped(qk, plgpu.ACC((q_smem.shape[0], k_slot.shape[0]), jnp.float32))


def pv_product(acc, p, v_slot, *, interpret: bool, during=None):
    """acc f32[64, D] + p [64, T] x v_slot [T, D] (wgmma). during() runs while the wgmma is in flight."""
    if interpret:
        acc = acc + jnp.dot(p, v_slot[...], preferred_element_type=jnp.float32)
        if during is not None:
            during()
        return acc

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_slot)
        if during is not None:
            during()
    return pl.run_state(pv)(plgpu.ACC.init(acc))


def softmax_init(head_dim: int):
    """(acc, m, l) before the first step, in the wgmma register layouts."""
    return (plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))


def attend_pages(ring: PageRing, q_smem, *, kv_len, mask, qk_scale: float, interpret: bool, release=None,
                 unmasked_until=None):
    """Online softmax of the 64 query rows in q_smem over the ring's steps c0..c1 -> (acc f32[64, D], m f32[64]
    in log2 units, l f32[64]). mask(s, key) masks the (64, T) logits given the keys' positions; V rows at or
    past kv_len are zeroed in shared memory on the step that holds them (they may be NaN).

    release(c, slot) runs once step c is done with its slot; by default it refills the slot with step
    c + stages (one warpgroup owns the ring). Warpgroups sharing a ring pass their own.

    unmasked_until: steps c < unmasked_until hold only keys that every row sees (and none at or past kv_len);
    they run in a first loop without the mask's iota/select and the V zeroing (FA3 splits its loop the same
    way). None: every step is masked."""
    D, stages, c0 = q_smem.shape[1], ring.stages, ring.c0
    dtype = ring.k_smem.dtype

    def step(c, carry, masked=True):
        acc, m_i, l_i = carry
        slot = lax.rem(c - c0, stages)
        plgpu.barrier_wait(ring.k_bar.at[slot])
        s = qk_product(q_smem, ring.k_smem.at[slot], interpret=interpret)
        p, m_new, l_i, acc = online_softmax(s, c, m_i, l_i, acc, qk_scale=qk_scale, mask=mask if masked else None)
        plgpu.barrier_wait(ring.v_bar.at[slot])
        if masked:
            zero_v_tail(ring, c, slot, kv_len)
        acc = pv_product(acc, p.astype(dtype), ring.v_smem.at[slot], interpret=interpret)

        if release is None:
            @pl.when(c + stages < ring.c1)  # the slot is free again: refill it
            def _():
                ring.issue(c + stages, slot)
        else:
            release(c, slot)
        return acc, m_new, l_i

    init = softmax_init(D)
    if unmasked_until is None:
        return lax.fori_loop(c0, ring.c1, step, init)
    split = jnp.clip(unmasked_until, c0, ring.c1)
    carry = lax.fori_loop(c0, split, functools.partial(step, masked=False), init)
    return lax.fori_loop(split, ring.c1, step, carry)


def _decode_call(q4, k_pages, v_pages, block_tables, seq_lens, *, scale: float, tune: MosaicDecodeTuning,
                 interpret: bool):
    """q4 [B, Hkv, Gp, D] -> (o f32[splits, B, Hkv, Gp, D], lse f32[splits, B, Hkv, Gp])."""
    B, Hkv, Gp, D = q4.shape
    _, _, S, _ = k_pages.shape
    dtype = k_pages.dtype
    T, stages, splits = tune.keys_per_step, tune.num_stages, tune.num_splits
    ppcb = T // S
    P = block_tables.shape[1]
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # the last step may run past P; pads = page 0
    qk_scale = scale * _LOG2E

    def kernel(bt_ref,  # i32[B, P']           block tables (GMEM; scalars read per page)
               len_ref,  # i32[B]              context lengths
               q_ref,  # [B, Hkv, Gp, D]       query groups
               k_ref,  # [Hkv, N, S, D]        key pages
               v_ref,  # [Hkv, N, S, D]        value pages
               o_ref,  # f32[splits, B, Hkv, Gp, D]
               lse_ref,  # f32[splits, B, Hkv, Gp]
               q_smem,  # [64, D]              rows >= Gp stay zero
               k_smem,  # [stages, T, D]
               v_smem,  # [stages, T, D]
               o_smem,  # f32[64, D]
               lse_smem,  # f32[64]
               q_bar, k_bar, v_bar):
        h, b, split = lax.axis_index("h"), lax.axis_index("b"), lax.axis_index("s")
        seq_len = len_ref[b]
        n_steps = (seq_len + T - 1) // T
        per_split = (n_steps + splits - 1) // splits
        c0 = split * per_split
        c1 = jnp.minimum(c0 + per_split, n_steps)

        q_smem[...] = plgpu.layout_cast(jnp.zeros((_ROWS, D), dtype), plgpu.Layout.WGMMA)
        plgpu.commit_smem()  # the zeros land before the TMA writes rows 0..Gp-1
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem.at[pl.ds(0, Gp)], q_bar.at[0])

        ring = PageRing(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, lambda i: bt_ref[b, i], h, ppcb, stages, c0, c1)
        ring.prime()
        plgpu.barrier_wait(q_bar.at[0])

        def mask(s, key):  # (64, T) logits, key positions
            return jnp.where(key < seq_len, s, -jnp.inf)

        acc, m_i, l_i = attend_pages(ring, q_smem, kv_len=seq_len, mask=mask, qk_scale=qk_scale, interpret=interpret,
                                     unmasked_until=seq_len // T)  # whole steps below seq_len need no mask
        nonempty = l_i > 0
        l_safe = jnp.where(nonempty, l_i, jnp.ones_like(l_i))
        o_smem[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        lse_smem[...] = jnp.where(nonempty, m_i * _LN2 + jnp.log(l_safe), jnp.full_like(l_i, -jnp.inf))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, Gp)], o_ref.at[split, b, h])
        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, Gp)], lse_ref.at[split, b, h])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((splits, B, Hkv, Gp, D), jnp.float32),
                  jax.ShapeDtypeStruct((splits, B, Hkv, Gp), jnp.float32)],
        scratch_types=[
            _tiled((_ROWS, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((_ROWS, D), jnp.float32),
            plgpu.SMEM((_ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
        ],
        grid=(Hkv, B, splits),
        grid_names=("h", "b", "s"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"paged_decode_mgpu_T{T}_st{stages}_sp{splits}",
    )(block_tables, seq_lens, q4, k_pages, v_pages)


def work_starts(seq_lens, num_kv_heads: int, keys_per_step: int, workers: int):
    """i32[workers + 1]: worker w of the persistent kernel takes items starts[w] .. starts[w + 1] - 1, where item
    i is (sequence i // Hkv, kv head i % Hkv). Runs are cut where the items' running cost (steps + 1, the one
    for each item's q load and output store) crosses w / workers of the total, so long and short sequences
    spread evenly. searchsorted by compare_all: its default method is a loop (a GPU while loop)."""
    cost = jnp.repeat((seq_lens + keys_per_step - 1) // keys_per_step + 1, num_kv_heads)  # (B * Hkv,), >= 1
    before = jnp.cumsum(cost) - cost  # each item's exclusive running cost
    bounds = jnp.arange(workers + 1, dtype=jnp.int32) * jnp.sum(cost) // workers
    return jnp.searchsorted(before, bounds, side="left", method="compare_all").astype(jnp.int32)


def _persistent_call(q4, k_pages, v_pages, block_tables, seq_lens, *, G: int, scale: float,
                     tune: MosaicDecodeTuning, interpret: bool):
    """q4 [B, Hkv, Gp, D] -> o [B, Hkv * G, D] in q's dtype, by `tune.workers` persistent CUDA blocks.

    Why. With one block per (sequence, kv head), a short context is 2-4 steps of keys: the block's ring of page
    copies never fills, and each block pays its own start (q load, ring prime) and end (store) with the memory
    pipe idle (the grid kernel read KV at 2.0-2.4 TB/s at the serving benchmark's contexts, docs/PERF.md).
    Here a block walks a run of items (work_starts) and its ring runs across them: while it computes one
    item's last steps, the copies of the next item's first steps are in flight. A cursor (pi, pc) names the
    next step to copy; releasing a slot copies the cursor's step into it and moves the cursor on, past items
    with no steps (padding rows). K is refilled as soon as QK is done with its slot, V after PV. q is
    double-buffered (the next item's q is loaded while this one runs) and so is the output tile, whose TMA
    store to o[b, h*G:(h+1)*G] (q's dtype, the caller's layout) may still be reading when the next item starts.
    One split per item, so this is for batches whose items fill the GPU; the grid kernel keeps small ones."""
    B, Hkv, Gp, D = q4.shape
    _, _, S, _ = k_pages.shape
    dtype = k_pages.dtype
    T, stages, W = tune.keys_per_step, tune.num_stages, tune.workers
    ppcb = T // S
    n_items = B * Hkv
    P = block_tables.shape[1]
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # the last step may run past P; pads = page 0
    starts = work_starts(seq_lens, Hkv, T, W)
    qk_scale = scale * _LOG2E

    def kernel(bt_ref,  # i32[B, P']          block tables (GMEM; scalars read per page)
               len_ref,  # i32[B]             context lengths
               start_ref,  # i32[W + 1]       each worker's first item
               q_ref,  # [B, Hkv, Gp, D]       query groups
               k_ref,  # [Hkv, N, S, D]        key pages
               v_ref,  # [Hkv, N, S, D]        value pages
               o_ref,  # [B, Hkv * G, D]       output, q's dtype
               q_smem,  # [2, 64, D]           double-buffered q tiles; rows >= Gp stay zero
               k_smem,  # [stages, T, D]
               v_smem,  # [stages, T, D]
               o_smem,  # [2, 64, D]           double-buffered output tiles (untiled: G rows go out by TMA)
               q_bar, k_bar, v_bar):
        w = lax.axis_index("w")
        i0, i1 = start_ref[w], start_ref[w + 1]

        def steps_of(i):
            return (len_ref[jnp.minimum(i, n_items - 1) // Hkv] + T - 1) // T

        def advance(i, c):
            """(i, c) if item i has a step c, else the first step of the next item with steps (i1: none left)."""
            return lax.while_loop(lambda ic: (ic[0] < i1) & (ic[1] >= steps_of(ic[0])),
                                  lambda ic: (ic[0] + 1, jnp.int32(0)), (i, c))

        def issue(i, c, slot, k, v):
            b, h = i // Hkv, lax.rem(i, Hkv)
            for j in range(ppcb):
                page = bt_ref[b, c * ppcb + j]
                if k:
                    plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, pl.ds(j * S, S)], k_bar.at[slot])
                if v:
                    plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, pl.ds(j * S, S)], v_bar.at[slot])

        def load_q(i, buf):
            plgpu.copy_gmem_to_smem(q_ref.at[i // Hkv, lax.rem(i, Hkv)], q_smem.at[buf, pl.ds(0, Gp)], q_bar.at[buf])

        for buf in range(2):
            q_smem.at[buf][...] = plgpu.layout_cast(jnp.zeros((_ROWS, D), dtype), plgpu.Layout.WGMMA)
        plgpu.commit_smem()  # the zeros land before the TMA writes rows 0..Gp-1

        @pl.when(i0 < i1)
        def _():
            load_q(i0, 0)

        pi, pc = advance(i0, jnp.int32(0))
        for slot in range(stages):  # prime the ring: the first `stages` steps of the run, across items
            @pl.when(pi < i1)
            def _():
                issue(pi, pc, slot, True, True)
            pi, pc = advance(pi, pc + 1)
        tail = PageRing(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, None, None, ppcb, stages, 0, 0)

        def item(i, carry):
            g, pi, pc = carry  # g: steps consumed so far (step g + c uses slot (g + c) % stages)
            b, h = i // Hkv, lax.rem(i, Hkv)
            seq_len = len_ref[b]
            n = (seq_len + T - 1) // T
            buf = lax.rem(i - i0, 2)

            @pl.when(i + 1 < i1)
            def _():
                load_q(i + 1, 1 - buf)  # item i - 1, the last reader of that buffer, is done
            plgpu.barrier_wait(q_bar.at[buf])
            q_tile = q_smem.at[buf]

            def mask(s, key):
                return jnp.where(key < seq_len, s, -jnp.inf)

            def step(c, carry, masked):
                acc, m_i, l_i, pi, pc = carry
                slot = lax.rem(g + c, stages)
                more = pi < i1  # the cursor's step goes into this slot, K now, V after PV
                plgpu.barrier_wait(k_bar.at[slot])
                s = qk_product(q_tile, k_smem.at[slot], interpret=interpret)

                @pl.when(more)
                def _():
                    issue(pi, pc, slot, True, False)
                p, m_new, l_i, acc = online_softmax(s, c, m_i, l_i, acc, qk_scale=qk_scale,
                                                    mask=mask if masked else None)
                plgpu.barrier_wait(v_bar.at[slot])
                if masked:
                    zero_v_tail(tail, c, slot, seq_len)
                acc = pv_product(acc, p.astype(dtype), v_smem.at[slot], interpret=interpret)

                @pl.when(more)
                def _():
                    issue(pi, pc, slot, False, True)
                pi, pc = advance(pi, pc + 1)
                return acc, m_new, l_i, pi, pc

            full = seq_len // T  # steps whose keys all count: no mask, no V zeroing
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (*softmax_init(D), pi, pc))
            acc, _, l_i, pi, pc = lax.fori_loop(full, n, functools.partial(step, masked=True), carry)
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))  # no keys (padding row): zeros
            out = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from this tile two items ago has read it
            o_smem.at[buf][...] = out
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[buf, pl.ds(0, G)], o_ref.at[b, pl.ds(h * G, G)])
            return g + n, pi, pc

        lax.fori_loop(i0, i1, item, (jnp.int32(0), pi, pc))
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((B, Hkv * G, D), dtype),
        scratch_types=[
            _tiled((2, _ROWS, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((stages, T, D), dtype),
            plgpu.SMEM((2, _ROWS, D), dtype),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
        ],
        grid=(W,),
        grid_names=("w",),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"paged_decode_mgpu_persistent_T{T}_st{stages}_w{W}",
    )(block_tables, seq_lens, starts, q4, k_pages, v_pages)


def supports(q, k_pages) -> bool:
    """Whether paged_decode_mgpu takes these operands (the backend falls back to the Triton kernel if not)."""
    try:
        check_mosaic_args(q, k_pages)
    except ValueError:
        return False
    return True


def check_mosaic_args(q, k_pages) -> None:
    """What the Mosaic kernel needs beyond check_paged_args (ValueError otherwise)."""
    Hkv, _, S, D = k_pages.shape
    G = q.shape[1] // Hkv
    if k_pages.dtype not in (jnp.bfloat16, jnp.float16) or q.dtype != k_pages.dtype:
        raise ValueError(f"the Mosaic decode kernel takes bf16/f16 q and pages of one dtype, got {q.dtype}, "
                         f"{k_pages.dtype}")
    if D % 64:
        raise ValueError(f"head_dim must be a multiple of 64, got {D}")
    if G > _ROWS:
        raise ValueError(f"at most {_ROWS} query heads per kv head, got {G}")
    if S % 8:
        raise ValueError(f"block_size must be a multiple of 8, got {S}")
    keys = math.lcm(64, S)  # the fewest keys per step this block size allows, one stage
    if max(_smem_bytes(keys, 1, D, k_pages.dtype.itemsize, p) for p in (False, True)) > _SMEM_BUDGET:
        raise ValueError(f"head_dim {D} with block_size {S} does not fit the Mosaic decode kernel's shared memory")


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "group", "interpret"))
def paged_decode_mgpu(q, k_pages, v_pages, block_tables, seq_lens, *, scale: float | None = None,
                      tuning: MosaicDecodeTuning = DEFAULT_MOSAIC_DECODE, group: int | None = None,
                      interpret: bool = False):
    """Paged GQA decode attention (Mosaic GPU); same contract as paged_decode.paged_decode.

    Args:
      q: bf16/f16 [batch, num_q_heads, head_dim] (one new token per sequence); or, with `group` given, already in
        the kernel's padded groups [batch, num_kv_heads, decode_group_rows(group), head_dim] (rope_kv_write's q).
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim], q's dtype; block 0 is the null page.
      block_tables: i32[batch, pages_per_seq]; entries past a sequence's pages may be anything in range.
      seq_lens: i32[batch] context length including the new token; 0 (padding row) gives zeros.
      scale: softmax scale, default 1/sqrt(head_dim).
      tuning: MosaicDecodeTuning; 0 fields are picked from the shapes.
      group: query heads per kv head when q comes grouped (None: q is [batch, num_q_heads, head_dim]).
      interpret: run Mosaic GPU's CPU interpreter (CPU tests).
    Returns:
      [batch, num_q_heads, head_dim] in q.dtype.
    """
    q3 = ungrouped_shape(q, k_pages, group, decode_group_rows)
    check_paged_args(q3, k_pages, v_pages, block_tables, "B")
    check_mosaic_args(q3, k_pages)
    if tuning.workers:
        return _persistent(q, k_pages, v_pages, block_tables, seq_lens, scale=scale, tuning=tuning, group=group,
                           interpret=interpret)
    return grouped_decode(_decode_call, q, k_pages, v_pages, block_tables, seq_lens, scale=scale, tuning=tuning,
                          group_padded=decode_group_rows(q3.shape[1] // k_pages.shape[0]), interpret=interpret,
                          group=group)


def decode_group_rows(group: int) -> int:
    """Rows per kv head of this kernel's q groups: G rounded up to the TMA tile's 8 rows."""
    return -(-group // 8) * 8


def _persistent(q, k_pages, v_pages, block_tables, seq_lens, *, scale, tuning: MosaicDecodeTuning, group,
                interpret: bool):
    """paged_decode_mgpu by the persistent kernel: q grouped as the grid kernel takes it, the output written by
    the kernel in [B, Hq, D] (no merge, no slice after it)."""
    Hkv, _, S, D = k_pages.shape
    gp = decode_group_rows(q.shape[1] // Hkv) if group is None else q.shape[2]
    q, G, scale = group_queries(q, k_pages, seq_lens, scale=scale, group=group, group_padded=gp)
    tune = tuning.resolve(q.shape[0], Hkv, block_tables.shape[1], S, D, k_pages.dtype.itemsize)
    return _persistent_call(q, k_pages, v_pages, block_tables, seq_lens, G=G, scale=scale, tune=tune,
                            interpret=interpret)
