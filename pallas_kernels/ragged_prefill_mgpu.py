"""Ragged paged prefill attention in Pallas, Mosaic GPU lowering (Hopper: TMA + wgmma).

Design note.
- Same contract and work items as ragged_prefill.py (the Triton twin): the flat token axis is cut per sequence
  into tiles of bq tokens (`work_items`), the grid is (work items, kv heads), and a tile's rows are its bq tokens
  x the Gp = next_pow2(G) query heads of one kv head, token-major, so K/V pages are read once per tile for the
  whole group. wgmma's M is 64 rows per warpgroup. With `warpgroups=2` (FA3's layout; experimental) a tile
  has 128 rows, bq = 128 / Gp, and both warpgroups consume every K/V step that warpgroup 0 loads: a `consumed`
  barrier per ring slot (two arrivals) tells warpgroup 0 when it may refill the slot. That variant lowers for
  an H100, but Mosaic GPU's CPU interpreter hangs on it at times (seen: warpgroup 1 waiting on a K/V slot
  barrier that no copy had arrived at, with no thread ever having waited on it: a fresh barrier; it passed in
  another run). Our reading, not verified: when warpgroup 0 needs nothing from warpgroup 1 (a tile with no
  slot refills) it can finish and free the shared scratch before warpgroup 1 allocates it, and warpgroup 1 then
  gets new barriers that nobody arrives at. Shared memory on a GPU is static per block, so this would not
  happen there. Session 4 tested that reading and it did not hold up. A barrier at the end of the tile
  (neither warpgroup leaves before the other arrives) did not stop the hang: the first two-warpgroup test case
  still hung past 240 s on CPU, as it did without it (400 s). So the cause is still not known, and the
  barrier was not kept. It is tested only compiled on a GPU, and the default is one warpgroup.
- Keys come through the same TMA ring of page copies as the decode kernel (paged_decode_mgpu.PageRing,
  attend_pages): steps of T keys from position 0 to the tile's last query position; the causal mask is
  key <= the row's query position. Rows past the tile's tokens compute garbage that nothing reads.
- Tile-major rows. TMA moves whole 64-row tiles, and into or out of the wgmma-tiled shared memory only at row
  offsets that are multiples of the 8-row tile; and a tile whose sequence ends mid-tile must not overwrite the
  next sequence's rows. So the wrapper gathers q into a tile-major buffer (tile w: rows w*64 ..), each tile
  reads and writes its own 64 rows, and a gather puts the output rows back in token order.
- bf16/f16 only (wgmma has no f32 operands), head dim a multiple of 64, G <= 64.
- Not measured yet on a GPU: the engine does not use it (docs/PERF.md); scripts/bench_kernels.py times it as
  "ours_mosaic" beside the Triton kernel, which stays the prefill kernel until this one is measured faster.
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
                                                       check_mosaic_args)
from jaxserve.pallas_kernels.ragged_prefill import work_items
from jaxserve.pallas_kernels.reference import default_scale
from jaxserve.pallas_kernels.tuning import next_pow2


@dataclasses.dataclass(frozen=True)
class MosaicPrefillTuning:
    """keys_per_step: keys per wgmma step (a multiple of 64 and of the block size; 0 = 128 or the block size).
    num_stages: depth of the TMA ring (trimmed to fit shared memory). warpgroups: 1 or 2 compute warpgroups per
    tile, 64 query rows each; two share every K/V tile they load, which halves the K/V reads per query row."""
    keys_per_step: int = 0
    num_stages: int = 3
    warpgroups: int = 1

    def resolve(self, block_size: int, head_dim: int, itemsize: int) -> "MosaicPrefillTuning":
        keys = self.keys_per_step or max(128, block_size)
        if keys % 64 or keys % block_size:
            raise ValueError(f"keys_per_step {keys} must be a multiple of 64 and of block_size {block_size}")
        if self.warpgroups not in (1, 2):
            raise ValueError(f"warpgroups must be 1 or 2, got {self.warpgroups}")
        fixed = 2 * self.warpgroups * _ROWS * head_dim * itemsize  # q tiles + output tiles
        stages = self.num_stages
        while stages > 1 and fixed + stages * 2 * keys * head_dim * itemsize > 220 * 1024:
            stages -= 1
        return dataclasses.replace(self, keys_per_step=keys, num_stages=stages)


def _prefill_call(q_tiles, k_pages, v_pages, block_tables, items, *, scale: float, gp: int,
                  tune: MosaicPrefillTuning, interpret: bool):
    """q_tiles [Hkv, W * R, D] -> o [Hkv, W * R, D], both tile-major (tile w: rows w*R ..., R = 64 x warpgroups)."""
    Hkv, _, D = q_tiles.shape
    S = k_pages.shape[2]
    dtype = k_pages.dtype
    T, stages, nwg = tune.keys_per_step, tune.num_stages, tune.warpgroups
    R = _ROWS * nwg
    ppcb = T // S
    P = block_tables.shape[1]
    block_tables = jnp.pad(block_tables, ((0, 0), (0, -P % ppcb)))  # the last step may run past P; pads = page 0
    W = items[0].shape[0]
    qk_scale = scale * _LOG2E

    def kernel(seq_ref, q0_ref, nq_ref, pos0_ref,  # i32[W] each: the work items (q0 is used by the wrapper)
               bt_ref,  # i32[B, P']          block tables
               q_ref,  # [Hkv, W * R, D]      query rows, tile-major
               k_ref,  # [Hkv, N, S, D]       key pages
               v_ref,  # [Hkv, N, S, D]       value pages
               o_ref,  # [Hkv, W * R, D]      output rows, tile-major
               q_smem,  # [nwg, 64, D]        one 64-row block per warpgroup
               k_smem,  # [stages, T, D]      shared by the warpgroups
               v_smem,  # [stages, T, D]
               o_smem,  # [nwg, 64, D]
               q_bar, k_bar, v_bar, consumed):
        w, h = lax.axis_index("w"), lax.axis_index("h")
        wg = lax.axis_index("wg") if nwg > 1 else 0
        seq, nq, pos0 = seq_ref[w], nq_ref[w], pos0_ref[w]

        @pl.when(nq > 0)  # surplus work items have no rows
        def _():
            kv_len = pos0 + nq  # keys 0 .. the tile's last query position
            c1 = (kv_len + T - 1) // T
            ring = PageRing(k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, lambda i: bt_ref[seq, i], h, ppcb, stages,
                            0, c1)
            q_rows = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[h, pl.ds(w * R + wg * _ROWS, _ROWS)], q_rows, q_bar.at[wg])

            if nwg > 1:
                pl.when(wg == 0)(ring.prime)  # warpgroup 0 drives the shared ring
            else:
                ring.prime()
            plgpu.barrier_wait(q_bar.at[wg])
            row_pos = (plgpu.broadcasted_iota(jnp.int32, (_ROWS, T), 0, layout=plgpu.Layout.WGMMA) + wg * _ROWS) \
                // gp + pos0

            def mask(s, key):  # causal: a row sees keys up to its own position
                return jnp.where(key <= row_pos, s, -jnp.inf)

            release = None
            if nwg > 1:
                def release(c, slot):  # both warpgroups are done with the slot before warpgroup 0 refills it
                    plgpu.barrier_arrive(consumed.at[slot])

                    @pl.when((wg == 0) & (c + stages < c1))
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])
                        ring.issue(c + stages, slot)

            # Steps whose last key is at or before the tile's first position need no causal mask.
            acc, _, l_i = attend_pages(ring, q_rows, kv_len=kv_len, mask=mask, qk_scale=qk_scale,
                                       interpret=interpret, release=release, unmasked_until=(pos0 + 1) // T)
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            o_smem.at[wg][...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[h, pl.ds(w * R + wg * _ROWS, _ROWS)])
            plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((Hkv, W * R, D), dtype),
        scratch_types=[
            _tiled((nwg, _ROWS, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((stages, T, D), dtype),
            _tiled((nwg, _ROWS, D), dtype),
            plgpu.Barrier(num_barriers=nwg),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppcb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
        ],
        grid=(W, Hkv),
        grid_names=("w", "h"),
        **(dict(num_threads=nwg, thread_name="wg") if nwg > 1 else {}),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"ragged_prefill_mgpu_gp{gp}_T{T}_st{stages}_wg{nwg}",
    )(*items, block_tables, q_tiles, k_pages, v_pages)


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
    q_tiles, items, static = tile_queries(q, k_pages, seq_lens, cu_q_lens, tuning)
    scale = default_scale(q.shape[2]) if scale is None else scale
    o = _prefill_call(q_tiles, k_pages, v_pages, block_tables, items, scale=scale, gp=static[0], tune=static[1],
                      interpret=interpret)  # (Hkv, W * R, D) tile-major
    return untile_outputs(o, cu_q_lens, q.shape, static)


def tile_queries(q, k_pages, seq_lens, cu_q_lens, tuning: MosaicPrefillTuning = MosaicPrefillTuning()):
    """The wrapper's gather of q into tile-major rows -> (q_tiles [Hkv, W * R, D], work items, (Gp, tuning)).
    Split out so that scripts/bench_kernels.py can time the kernel apart from the gathers around it."""
    B = seq_lens.shape[0]
    T, Hq, D = q.shape
    Hkv, _, S, _ = k_pages.shape
    G = Hq // Hkv
    Gp = next_pow2(G)
    tune = tuning.resolve(S, D, k_pages.dtype.itemsize)
    R = _ROWS * tune.warpgroups  # query rows per tile
    bq = R // Gp
    W = pl.cdiv(T, bq) + B
    items = work_items(cu_q_lens, seq_lens, block_q=bq, num_items=W)
    _, q0, nq, _ = items
    q4 = jnp.pad(q.reshape(T, Hkv, G, D), ((0, 1), (0, 0), (0, Gp - G), (0, 0)))  # (T + 1, Hkv, Gp, D); T: zeros
    j = jnp.arange(bq, dtype=jnp.int32)
    tok = jnp.where(j[None, :] < nq[:, None], q0[:, None] + j[None, :], T).reshape(W * bq)  # tile-major tokens
    q_tiles = q4[tok].transpose(1, 0, 2, 3).reshape(Hkv, W * R, D)
    return q_tiles, items, (Gp, tune)


def untile_outputs(o, cu_q_lens, q_shape, static):
    """Tile-major kernel output (Hkv, W * R, D) -> [num_tokens, Hq, D] in token order, padding tokens zero."""
    T, Hq, D = q_shape
    Gp, tune = static
    Hkv = o.shape[0]
    G, B = Hq // Hkv, cu_q_lens.shape[0] - 1
    bq = _ROWS * tune.warpgroups // Gp
    W = o.shape[1] // (bq * Gp)
    # Token t sits in tile w(t) at row offset (t - q0[w(t)]) * Gp.
    t = jnp.arange(T, dtype=jnp.int32)
    seq_of = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, B - 1)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles = (q_lens + bq - 1) // bq
    first_tile = jnp.cumsum(tiles) - tiles
    j = t - cu_q_lens[seq_of]
    src = (first_tile[seq_of] + j // bq) * bq + j % bq  # row group (of Gp rows) in the tile-major output
    src = jnp.where(t < cu_q_lens[-1], src, 0)
    o = o.reshape(Hkv, W * bq, Gp, D)[:, src]  # (Hkv, T, Gp, D)
    o = jnp.where((t < cu_q_lens[-1])[None, :, None, None], o, jnp.zeros((), o.dtype))
    return o[:, :, :G].transpose(1, 0, 2, 3).reshape(T, Hq, D)
