"""Tuning knobs of the Pallas attention kernels, kept off the kernels' public signatures.

The defaults are first guesses for Hopper/Ampere (H100: 132 SMs) until the lead's GPU sweep
(`scripts/bench_kernels.py`) replaces them with measured values.
"""

from __future__ import annotations

import dataclasses

# Programs wanted in flight per launch: ~2 per SM on an H100, so a small decode batch still fills the chip.
_TARGET_PROGRAMS = 264


# Hopper gives a block 227 KiB of shared memory; the software pipeline keeps `num_stages` copies of each
# K and V tile there. Seen on the H100: f32, head dim 128, 128-token pages, 2 stages asked for 272 KiB.
_SMEM_BUDGET = 200 * 1024


def fit_stages(num_stages: int, keys_per_step: int, head_dim: int, itemsize: int) -> int:
    """Fewest-cut pipelining depth whose K+V tiles fit the shared-memory budget (at least 1)."""
    tile = 2 * keys_per_step * head_dim * itemsize  # K and V
    while num_stages > 1 and num_stages * tile > _SMEM_BUDGET:
        num_stages -= 1
    return num_stages


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Paged decode kernel.

    pages_per_compute_block: pages gathered per inner step (power of 2); keys per step = this * block_size.
    num_splits: split-K partitions of each sequence's context, merged with log-sum-exp; 0 = pick from shape.
    num_warps, num_stages: Triton launch parameters.
    """
    pages_per_compute_block: int = 0  # 0 = enough pages for ~128 keys per step
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 2

    def resolve(self, batch: int, num_kv_heads: int, pages_per_seq: int, block_size: int,
                head_dim: int = 128, itemsize: int = 2) -> "DecodeTuning":
        """Fills the 0 (= auto) fields for one call's static shape; trims num_stages to fit shared memory."""
        ppcb = self.pages_per_compute_block or max(1, 128 // block_size)
        ppcb = min(ppcb, next_pow2(pages_per_seq))
        splits = self.num_splits
        if splits == 0:
            # Enough programs to fill the chip, but each split keeps >= 2 compute blocks of work (the merge and the
            # per-split q load are not free).
            want = max(1, _TARGET_PROGRAMS // max(1, batch * num_kv_heads))
            splits = max(1, min(want, pages_per_seq // (2 * ppcb), 16))
        stages = fit_stages(self.num_stages, ppcb * block_size, head_dim, itemsize)
        return dataclasses.replace(self, pages_per_compute_block=ppcb, num_splits=splits, num_stages=stages)


@dataclasses.dataclass(frozen=True)
class PrefillTuning:
    """Ragged prefill kernel.

    block_q: query tokens per program (power of 2); rows per tile = block_q * padded group size; 0 = ~128 rows.
    pages_per_compute_block: pages per inner step (power of 2); 0 = ~64 keys per step.
    num_warps, num_stages: Triton launch parameters.
    """
    block_q: int = 0
    pages_per_compute_block: int = 0
    num_warps: int = 0  # 0 = 8 when the f32 accumulator tile is >= 128 x 128, else 4
    num_stages: int = 2

    def resolve(self, group_padded: int, block_size: int, pages_per_seq: int, head_dim: int,
                itemsize: int = 2) -> "PrefillTuning":
        bq = self.block_q or max(16 // min(group_padded, 16), 128 // group_padded, 1)
        ppcb = self.pages_per_compute_block or max(1, 64 // block_size)
        ppcb = min(ppcb, next_pow2(pages_per_seq))
        warps = self.num_warps or (8 if bq * group_padded * head_dim >= 128 * 128 else 4)
        stages = fit_stages(self.num_stages, ppcb * block_size, head_dim, itemsize)
        return dataclasses.replace(self, block_q=bq, pages_per_compute_block=ppcb, num_warps=warps, num_stages=stages)


DEFAULT_DECODE = DecodeTuning()
DEFAULT_PREFILL = PrefillTuning()
