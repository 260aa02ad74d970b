"""Start fetching the first bytes of a weight matrix into the L2 cache, ahead of the GEMV that reads it.

Design note. At batch 1 a Llama-3-8B decode step streams 15 GB of weights through 129 GEMVs, and the small ones
stream below the copy rate: QKV at 2.36 TB/s and the o projection at 2.27 (docs/PERF.md, session 13), against
~2.9 for gate/up. A 15-50 MB GEMV spends microseconds ramping up and draining, and the memory system sits idle
under the latency-bound kernels between the GEMVs (norm, RoPE + KV write, attention, SiLU; ~20 us per layer).
This kernel issues TMA bulk prefetches into L2 (`cp.async.bulk.prefetch.tensor.L2`, Mosaic GPU's
`plgpu.async_prefetch`) of the rows that a GEMV reads first and exits without waiting for them: the fetch runs
under the kernels that come before the GEMV, and the GEMV finds those rows in L2.

A prefetch changes no value, so the pure-jnp reference is the identity (`l2_prefetch_reference`). The caller
orders it by data: the kernel updates in place (aliases) the value that the next kernel consumes.

Where. The weight is viewed as [R, C]: its first `row_dims` dims (the GEMV's contracted ones) folded into R, the
rest into C (a free reshape of a row-major array).
`bands` row bands of `nbytes / bands` bytes each start at rows 0, R/bands, 2R/bands, ...: a split-K GEMV's
blocks start at the first rows of each of their K ranges. One CUDA block per TMA box of at most 256 x 256
elements (TMA's box limit).

Measured on an H100 (docs/PERF.md, session 16, gpu_call70.sh): it does not help, so the engine does not use it.
- A 32 MiB o-projection GEMV after an idle gap: 13.7 us from DRAM; 18.0 us with its TMA prefetch issued before the
  gap (the prefetch kernel included); 8.9 us after a TMA *load* of the weight (mode "load": the bytes do stay in
  L2), but that load kernel itself took 13.7 us, as long as the GEMV it would save.
- 32 decode layers (bench_gemv --prefetch): 5.07 ms without, 5.64-5.92 ms with prefetches of 8-16 MiB per weight.
- The engine at batch 1 (wired in behind an environment variable for the run, then taken out): 5.67 ms without,
  5.79 and 5.89 ms with the two best specs.
The kernel stays with its benchmark and tests as the record, like gemv.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_BOX = 256  # TMA box limit per dimension (elements)


@dataclasses.dataclass(frozen=True)
class PrefetchPlan:
    rows: int  # R of the [R, C] view
    cols: int  # C
    band_rows: int  # rows prefetched per band (a multiple of box_rows)
    box_rows: int
    box_cols: int
    bands: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.bands, self.band_rows // self.box_rows, self.cols // self.box_cols

    def band_start(self, band: int) -> int:
        return band * (self.rows // self.bands)

    @property
    def elements(self) -> int:  # of the array that the boxes cover
        return self.bands * self.band_rows * self.cols


def plan(shape: tuple[int, ...], itemsize: int, nbytes: int, bands: int = 1,
         row_dims: int = 1) -> PrefetchPlan | None:
    """The boxes that cover about `nbytes` (rounded up to whole boxes) of an array of `shape`, in `bands` bands;
    None where nothing would be fetched (nbytes <= 0) or the view does not tile (C not a multiple of a box
    width that is a multiple of 16 bytes)."""
    if nbytes <= 0 or bands < 1 or not 1 <= row_dims < len(shape):
        return None
    R, C = math.prod(shape[:row_dims]), math.prod(shape[row_dims:])
    box_cols = math.gcd(C, _BOX)
    if box_cols * itemsize % 16:
        return None
    bands = min(bands, R)
    per_band = max(1, math.ceil(nbytes / bands / (C * itemsize)))  # rows
    per_band = min(per_band, R // bands)
    box_rows = math.ceil(per_band / math.ceil(per_band / _BOX))  # boxes of equal height that cover per_band
    band_rows = min(math.ceil(per_band / box_rows) * box_rows, R // bands // box_rows * box_rows)
    if box_rows < 1 or band_rows < 1:
        return None
    return PrefetchPlan(rows=R, cols=C, band_rows=band_rows, box_rows=box_rows, box_cols=box_cols, bands=bands)


MODES = ("prefetch", "load")


def l2_prefetch(w: jax.Array, after: jax.Array, *, nbytes: int, bands: int = 1, row_dims: int = 1,
                mode: str = "prefetch", interpret: bool = False) -> jax.Array:
    """Issue L2 prefetches of about `nbytes` of w (see the design note) once `after` exists, and return `after`.

    The kernel updates `after` in place (one element written back as it was read, so its value does not change):
    `after` becomes an output aliased to its input, what consumes the result starts after the kernel, and XLA
    cannot drop the kernel as dead code. (It did drop one whose only output was an unused token tied in by an
    optimization barrier: session 16's first measurements timed no prefetch at all.) Where `plan` finds nothing
    to fetch, returns `after` without a kernel.
    mode "load": each block copies its box into shared memory (TMA) and waits for it instead, so the bytes have
    passed through L2 when the kernel ends (a control for the prefetch: it costs the transfer's time)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    p = plan(w.shape, w.dtype.itemsize, nbytes, bands, row_dims)
    if p is None:
        return after
    w2 = w.reshape(p.rows, p.cols)
    band_stride = p.rows // p.bands
    first = (0,) * after.ndim

    def kernel(w_ref, after_ref, *scratch):
        b, i, j = (jax.lax.axis_index(n) for n in ("b", "i", "j"))
        box = w_ref.at[pl.ds(b * band_stride + i * p.box_rows, p.box_rows), pl.ds(j * p.box_cols, p.box_cols)]
        if mode == "prefetch":
            plgpu.async_prefetch(box)
        else:
            smem, bar = scratch
            plgpu.copy_gmem_to_smem(box, smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])

        @pl.when((b == 0) & (i == 0) & (j == 0))
        def _():  # `after` becomes the kernel's in-place output: one element written back as it was
            after_ref[first] = after_ref[first]

    scratch = [] if mode == "prefetch" else [plgpu.SMEM((p.box_rows, p.box_cols), w.dtype),
                                             plgpu.Barrier(num_barriers=1)]
    run = plgpu.kernel(
        kernel,
        out_type=(),
        scratch_types=scratch,
        grid=p.grid,
        grid_names=("b", "i", "j"),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        kernel_name=f"l2_{mode}_{p.bands}x{p.band_rows}x{p.cols}",
    )
    _, out = pl.run_state(lambda refs: run(*refs))((w2, after))
    return out


def l2_prefetch_reference(w: jax.Array, after: jax.Array, *, nbytes: int, bands: int = 1,
                          row_dims: int = 1) -> jax.Array:
    """What l2_prefetch computes: `after`. Its effect is on timing only."""
    del w, nbytes, bands, row_dims
    return after

WEIGHTS = ("qkv", "o", "gate_up", "down")  # a Llama decode layer's GEMVs, in order


def parse_spec(spec: str) -> tuple[tuple[str, int, int], ...]:
    """A prefetch spec (scripts/bench_gemv.py --prefetch): comma-separated WEIGHT=MIB or WEIGHT=MIBxBANDS (weights:
    qkv, o, gate_up, down), e.g. "qkv=8,o=8x2" -> (("qkv", 8 MiB, 1), ("o", 8 MiB, 2)). Empty: none."""
    out = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = item.partition("=")
        mib, _, bands = size.partition("x")
        try:
            nbytes, nb = int(float(mib) * (1 << 20)), int(bands or 1)
        except ValueError:
            nbytes = nb = -1
        if name not in WEIGHTS or nbytes <= 0 or nb < 1 or name in (o[0] for o in out):
            raise ValueError(f"prefetch spec: want WEIGHT=MIB[xBANDS] items, WEIGHT one of {WEIGHTS} (each once), "
                             f"MIB > 0, BANDS >= 1; got {item!r}")
        out.append((name, nbytes, nb))
    return tuple(out)
