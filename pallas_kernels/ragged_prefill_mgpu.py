"""Ragged paged prefill attention in Pallas, Mosaic GPU lowering (Hopper: TMA + wgmma).

Design note.
- Same contract and work items as ragged_prefill.py (the Triton twin): the flat token axis is cut per sequence into
  tiles of bq tokens (`work_items`), the grid is (work items, kv heads), and a tile's rows are its bq tokens x the
  Gp = next_pow2(G) query heads of one kv head, so K/V pages are read once per tile for the whole group. wgmma's M
  is 64 rows per warpgroup. With `warpgroups=2` (FA3's layout) a tile has 128 rows, bq = 128 / Gp, and both
  warpgroups consume every K/V step that warpgroup 0 loads: a `consumed` barrier per ring slot (two arrivals) tells
  warpgroup 0 when it may refill the slot. That variant lowers for an H100. Warpgroup 0 waits on every `consumed`
  phase, also on the last steps that refill nothing: skipping those left its phase count behind the barrier's, which
  Mosaic GPU's CPU interpreter rejects when the barrier is freed (found in session 5; harmless on a GPU, where no
  wait follows, but wrong by the barrier protocol). Our reading of the interpreter's "hangs at times" of sessions 3
  and 4 (not of the kernel): each warpgroup runs as a thread with its own nested XLA CPU computation whose barrier
  waits block in host callbacks, and with one CPU device on a 2-core host the CPU client runs out of threads: the
  same cases hang there and pass 6 times out of 6 with 8 host devices, so the CPU tests run them in a child process
  with 8 host devices. Without a producer, two warpgroups were no faster than one on the H100 (session 5).
- Producer warpgroup (`producer=True`; FA3_TUNING, session 8). A third warpgroup only issues the K/V copies and
  gives its registers to the compute warpgroups (setmaxnreg 40 / 232). K and V are released apart (`k_free`,
  `v_free`): the producer refills a slot's K once both compute warpgroups' QK is done with it, while their PV still
  reads its V. With two compute warpgroups a `sched` barrier makes them take turns on the tensor cores (FA3's
  ping-pong): one's softmax runs while the other's QK and PV run. A tile whose tokens all fall to warpgroup 0
  (a decode row in a mixed step, a short last tile) leaves warpgroup 1 with only the barrier turns
  (`_idle_turns`). On the H100, 8 x 2048 tokens: 54.4-56.7% of the matmul rate against one warpgroup's
  47.0-48.1% (docs/PERF.md, session 8). Why the protocol holds: each compute warpgroup arrives on `sched` 2 c1 + 1
  times on every path (active or idle, masked or not) and waits right after each arrival, so every phase has one
  arrival from each; a slot's K (V) is refilled only after both warpgroups' QK (PV) read it, and the V-tail
  zeroing writes only on step c1 - 1, which is never refilled; the producer waits on every k_free/v_free phase.
  Mosaic GPU's race detector cannot check this in jax 0.11.2: it flags every TMA refill, also in the
  one-warpgroup kernel.
- Padding tokens. Work items with nq < 0 (`zero_fill_items`) store zeros into the padding rows, so every row of o
  is written by the kernel and no select pass follows it (162 us of a 1,001 us call in session 6).
- Keys come through the same TMA ring of page copies as the decode kernel (paged_decode_mgpu.PageRing,
  attend_pages): steps of T keys from position 0 to the tile's last query position; the causal mask is
  key <= the row's query position. Rows past the tile's tokens compute garbage that nothing reads.
- Rows of a tile. With Gp <= 8 (every model we ship: G = 1, 3, 4, 7, 8) the kernel reads q in place: warpgroup
  wg takes the tile's tokens wg*bw .. wg*bw + bw - 1 (bw = 64 / Gp, a multiple of 8), head-major (row g*bw + j
  is query head h*G + g of token j), one strided TMA copy per head. TMA writes the wgmma-tiled layout only at
  row offsets that are multiples of 8, and a sequence's tokens start anywhere, so the rows land in plain shared
  memory and pass through registers into the tiled buffer. The output goes back the same way, into the staging
  rows, and leaves in token order straight into o [T, Hq * D]: one TMA store per head of a warpgroup's full
  block, and a sequence's partial last block in boxes of 2^k rows (the binary digits of its row count), so that
  no store touches another sequence's rows. A tile that runs past the last token reads zeros (TMA's
  out-of-bounds fill). Session 4's layout gathered q into tile-major rows and the output back, with transposes,
  outside the kernel: on the H100 that was 30% of the call (1,111 us vs 786 us for the kernel alone, 8 x 2048
  tokens). It stays for Gp > 8. Session 5's direct layout stored tile-major rows and gathered them back into
  token order after the kernel (204 us of a 1,023 us call); session 6 stores them in order.
- Shared memory per tile: q rows (reused for the output), the q staging rows and the K/V ring. With 64 keys per
  step and a 2-deep ring a one-warpgroup tile takes 96 KB, so two tiles share an SM; the H100 sweep found a
  deeper ring (one tile per SM) a third slower.
- bf16/f16 only (wgmma has no f32 operands), head dim a multiple of 64, G <= 64.
- The engine runs it under pallas_mosaic when select.MOSAIC_PREFILL_WARPGROUPS (or --mosaic-prefill-warpgroups)
  is 1, 2 or 3 (3, the default: FA3_TUNING for steps of >= FA3_MIN_TOKENS tokens, one warpgroup below);
  scripts/bench_kernels.py times it as "ours_mosaic" and "ours_mosaic_fa3" beside the Triton kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxserve.pallas_kernels.checks import check_ragged_args
from jaxserve.pallas_kernels.paged_decode_mgpu import (_LOG2E, _ROWS, PageRing, _tiled, attend_pages,
                                                       check_mosaic_args, online_softmax, pv_product, qk_product,
                                                       softmax_init, zero_v_tail)
from jaxserve.pallas_kernels.ragged_prefill import work_items
from jaxserve.pallas_kernels.reference import default_scale
from jaxserve.pallas_kernels.tuning import next_pow2


@dataclasses.dataclass(frozen=True)
class MosaicPrefillTuning:
    """keys_per_step: keys per wgmma step (a multiple of 64 and of the block size; 0 = 64 or the block size).
    num_stages: depth of the TMA ring (trimmed to fit shared memory). warpgroups: 1 or 2 compute warpgroups per
    tile, 64 query rows each; two share every K/V tile they load, which halves the K/V reads per query row.
    producer: one more warpgroup that only issues the K/V copies (FA3's warp specialization: it gives its
    registers to the compute warpgroups, and K is refilled as soon as QK is done with it); with two compute
    warpgroups they also take turns on the tensor cores (FA3's ping-pong), so one's softmax overlaps the other's
    matmuls.

    Defaults from the H100 sweep (docs/PERF.md, session 5): 64 keys and a 2-deep ring were the best one-warpgroup
    tuning on both cases, where a deeper ring (one tile per SM) lost a third."""
    keys_per_step: int = 0
    num_stages: int = 2
    warpgroups: int = 1
    producer: bool = False

    def resolve(self, block_size: int, head_dim: int, itemsize: int) -> "MosaicPrefillTuning":
        keys = self.keys_per_step or max(64, block_size)
        if keys % 64 or keys % block_size:
            raise ValueError(f"keys_per_step {keys} must be a multiple of 64 and of block_size {block_size}")
        if self.warpgroups not in (1, 2):
            raise ValueError(f"warpgroups must be 1 or 2, got {self.warpgroups}")
        fixed = self._fixed_smem(head_dim, itemsize)
        while keys > 64 and (keys // 2) % block_size == 0 and fixed + 2 * keys * head_dim * itemsize > _SMEM:
            keys //= 2  # one stage must fit (head dim 256 with two warpgroups)
        stages = self.num_stages
        while stages > 1 and fixed + stages * 2 * keys * head_dim * itemsize > _SMEM:
            stages -= 1
        return dataclasses.replace(self, keys_per_step=keys, num_stages=stages)

    def _fixed_smem(self, head_dim: int, itemsize: int) -> int:
        return 2 * self.warpgroups * _ROWS * head_dim * itemsize  # q tiles (later the output) + q staging

    def fits(self, block_size: int, head_dim: int, itemsize: int) -> bool:
        """Whether the resolved tuning's shared memory fits an H100 SM (it may not with two warpgroups, head dim
        256 and 128-token blocks)."""
        t = self.resolve(block_size, head_dim, itemsize)
        return self._fixed_smem(head_dim, itemsize) + t.num_stages * 2 * t.keys_per_step * head_dim * itemsize <= _SMEM


_SMEM = 220 * 1024  # shared memory a tile may take (an H100 SM has 227 KB)

# FA3's forward layout (two compute warpgroups of 64 rows taking turns on the tensor cores, a producer warpgroup,
# 128 keys per step in a 2-deep ring): --mosaic-prefill-warpgroups 3 in the engine.
FA3_TUNING = MosaicPrefillTuning(keys_per_step=128, num_stages=2, warpgroups=2, producer=True)

# Choice 3 takes FA3_TUNING for steps of at least this many tokens and one warpgroup below. With FA3's layout in
# all ten prefill buckets the warm start took 20.9-23.4 s against 19.9-20.2 s on one H100 (docs/PERF.md, session 8;
# our reading: each step shape's Mosaic kernel is built again when its cached program loads, and the FA3 kernel
# takes longer to build), while the small steps (a 320-prompt burst's) gained nothing measurable.
FA3_MIN_TOKENS = 2048


def prefill_tuning(choice: int, num_tokens: int | None = None, k_pages=None) -> MosaicPrefillTuning:
    """--mosaic-prefill-warpgroups 1 or 2 (compute warpgroups per tile) or 3 (FA3_TUNING for steps of at least
    FA3_MIN_TOKENS tokens, one warpgroup below; None tokens: FA3) -> the kernel's tuning. With k_pages given, a
    two-warpgroup tuning whose shared memory does not fit (head dim 256, 128-token blocks) falls back to one."""
    if choice == 3:
        tune = FA3_TUNING if num_tokens is None or num_tokens >= FA3_MIN_TOKENS else MosaicPrefillTuning()
    else:
        tune = MosaicPrefillTuning(warpgroups=choice)
    if k_pages is not None and not tune.fits(k_pages.shape[2], k_pages.shape[3], k_pages.dtype.itemsize):
        return MosaicPrefillTuning()
    return tune


# Registers per thread with a producer warpgroup (setmaxnreg): the producer needs few, the compute warpgroups hold
# the f32 accumulator and logits. 2 x 232 + 40 = 504 <= 512 (64K registers for 3 x 128 threads).
_COMPUTE_REGS, _PRODUCER_REGS = 232, 40


def _prefill_call(q_in, k_pages, v_pages, block_tables, items, *, scale: float, gp: int, G: int,
                  tune: MosaicPrefillTuning, direct: bool, interpret: bool):
    """The kernel. Two layouts of a tile's rows (R = 64 x warpgroups rows, bq = R / Gp tokens):

    direct (Gp <= 8): q_in is q itself as [T, Hq * D]; warpgroup wg takes the tile's tokens wg*bw .. (bw = 64 / Gp,
      a multiple of the 8-row TMA tile), head-major: row g*bw + j is query head h*G + g of token j, loaded by one
      strided TMA copy per head (rows past T come back as zeros: TMA's out-of-bounds fill). The output goes to
      o [T, Hq * D] in token order. Work items with nq < 0 (`zero_fill_items`) write zeros into the -nq padding
      tokens' rows from q0 on, so that every row of o is written.
    gathered: q_in is q already gathered tile-major, [Hkv, W * R, D] (token-major rows); o is [Hkv, W * R, D].
    """
    Hkv, _, S, D = k_pages.shape
    dtype = k_pages.dtype
    T, stages, nwg, producer = tune.keys_per_step, tune.num_stages, tune.warpgroups, tune.producer
    nthreads = nwg + producer
    pingpong = producer and nwg == 2
    R = _ROWS * nwg
    bw = _ROWS // gp  # tokens per warpgroup (a tile has nwg of them)
    ppcb = T // S
    P = block_tables.shape[1]
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # the last step may run past P; pads = page 0
    W = items[0].shape[0]
    qk_scale = scale * _LOG2E

    def kernel(seq_ref, q0_ref, nq_ref, pos0_ref,  # i32[W] each: the work items
               bt_ref,  # i32[B, P']          block tables
               q_ref,  # direct: [T, Hq * D] q; gathered: [Hkv, W * R, D] tile-major rows
               k_ref,  # [Hkv, N, S, D]       key pages
               v_ref,  # [Hkv, N, S, D]       value pages
               o_ref,  # direct: [T, Hq * D] in token order; gathered: [Hkv, W * R, D]
               q_smem,  # [nwg, 64, D]        one 64-row block per warpgroup (gathered: its output rows after)
               k_smem,  # [stages, T, D]      shared by the warpgroups
               v_smem,  # [stages, T, D]
               stage,  # [nwg, 64, D]          direct: q rows as TMA left them, then the output (untiled)
               q_bar, k_bar, v_bar,
               consumed,  # [stages] x nwg arrivals: both warpgroups are done with a slot (nwg 2, no producer)
               k_free, v_free,  # [stages] x nwg arrivals: a slot's K / V may be refilled (producer)
               sched):  # 2 arrivals: the compute warpgroups' turns on the tensor cores (ping-pong)
        w, h = lax.axis_index("w"), lax.axis_index("h")
        tid = lax.axis_index("wg") if nthreads > 1 else 0
        seq, q0, nq, pos0 = seq_ref[w], q0_ref[w], nq_ref[w], pos0_ref[w]

        def store_rows(wg, n, row0):
            """This warpgroup's n (<= bw) rows in the staging buffer -> o[row0 .. row0 + n) in token order (direct).
            A full block is one TMA box per head; a partial one leaves in boxes of 2^k rows (n's binary digits),
            so that no store touches rows past n."""
            staged = stage.at[wg]
            for g in range(G):
                col = pl.ds(pl.multiple_of((h * G + g) * D, D), D)

                @pl.when(n == bw)
                def _():
                    plgpu.copy_smem_to_gmem(staged.at[pl.ds(g * bw, bw)], o_ref.at[pl.ds(row0, bw), col])

                p = bw // 2
                while p >= 1:
                    @pl.when((n < bw) & ((n & p) != 0))
                    def _(p=p):
                        base = n & ~(2 * p - 1)  # the rows stored by the larger boxes before this one
                        plgpu.copy_smem_to_gmem(staged.at[pl.ds(g * bw + base, p)],
                                                o_ref.at[pl.ds(row0 + base, p), col])
                    p //= 2
            plgpu.wait_smem_to_gmem(0)

        kv_len = pos0 + nq  # keys 0 .. the tile's last query position
        c1 = (kv_len + T - 1) // T
        ring = PageRing(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, lambda i: bt_ref[seq, i], h, ppcb, stages, 0, c1)

        def compute(wg):
            q_rows = q_smem.at[wg]
            if direct:
                # TMA into the wgmma-tiled layout needs row offsets in multiples of 8, and a sequence's tokens
                # start anywhere: so the rows land in plain shared memory, then pass through registers.
                staged = stage.at[wg]
                for g in range(G):  # rows of heads G..Gp-1 stay as they are: computed, never stored
                    col = pl.multiple_of((h * G + g) * D, D)
                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q0 + wg * bw, bw), pl.ds(col, D)],
                                            staged.at[pl.ds(g * bw, bw)], q_bar.at[wg])
            else:
                plgpu.copy_gmem_to_smem(q_ref.at[h, pl.ds(w * R + wg * _ROWS, _ROWS)], q_rows, q_bar.at[wg])

            if not producer:
                if nwg > 1:
                    pl.when(wg == 0)(ring.prime)  # warpgroup 0 drives the shared ring
                else:
                    ring.prime()
            plgpu.barrier_wait(q_bar.at[wg])
            if direct:
                q_rows[...] = staged[...]
                plgpu.commit_smem()
            row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, T), 0, layout=plgpu.Layout.WGMMA)
            token = wg * bw + (row % bw if direct else row // gp)  # the row's token within the tile
            row_pos = token + pos0

            def mask(s, key):  # causal: a row sees keys up to its own position
                return jnp.where(key <= row_pos, s, -jnp.inf)

            # Steps whose last key is at or before the tile's first position need no causal mask.
            unmasked_until = (pos0 + 1) // T
            if producer:
                acc, _, l_i = _attend_specialized(ring, q_rows, wg, kv_len=kv_len, mask=mask, qk_scale=qk_scale,
                                                  k_free=k_free, v_free=v_free, sched=sched if pingpong else None,
                                                  unmasked_until=unmasked_until, interpret=interpret)
            else:
                release = None
                if nwg > 1:
                    def release(c, slot):  # both warpgroups are done with the slot before warpgroup 0 refills it
                        plgpu.barrier_arrive(consumed.at[slot])

                        # Warpgroup 0 waits on every phase, refill or not: a phase it skipped (the last steps,
                        # which refill nothing) would leave its phase count behind the barrier's. Mosaic GPU's
                        # interpreter rejects that when the barrier is freed ("had only observed barrier up to
                        # phase 0, but barrier completed up to phase 1").
                        @pl.when(wg == 0)
                        def _():
                            plgpu.barrier_wait(consumed.at[slot])

                            @pl.when(c + stages < c1)
                            def _():
                                ring.issue(c + stages, slot)

                acc, _, l_i = attend_pages(ring, q_rows, kv_len=kv_len, mask=mask, qk_scale=qk_scale,
                                           interpret=interpret, release=release, unmasked_until=unmasked_until)
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            out = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            if direct:
                # Token order, straight into o [T, Hq * D]: the rows leave from plain shared memory (the staging
                # rows, free since q was copied out of them), where a TMA box may start at any row.
                staged[...] = out
                plgpu.commit_smem()
                store_rows(wg, jnp.clip(nq - wg * bw, 0, bw), q0 + wg * bw)
            else:
                # q's rows are no longer read (the last wgmma is done): they take the output, which halves the
                # shared memory a tile needs, so that two tiles can share an SM.
                q_rows[...] = out
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_rows, o_ref.at[h, pl.ds(w * R + wg * _ROWS, _ROWS)])
                plgpu.wait_smem_to_gmem(0)

        def zero_fill(wg):  # padding tokens q0 .. q0 - nq - 1: zero rows (direct layout)
            stage.at[wg][...] = jnp.zeros((_ROWS, D), dtype)
            plgpu.commit_smem()
            store_rows(wg, jnp.clip(-nq - wg * bw, 0, bw), q0 + wg * bw)

        def producer_loop():
            """Keeps the ring full: refills a slot's K as soon as both compute warpgroups' QK is done with it, and
            its V after their PV. It waits on every step's phases, refill or not (the barrier protocol; see the
            two-warpgroup release above)."""
            ring.prime()

            @pl.loop(0, c1)
            def _(c):
                slot = lax.rem(c, stages)
                refill = c + stages < c1
                plgpu.barrier_wait(k_free.at[slot])
                pl.when(refill)(lambda: ring.issue(c + stages, slot, v=False))
                plgpu.barrier_wait(v_free.at[slot])
                pl.when(refill)(lambda: ring.issue(c + stages, slot, k=False))

        def thread_body(zero):
            if producer:
                @pl.when(tid == nwg)
                def _():
                    plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
                    if not zero:
                        producer_loop()

                @pl.when(tid < nwg)
                def _():
                    plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
                    if zero:
                        zero_fill(tid)
                    elif pingpong:
                        # A tile of at most bw tokens (a decode row in a mixed step, a sequence's short last tile)
                        # leaves warpgroup 1 without rows: it only keeps the barriers' counts, so that warpgroup 0
                        # has the tensor cores to itself instead of sharing them with rows nobody reads.
                        idle = (tid == 1) & (nq <= bw)
                        pl.when(idle)(lambda: _idle_turns(c1, stages, k_free, v_free, sched))
                        pl.when(jnp.logical_not(idle))(lambda: compute(tid))
                    else:
                        compute(tid)
            else:
                (zero_fill if zero else compute)(tid)

        pl.when(nq > 0)(lambda: thread_body(zero=False))
        if direct:
            pl.when(nq < 0)(lambda: thread_body(zero=True))

    out_shape = q_in.shape if direct else (Hkv, W * R, D)
    name = f"ragged_prefill_mgpu_gp{gp}_T{T}_st{stages}_wg{nwg}{'p' if producer else ''}{'_direct' if direct else ''}"
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, dtype),
        scratch_types=[
            _tiled((nwg, _ROWS, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((stages, T, D), dtype),
            plgpu.SMEM((nwg, _ROWS if direct else 8, D), dtype),
            plgpu.Barrier(num_arrivals=G if direct else 1, num_barriers=nwg),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(W, Hkv),
        grid_names=("w", "h"),
        **(dict(num_threads=nthreads, thread_name="wg") if nthreads > 1 else {}),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=name,
    )(*items, block_tables, q_in, k_pages, v_pages)


def _turn(sched):
    """Give the tensor cores to the other compute warpgroup and wait for it to give them back (FA3's ping-pong)."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def _idle_turns(c1, stages: int, k_free, v_free, sched):
    """Warpgroup 1 of a tile whose tokens all fall to warpgroup 0: the same barrier arrivals and turns as
    _attend_specialized's steps, without loads or matmuls. The turns keep it within a step of warpgroup 0, so its
    early arrivals on a slot's k_free/v_free never count toward a later phase."""
    turn = functools.partial(_turn, sched)
    turn()  # warpgroup 1 starts one turn behind

    @pl.loop(0, c1)
    def _(c):
        slot = lax.rem(c, stages)
        turn()  # warpgroup 0's QK
        plgpu.barrier_arrive(k_free.at[slot])
        turn()  # warpgroup 0's softmax handover
        plgpu.barrier_arrive(v_free.at[slot])


def _attend_specialized(ring: PageRing, q_rows, wg, *, kv_len, mask, qk_scale: float, k_free, v_free, sched,
                        unmasked_until, interpret: bool):
    """A compute warpgroup's online softmax over steps 0..c1 when a producer warpgroup fills the ring (FA3's
    forward loop): K's slot is released right after QK and V's after PV, and the next step's K is awaited while
    PV runs. With `sched` (two compute warpgroups), each warpgroup's matmuls wait for the other's softmax to
    end, so that the tensor cores and the exp units are busy at once: warpgroup 1 starts one turn behind, and
    warpgroup 0 takes one more turn after its loop so that both pass the barrier equally often.
    -> (acc f32[64, D], m f32[64], l f32[64])."""
    D, stages, c1 = q_rows.shape[1], ring.stages, ring.c1
    dtype = ring.k_smem.dtype

    turn = functools.partial(_turn, sched)

    def step(c, carry, masked=True):
        acc, m_i, l_i = carry
        slot = lax.rem(c, stages)
        s = qk_product(q_rows, ring.k_smem.at[slot], interpret=interpret, during=turn if sched is not None else None)
        plgpu.barrier_arrive(k_free.at[slot])
        p, m_new, l_i, acc = online_softmax(s, c, m_i, l_i, acc, qk_scale=qk_scale, mask=mask if masked else None)
        p16 = p.astype(dtype)
        if sched is not None:
            # The order of these barriers against the softmax's last ops matters for the schedule that ptxas
            # makes; the optimization barrier keeps the softmax ahead of the hand-over (as jax's FA3 kernel does).
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)  # softmax done
            plgpu.barrier_wait(ring.v_bar.at[slot])
            plgpu.barrier_wait(sched)  # the tensor cores are ours again
        else:
            plgpu.barrier_wait(ring.v_bar.at[slot])
        if masked:
            zero_v_tail(ring, c, slot, kv_len)

        def next_k():  # while PV runs: the next step's keys
            @pl.when(c + 1 < c1)
            def _():
                plgpu.barrier_wait(ring.k_bar.at[lax.rem(c + 1, stages)])
        acc = pv_product(acc, p16, ring.v_smem.at[slot], interpret=interpret, during=next_k)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

    @pl.when(c1 > 0)  # c1 >= 1 for valid input (the tile has a token at position >= 0)
    def _():
        plgpu.barrier_wait(ring.k_bar.at[0])
    if sched is not None:
        pl.when(wg == 1)(turn)
    split = jnp.clip(unmasked_until, 0, c1)
    carry = lax.fori_loop(0, split, functools.partial(step, masked=False), softmax_init(D))
    carry = lax.fori_loop(split, c1, step, carry)
    if sched is not None:
        pl.when(wg == 0)(turn)
    return carry


@functools.partial(jax.jit, static_argnames=("scale", "tuning", "interpret"))
def ragged_prefill_mgpu(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens, *, scale: float | None = None,
                        tuning: MosaicPrefillTuning = MosaicPrefillTuning(), interpret: bool = False):
    """Causal paged attention for flat-packed new tokens (Mosaic GPU); same contract as
    ragged_prefill.ragged_prefill.

    Args:
      q: bf16/f16 [num_tokens, num_q_heads, head_dim]; sequence b's tokens are q[cu_q_lens[b]:cu_q_lens[b+1]],
        at positions seq_lens[b] - q_len_b + i. Tokens at or past cu_q_lens[-1] are padding (zero output).
      k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim], q's dtype, new tokens' K/V written.
      block_tables: i32[batch, pages_per_seq].
      seq_lens: i32[batch] context length including the new tokens (0 for padding rows).
      cu_q_lens: i32[batch + 1] query_start_loc, non-decreasing, cu_q_lens[0] = 0.
      scale: softmax scale, default 1/sqrt(head_dim).
      tuning: MosaicPrefillTuning; 0 fields are picked from the shapes.
      interpret: run Mosaic GPU's CPU interpreter (CPU tests).
    Returns:
      [num_tokens, num_q_heads, head_dim] in q.dtype.
    """
    check_ragged_args(q, k_pages, v_pages, block_tables, seq_lens, cu_q_lens)
    check_mosaic_args(q, k_pages)
    scale = default_scale(q.shape[2]) if scale is None else scale
    q_in, items, static = tile_queries(q, k_pages, seq_lens, cu_q_lens, tuning)
    o = _prefill_call(q_in, k_pages, v_pages, block_tables, items, scale=scale, gp=static.gp, G=static.G,
                      tune=static.tune, direct=static.direct, interpret=interpret)
    return untile_outputs(o, cu_q_lens, q.shape, static)


@dataclasses.dataclass(frozen=True)
class _Static:
    gp: int  # query heads per kv head, rounded up to a power of 2
    G: int
    tune: MosaicPrefillTuning
    direct: bool  # the kernel reads q and writes o in token order itself (Gp <= 8); else the wrapper gathers

    @property
    def bq(self) -> int:
        return _ROWS * self.tune.warpgroups // self.gp


def tile_queries(q, k_pages, seq_lens, cu_q_lens, tuning: MosaicPrefillTuning = MosaicPrefillTuning()):
    """What the kernel reads -> (q_in, work items, _Static). With Gp <= 8 the kernel reads q itself (q_in is q as
    [T, Hq * D]); else q gathered into tile-major rows [Hkv, W * R, D]. Split out so that
    scripts/bench_kernels.py can time the kernel apart from the gathers."""
    B = seq_lens.shape[0]
    T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    Gp = next_pow2(G)
    tune = tuning.resolve(S, D, k_pages.dtype.itemsize)
    static = _Static(Gp, G, tune, direct=Gp <= 8)
    bq = static.bq
    if static.direct:
        # Rows of all heads: a head's [tokens, D] block is one strided TMA box. A tile that runs past the last
        # token reads zeros (copy_gmem_to_smem's out-of-bounds fill; the interpreter does the same).
        return q.reshape(T, Hq * D), zero_fill_items(cu_q_lens, seq_lens, T, bq), static
    W = pl.cdiv(T, bq) + B
    items = work_items(cu_q_lens, seq_lens, block_q=bq, num_items=W)
    _, q0, nq, _ = items
    q4 = jnp.pad(q.reshape(T, Hkv, G, D), ((0, 1), (0, 0), (0, Gp - G), (0, 0)))  # (T + 1, Hkv, Gp, D); T: zeros
    j = jnp.arange(bq, dtype=jnp.int32)
    tok = jnp.where(j[None, :] < nq[:, None], q0[:, None] + j[None, :], T).reshape(W * bq)  # tile-major tokens
    q_tiles = q4[tok].transpose(1, 0, 2, 3).reshape(Hkv, W * Gp * bq, D)
    return q_tiles, items, static


def zero_fill_items(cu_q_lens, seq_lens, num_tokens: int, bq: int):
    """work_items, then items that zero the padding tokens cu_q_lens[-1] .. num_tokens - 1 in blocks of bq: an item
    with nq < 0 writes zeros into the -nq rows from q0 on. The kernel then writes every row of its output, and no
    pass over the output is needed to zero the padding (it was one on the H100: 162 us of a 1,001 us call)."""
    B = seq_lens.shape[0]
    # Live items: sum of ceil(q_len / bq) <= (used + B (bq - 1)) / bq; padding items <= (T - used + bq - 1) / bq.
    W = pl.cdiv(num_tokens, bq) + B + 1
    seq, q0, nq, pos0 = work_items(cu_q_lens, seq_lens, block_q=bq, num_items=W)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.sum((q_lens + bq - 1) // bq)
    w = jnp.arange(W, dtype=jnp.int32)
    start = cu_q_lens[-1] + (w - live) * bq
    pad = w >= live
    nz = jnp.clip(num_tokens - start, 0, bq)
    return (seq, jnp.where(pad, start, q0).astype(jnp.int32), jnp.where(pad, -nz, nq).astype(jnp.int32), pos0)


def untile_outputs(o, cu_q_lens, q_shape, static: _Static):
    """The kernel's output -> [num_tokens, Hq, D] in token order, padding tokens zero."""
    T, Hq, D = q_shape
    if static.direct:  # o [T, Hq * D] in token order, padding rows zeroed by the kernel
        return o.reshape(T, Hq, D)
    real = jnp.arange(T, dtype=jnp.int32) < cu_q_lens[-1]
    Gp, G, bq = static.gp, static.G, static.bq
    B = cu_q_lens.shape[0] - 1
    # Token t is tile w(t)'s token t - q0[w(t)].
    t = jnp.arange(T, dtype=jnp.int32)
    seq_of = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right", method="compare_all"), 0, B - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles = (q_lens + bq - 1) // bq
    first_tile = jnp.cumsum(tiles) - tiles
    j = t - cu_q_lens[seq_of]
    src = (first_tile[seq_of] + j // bq) * bq + j % bq  # the token's row (of Gp head rows) in tile-major order
    src = jnp.where(real, src, 0)
    Hkv = o.shape[0]
    W = o.shape[1] // (bq * Gp)
    o = o.reshape(Hkv, W * bq, Gp, D)[:, src]  # (Hkv, T, Gp, D)
    o = jnp.where(real[None, :, None, None], o, jnp.zeros((), o.dtype))
    return o[:, :, :G].transpose(1, 0, 2, 3).reshape(T, Hq, D)
