"""The Mosaic GPU lowering cache (pallas_kernels/mosaic_cache.py): a kernel lowered for an H100 on this CPU host
emits the same program whether its Mosaic module came from the cache or from the lowering, across processes, and
a changed kernel (another tuning) is a miss, never a stale hit."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp
    from gpu_lowering import lower_for_h100
    from jaxserve.pallas_kernels import mosaic_cache
    from jaxserve.pallas_kernels.paged_decode_mgpu import MosaicDecodeTuning, paged_decode_mgpu
    from jaxserve.pallas_kernels.ragged_prefill_mgpu import ragged_prefill_mgpu
    folder, keys = sys.argv[1], int(sys.argv[2])
    if folder != "-":
        assert mosaic_cache.install(folder)
    A = jax.ShapeDtypeStruct
    kv = A((2, 40, 16, 128), jnp.bfloat16)
    t = time.perf_counter()
    dec = lower_for_h100(lambda q, k, v, bt, sl: paged_decode_mgpu(q, k, v, bt, sl,
                         tuning=MosaicDecodeTuning(keys_per_step=keys)),
                         A((3, 8, 128), jnp.bfloat16), kv, kv, A((3, 9), jnp.int32), A((3,), jnp.int32))
    pre = lower_for_h100(ragged_prefill_mgpu, A((40, 8, 128), jnp.bfloat16), kv, kv, A((3, 9), jnp.int32),
                         A((3,), jnp.int32), A((4,), jnp.int32))
    print(json.dumps(dict(text=dec + pre, seconds=time.perf_counter() - t, **mosaic_cache.stats())))
""")


def _lower(folder, keys=64):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(keys)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cached_lowering_emits_the_same_program(tmp_path):
    plain = _lower("-")
    first = _lower(tmp_path)
    second = _lower(tmp_path)
    assert (first["hits"], first["misses"]) == (0, 2)
    assert (second["hits"], second["misses"]) == (2, 0)
    assert first["text"] == plain["text"] and second["text"] == plain["text"]
    assert "mosaic_gpu" in second["text"]
    other = _lower(tmp_path, keys=128)  # another decode tuning: its own entry, the prefill kernel a hit
    assert (other["hits"], other["misses"]) == (1, 1)
    assert other["text"] != plain["text"]
    assert len(list(tmp_path.glob("*.mlirbc"))) == 3 and not list(tmp_path.glob("*.tmp"))


def test_install_is_idempotent_and_reversible(tmp_path):
    from jax._src.pallas.mosaic_gpu import lowering
    from jaxserve.pallas_kernels import mosaic_cache
    original = lowering.lower_unpipelined_jaxpr_to_module
    assert mosaic_cache.install(tmp_path / "a")
    wrapped = lowering.lower_unpipelined_jaxpr_to_module
    assert mosaic_cache.install(tmp_path / "b")  # a second install re-wraps the original, not the wrapper
    assert lowering.lower_unpipelined_jaxpr_to_module._jaxserve_original is original
    assert wrapped is not original
    mosaic_cache.uninstall()
    assert lowering.lower_unpipelined_jaxpr_to_module is original


def _barrier_kernel(arrivals: int, name: str):
    """A kernel whose lowering depends on a barrier's arrival count, which str(jaxpr) prints as `barrier`."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_ref, o_ref, s, bar):
        plgpu.copy_gmem_to_smem(x_ref, s, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        plgpu.copy_smem_to_gmem(s, o_ref)
        plgpu.wait_smem_to_gmem(0)

    def f(x):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 64), jnp.bfloat16),
                            scratch_types=[plgpu.SMEM((64, 64), jnp.bfloat16, transforms=tiled),
                                           plgpu.Barrier(num_arrivals=arrivals, num_barriers=1)],
                            kernel_name=name)(x)
    return f


def test_key_sees_what_the_printed_jaxpr_hides_and_only_our_kernels_are_cached(tmp_path):
    import jax
    import jax.numpy as jnp
    from gpu_lowering import lower_for_h100
    from jaxserve.pallas_kernels import mosaic_cache
    x = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    assert mosaic_cache.install(tmp_path)
    try:
        before = mosaic_cache.stats()
        texts = [lower_for_h100(_barrier_kernel(n, "paged_decode_mgpu_test"), x) for n in (1, 2)]
        after = mosaic_cache.stats()
        assert after["misses"] - before["misses"] == 2 and after["hits"] == before["hits"]  # two keys, no stale hit
        assert texts[0] != texts[1]
        lower_for_h100(_barrier_kernel(1, "someone_elses_kernel"), x)  # not ours: lowered, never stored
        assert len(list(tmp_path.glob("*.mlirbc"))) == 2
    finally:
        mosaic_cache.uninstall()
