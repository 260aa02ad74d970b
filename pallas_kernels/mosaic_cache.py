"""A disk cache for the Python half of Mosaic GPU kernel lowering.

Why. JAX's persistent compilation cache is keyed by the lowered program, so every start lowers every step shape
again before it can find the compiled code. For a Pallas Triton kernel that is ~0.1 s; for a Mosaic GPU kernel it
is ~0.7 s (layout inference and dialect lowering, in Python), and the engine has one kernel per step shape (~18 on
an 80 GB GPU): most of ten seconds of a warm start. This cache keeps each kernel's lowered Mosaic module (MLIR
bytecode, parsed back in a few milliseconds) beside the compilation cache, so a warm start only re-traces.

How. `install(folder)` wraps `jax._src.pallas.mosaic_gpu.lowering.lower_unpipelined_jaxpr_to_module` (the step
behind `plgpu.kernel`) for our own kernels only (kernel names from paged_decode_mgpu.py and ragged_prefill_mgpu.py;
any other Mosaic kernel is lowered as usual). The key hashes the kernel's jaxpr as printed, the full type of every
variable in it and its sub-jaxprs (a barrier prints as `barrier` but its type's repr carries the arrival count),
its operand and result types, the compiler parameters and meshes, the GPU, the jax/jaxlib versions, and the source
of those two files, so an edit to a kernel can never be served a stale module. An entry is JSON metadata and the
MLIR bytecode (no pickle). Anything unexpected (another jax without this function, an unreadable entry, a
profiler-instrumented kernel) falls back to the normal lowering. jax is pinned (0.11.2), and
tests/test_mosaic_cache.py checks that a cached lowering emits the same program text as an uncached one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("jaxserve")

_KERNEL_FILES = ("paged_decode_mgpu.py", "ragged_prefill_mgpu.py")
_KERNEL_NAMES = ("paged_decode_mgpu", "ragged_prefill_mgpu")  # their kernel_name prefixes
_state: dict = {"folder": None, "hits": 0, "misses": 0}


@functools.cache
def _sources_digest() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _KERNEL_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _type(aval) -> str:
    """An aval with its element type spelled out: a ref prints `Ref<smem>{barrier[1]}`, while its dtype (a
    dataclass) carries the barrier's arrival count."""
    inner = getattr(aval, "inner_aval", aval)
    return f"{aval!r} {getattr(inner, 'dtype', None)!r}"


def _types(jaxpr, out: list) -> list:
    """_type of every variable in jaxpr and its sub-jaxprs, in order (str(jaxpr) abbreviates some)."""
    from jax._src import core
    out.extend(_type(v.aval) for v in (*jaxpr.constvars, *jaxpr.invars))
    for eqn in jaxpr.eqns:
        out.extend(_type(getattr(v, "aval", v)) for v in (*eqn.invars, *eqn.outvars))
        for sub in core.jaxprs_in_params(eqn.params):
            _types(sub, out)
    return out


def _gpu() -> str:
    import jax
    try:
        d = jax.devices()[0]
        return f"{d.platform} {getattr(d, 'device_kind', '')} {getattr(d, 'compute_capability', '')}"
    except Exception:  # no backend (lowering for another device in tests)
        return "?"


def _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params) -> str:
    import jax
    import jaxlib
    parts = [jax.__version__, jaxlib.__version__, _sources_digest(), _gpu(), repr(gpu_mesh), repr(jax_mesh),
             str(jaxpr), *_types(jaxpr, []), repr(list(map(str, in_shapes))), repr(list(map(str, out_shapes))),
             repr(params)]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _ours(jaxpr) -> bool:
    name = getattr(getattr(jaxpr, "debug_info", None), "func_name", "") or ""
    return name.startswith(_KERNEL_NAMES)


def _shapes_to_json(shapes) -> list:
    return [[list(s.shape), str(s.dtype)] for s in shapes]


def _shapes_from_json(items) -> tuple:
    import jax
    import jax.numpy as jnp
    return tuple(jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for shape, dtype in items)


def _encode(result) -> bytes:
    buf = io.BytesIO()
    result.module.operation.write_bytecode(buf)
    meta = json.dumps(dict(grid=list(result.grid), block=list(result.block),
                           new_out_shapes=_shapes_to_json(result.new_out_shapes),
                           gmem_scratch_shapes=_shapes_to_json(result.gmem_scratch_shapes))).encode()
    return len(meta).to_bytes(4, "little") + meta + buf.getvalue()


def _decode(blob: bytes):
    n = int.from_bytes(blob[:4], "little")
    return json.loads(blob[4:4 + n]), blob[4 + n:]


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
        if not _ours(jaxpr):
            return original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, outer_traceback=outer_traceback)
        try:
            key = _key(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params)
        except Exception as e:  # an unprintable jaxpr: lower as usual
            log.debug("mosaic lowering cache: no key (%s)", e)
            return original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, outer_traceback=outer_traceback)
        entry_path = folder / f"{key}.mlirbc"
        if entry_path.exists():
            try:
                meta, bytecode = _decode(entry_path.read_bytes())
                module = ir.Module.parse(bytecode)
                result = mgpu_lowering.LoweringResult(
                    module, tuple(meta["grid"]), tuple(meta["block"]), _shapes_from_json(meta["new_out_shapes"]),
                    None, _shapes_from_json(meta["gmem_scratch_shapes"]))
                _state["hits"] += 1
                return result
            except Exception as e:
                log.warning("mosaic lowering cache: unreadable entry %s (%s); lowering again", entry_path.name, e)
        result = original(gpu_mesh, jax_mesh, jaxpr, in_shapes, out_shapes, params, outer_traceback=outer_traceback)
        _state["misses"] += 1
        if result.profiler_spec is None:
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")  # one per writer (threads, hosts)
                with os.fdopen(fd, "wb") as f:
                    f.write(_encode(result))
                os.replace(tmp, entry_path)  # atomic: concurrent starts never read half an entry
            except Exception as e:
                log.debug("mosaic lowering cache: not stored (%s)", e)
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
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
