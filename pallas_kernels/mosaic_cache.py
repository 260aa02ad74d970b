"""A disk cache for the Python half of Mosaic GPU kernel lowering.

Why. JAX's persistent compilation cache is keyed by the lowered program, so every start lowers every step shape
again before it can find the compiled code. For a Pallas Triton kernel that is ~0.1 s; for a Mosaic GPU kernel it
is ~0.7 s (layout inference and dialect lowering, in Python), and the engine has one kernel per step shape (~18 on
an 80 GB GPU): most of ten seconds of a warm start. This cache keeps each kernel's lowered Mosaic module (MLIR
bytecode, parsed back in a few milliseconds) beside the compilation cache, so a warm start only re-traces.

How. `install(folder)` wraps `jax._src.pallas.mosaic_gpu.lowering.lower_unpipelined_jaxpr_to_module` (the step
behind `plgpu.kernel`). The key hashes everything the lowering reads: the kernel's jaxpr as printed, its operand and
result types, the compiler parameters and meshes, the jax/jaxlib versions, and the source of our Mosaic kernel
files (so an edit to a kernel can never be served a stale module). Anything unexpected (another jax version
without this function, an unreadable entry, a profiler-instrumented kernel) falls back to the normal lowering.
jax is pinned (0.11.2), and tests/test_mosaic_cache.py checks that a cached lowering emits the same program text as
an uncached one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
from pathlib import Path

log = logging.getLogger("jaxserve")

_KERNEL_FILES = ("paged_decode_mgpu.py", "ragged_prefill_mgpu.py")
_state: dict = {"folder": None, "hits": 0, "misses": 0}


@functools.cache
def _sources_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _KERNEL_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params) -> str:
    import jax
    import jaxlib
    parts = [jax.__version__, jaxlib.__version__, _sources_digest(), repr(gpu_mesh), repr(jax_mesh), str(jaxpr),
             repr(list(map(str, in_shapes))), repr(list(map(str, out_shapes))), repr(params)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def stats() -> dict:
    return {"hits": _state["hits"], "misses": _state["misses"], "folder": _state["folder"]}


def install(folder: str | os.PathLike) -> bool:
    """Serve Mosaic GPU lowerings from `folder` (created if needed). Returns False where this jax has no such
    lowering step (the cache then does nothing). Calling it again changes the folder."""
    try:
        from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering
        from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401 (the caller of the step)
        from jax._src.lib.mlir import ir
    except ImportError:
        return False
    original = getattr(mgpu_lowering.lower_unpipelined_jaxpr_to_module, "_jaxserve_original",
                       getattr(mgpu_lowering, "lower_unpipelined_jaxpr_to_module", None))
    if original is None:
        return False
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    _state["folder"] = str(path)

    def cached(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, *, outer_traceback=None):
        folder = Path(_state["folder"])
        try:
            key = _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params)
        except Exception as e:  # an unprintable jaxpr: lower as usual
            log.debug("mosaic lowering cache: no key (%s)", e)
            return original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, outer_traceback=outer_traceback)
        entry_path = folder / f"{key}.pkl"
        if entry_path.exists():
            try:
                entry = pickle.loads(entry_path.read_bytes())
                module = ir.Module.parse(entry["module"])
                _state["hits"] += 1
                return mgpu_lowering.LoweringResult(module, entry["grid"], entry["block"], entry["new_out_shapes"],
                                                    None, entry["gmem_scratch_shapes"])
            except Exception as e:
                log.warning("mosaic lowering cache: unreadable entry %s (%s); lowering again", entry_path.name, e)
        result = original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, outer_traceback=outer_traceback)
        _state["misses"] += 1
        if result.profiler_spec is None:
            try:
                buf = io.BytesIO()
                result.module.operation.write_bytecode(buf)
                blob = pickle.dumps(dict(module=buf.getvalue(), grid=result.grid, block=result.block,
                                         new_out_shapes=result.new_out_shapes,
                                         gmem_scratch_shapes=result.gmem_scratch_shapes))
                tmp = entry_path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(blob)
                os.replace(tmp, entry_path)  # atomic: concurrent starts never read half an entry
            except Exception as e:
                log.debug("mosaic lowering cache: not stored (%s)", e)
        return result

    cached._jaxserve_original = original
    mgpu_lowering.lower_unpipelined_jaxpr_to_module = cached
    return True


def uninstall() -> None:
    try:
        from jax._src.pallas.mosaic_gpu import lowering as mgpu_lowering
    except ImportError:
        return
    original = getattr(mgpu_lowering.lower_unpipelined_jaxpr_to_module, "_jaxserve_original", None)
    if original is not None:
        mgpu_lowering.lower_unpipelined_jaxpr_to_module = original
    _state["folder"] = None
