"""L2 prefetch of GEMV weights (pallas_kernels/l2_prefetch.py, measured by scripts/bench_gemv.py; not in the engine:
it made batch-1 decode slower on the H100, docs/PERF.md session 16): the boxes it plans (by hand), the kernel
interpreted in both modes and lowered for an H100, and its result aliased so that XLA keeps it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import lower_for_h100

from jaxserve.pallas_kernels.l2_prefetch import l2_prefetch, l2_prefetch_reference, parse_spec, plan

MiB = 1 << 20


def test_plan_covers_the_first_rows_in_equal_boxes():
    # Llama-3-8B's QKV weight [4096, 8, 6, 128] as [4096, 6144] bf16: 8 MiB = 682.7 rows -> 683 -> 3 boxes of 228
    p = plan((4096, 8, 6, 128), 2, 8 * MiB)
    assert (p.rows, p.cols, p.box_rows, p.band_rows, p.box_cols, p.bands) == (4096, 6144, 228, 684, 256, 1)
    assert p.grid == (1, 3, 24) and p.elements * 2 >= 8 * MiB
    # o [32, 128, 4096] with row_dims=2 -> [4096, 4096]: 8 MiB = 1024 rows exactly, 4 boxes of 256
    p = plan((32, 128, 4096), 2, 8 * MiB, row_dims=2)
    assert (p.rows, p.cols, p.band_rows, p.box_rows) == (4096, 4096, 1024, 256)
    # down [14336, 4096] in 4 bands of 2 MiB (256 rows) starting 3584 rows apart
    p = plan((14336, 4096), 2, 8 * MiB, bands=4)
    assert p.grid == (4, 1, 16) and [p.band_start(b) for b in range(4)] == [0, 3584, 7168, 10752]
    # more than the array: capped at the whole of it
    p = plan((64, 256), 2, 100 * MiB)
    assert p.band_rows == 64 and p.elements == 64 * 256


@pytest.mark.parametrize("args", [((4096, 6144), 2, 0, 1, 1), ((4096, 6144), 2, MiB, 0, 1), ((4096,), 2, MiB, 1, 1),
                                  ((64, 2, 2), 2, MiB, 1, 1)])  # nothing asked / no bands / 1-D / 8-byte rows
def test_plan_none(args):
    shape, itemsize, nbytes, bands, row_dims = args
    assert plan(shape, itemsize, nbytes, bands, row_dims) is None


@pytest.mark.parametrize("mode", ["prefetch", "load"])
def test_kernel_interpreted_changes_nothing(mode):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((512, 256)), jnp.bfloat16)
    x = jnp.arange(24.0).reshape(8, 3)
    y = jax.jit(lambda w, x: l2_prefetch(w, x, nbytes=96 * 1024, bands=2, mode=mode, interpret=True) * 2)(w, x)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(l2_prefetch_reference(w, x, nbytes=96 * 1024)))
    np.testing.assert_array_equal(np.asarray(y), 2 * np.arange(24.0).reshape(8, 3))


@pytest.mark.parametrize("mode", ["prefetch", "load"])
def test_kernel_lowers_for_h100(mode):
    A = jax.ShapeDtypeStruct
    text = lower_for_h100(lambda w, x: l2_prefetch(w, x, nbytes=8 * MiB, mode=mode) + 1,
                          A((4096, 8, 6, 128), jnp.bfloat16), A((8, 4096), jnp.bfloat16))
    assert f"l2_{mode}_1x684x6144" in text and "mosaic_gpu" in text


def test_kernel_result_is_after_in_place():
    """XLA drops a kernel whose result nothing uses (a token tied in by an optimization barrier was dropped, and
    session 16's first GPU runs timed no prefetch at all). Here the Mosaic call's result is `after` itself,
    aliased to its input, and the program's output is computed from it."""
    A = jax.ShapeDtypeStruct
    text = lower_for_h100(lambda w, x: l2_prefetch(w, x, nbytes=MiB) * 3, A((4096, 4096), jnp.bfloat16),
                          A((8, 4096), jnp.bfloat16))
    call = next(line for line in text.splitlines() if "mosaic_gpu" in line and "custom_call" in line)
    assert "output_operand_alias" in call and "operand_index = 1" in call
    assert call.rstrip().endswith("-> tensor<8x4096xbf16>")


@pytest.mark.parametrize("spec,want", [
    ("", ()), ("qkv=8", (("qkv", 8 * MiB, 1),)),
    (" o=0.5x2 , down=16 ", (("o", MiB // 2, 2), ("down", 16 * MiB, 1)))])
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["attn=8", "qkv", "qkv=0", "qkv=8x0", "qkv=abc", "qkv=8,qkv=4", "o=8x1.5"])
def test_parse_spec_errors(spec):
    with pytest.raises(ValueError, match="prefetch spec"):
        parse_spec(spec)


def test_bench_gemv_prefetch_smoke(tmp_path):
    """scripts/bench_gemv.py's prefetch parts in --smoke mode (tiny shapes, interpreted): they run, and the layer
    chain gives the same values with prefetches as without (a prefetch changes no value)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gemv.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_gemv.py"), "--smoke", "--only",
                           "--check-prefetch", "--prefetch", "qkv=0.01,o=0.01x2,gate_up=0.01,down=0.01x2",
                           "--output-json", str(out)], capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["prefetch_check"]) >= {"gap only", "prefetch, gap, gemv", "load, gap, gemv", "gemv_us"}
    assert r["sweeps"] == {}  # --only with no projection: the layers alone
    layers = r["layers"]
    assert set(layers) == {"xla", "xla, prefetch qkv=0.01,o=0.01x2,gate_up=0.01,down=0.01x2", "xla (again)"}
    assert all(v["max_rel_diff_vs_xla"] == 0 for v in layers.values())
