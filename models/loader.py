"""HF checkpoint -> runtime params (fused, sharded, on device).

Design: safetensors are read tensor by tensor through `safe_open` (memory-mapped), one layer's
tensors are fused into the runtime layout (models/llama.py) on the host and put on device with
their `NamedSharding` straight away, so peak host memory stays near one layer beyond the mmap and
no device ever holds a full copy of a sharded weight. Every HF name is mapped explicitly and every
shape asserted; an error names the tensor.

Converted-weights cache: the first load of a checkpoint writes the runtime layout as an orbax
checkpoint under `<cache>/converted/<key>`; later loads restore from it (keyed by the folder,
file sizes and mtimes, dtype and layout version). `load_format="dummy"` makes random weights from
config.json alone, generated on the device by jitted functions (no host copy).

Tensor parallelism: with a `TpLayout` (jaxserve/parallel.py) each fused tensor is re-laid out for
the shard count before it is put on its devices (kv heads repeated when fewer than the shards,
intermediate and vocab sizes zero-padded). Dummy weights are drawn at the checkpoint shapes and go
through the same re-layout, so a random model is the same model at every tensor-parallel size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from tqdm import tqdm

from jaxserve.models.arch import ArchConfig
from jaxserve.models.default_model import cache_root  # one definition of the cache folder
from jaxserve.parallel import checkpoint_shape, relayout

log = logging.getLogger(__name__)
LAYOUT_VERSION = 1
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    pass


def _shardings(specs, mesh):
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda s: dev, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


class _Tensors:
    """Name -> tensor over single-file or index-sharded safetensors, opened lazily, read on demand."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open
        self._open = safe_open
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: model_dir / fn for name, fn in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors in {model_dir} (only safetensors checkpoints load; "
                                      "or use load_format='dummy' for random weights)")
            self.files = {}
            for fn in files:
                with safe_open(fn, "numpy") as f:
                    self.files.update({k: fn for k in f.keys()})
        self._handles: dict[Path, object] = {}
        self.used: set[str] = set()

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.files:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        fn = self.files[name]
        if fn not in self._handles:
            self._handles[fn] = self._open(fn, "numpy").__enter__()
        arr = self._handles[fn].get_tensor(name)
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)} from config.json")
        self.used.add(name)
        return arr

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self.used)


def _layer_tensors(t: _Tensors, c: ArchConfig, i: int, dt) -> dict:
    """HF tensors of layer i, fused into the runtime layout (numpy, target dtype)."""
    D, K, G, E, I = c.hidden_size, c.num_kv_heads, c.q_per_kv, c.head_dim, c.intermediate_size
    H = K * G
    pre = f"model.layers.{i}."
    g = lambda n, s: t.get(pre + n, s).astype(np.float32)  # noqa: E731
    q = g("self_attn.q_proj.weight", (H * E, D)).T.reshape(D, K, G, E)
    k = g("self_attn.k_proj.weight", (K * E, D)).T.reshape(D, K, 1, E)
    v = g("self_attn.v_proj.weight", (K * E, D)).T.reshape(D, K, 1, E)
    attn = {"wqkv": np.concatenate([q, k, v], axis=2).astype(dt),  # (D, K, G+2, E)
            "wo": g("self_attn.o_proj.weight", (D, H * E)).T.reshape(H, E, D).astype(dt)}
    if c.qkv_bias:
        bq = g("self_attn.q_proj.bias", (H * E,)).reshape(K, G, E)
        bk = g("self_attn.k_proj.bias", (K * E,)).reshape(K, 1, E)
        bv = g("self_attn.v_proj.bias", (K * E,)).reshape(K, 1, E)
        attn["bqkv"] = np.concatenate([bq, bk, bv], axis=1).astype(dt)
    gate = g("mlp.gate_proj.weight", (I, D)).T
    up = g("mlp.up_proj.weight", (I, D)).T
    mlp = {"w_gate_up": np.stack([gate, up], axis=1).astype(dt),  # (D, 2, I)
           "w_down": g("mlp.down_proj.weight", (D, I)).T.astype(dt)}
    return {"attn_norm": g("input_layernorm.weight", (D,)).astype(dt),
            "mlp_norm": g("post_attention_layernorm.weight", (D,)).astype(dt), "attn": attn, "mlp": mlp}


def load_safetensors(model_dir: Path, c: ArchConfig, dtype: str, shardings, tp=None) -> dict:
    """`c`: the checkpoint's architecture; `tp`: a parallel.TpLayout to re-lay tensors out for (or None)."""
    t = _Tensors(model_dir)
    dt = _NP_DTYPES[dtype]

    def put(path, a, s):  # path: a key path or a leaf name
        leaf = path if isinstance(path, str) else str(path[-1].key)
        return jax.device_put(relayout(leaf, a, tp, np), s)

    params = {"embed": put("embed", t.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)).astype(dt),
                           shardings["embed"])}
    for i in tqdm(range(c.num_layers), desc="loading layers", unit="layer", disable=c.num_layers < 8):
        name = f"layers_{i}"
        params[name] = jax.tree.map_with_path(put, _layer_tensors(t, c, i, dt), shardings[name])
    params["final_norm"] = put("final_norm", t.get("model.norm.weight", (c.hidden_size,)).astype(dt),
                               shardings["final_norm"])
    if not c.tie_word_embeddings:
        if "lm_head.weight" not in t:
            raise CheckpointError("checkpoint has no 'lm_head.weight' and config.json does not tie word embeddings")
        params["lm_head"] = put("lm_head", t.get("lm_head.weight", (c.vocab_size, c.hidden_size)).T.astype(dt),
                                shardings["lm_head"])
    extra = [n for n in t.unused() if "rotary_emb" not in n]
    if extra:
        log.warning("ignored %d checkpoint tensors not used by %s: %s", len(extra), c.architecture, extra[:8])
    return params


def dummy_params(shapes, shardings, dtype: str, seed: int, arch: ArchConfig | None = None, tp=None) -> dict:
    """Random weights made on the device: N(0, 0.02) matrices, ones for norm weights, zeros for biases.

    With a TpLayout `tp` (and the checkpoint `arch`), each weight is drawn at its checkpoint shape and
    re-laid out inside the same jitted call, so the values do not depend on the shard count.
    """
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    shard_leaves = jax.tree.leaves(shardings)
    out, key, fns = [], jax.random.key(seed), {}
    jdt = jnp.dtype(dtype)
    for (path, leaf), sh in zip(leaves, shard_leaves):
        name = jax.tree_util.keystr(path)
        kind = "ones" if "norm" in name else "zeros" if "bqkv" in name else "normal"
        leaf_name = str(path[-1].key)
        src = checkpoint_shape(leaf_name, leaf.shape, arch) if tp is not None else leaf.shape
        fk = (leaf.shape, src, leaf_name, kind, sh)
        if fk not in fns:
            if kind == "normal":
                def draw(k, s=src, n=leaf_name):
                    return relayout(n, (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jdt), tp, jnp)
                fns[fk] = jax.jit(draw, out_shardings=sh)
            else:
                fill = 1.0 if kind == "ones" else 0.0
                fns[fk] = jax.jit(lambda k, s=leaf.shape, v=fill: jnp.full(s, v, jdt), out_shardings=sh)
        key, sub = jax.random.split(key)
        out.append(fns[fk](sub))
    return jax.tree.unflatten(treedef, out)


def _cache_key(model_dir: Path, dtype: str, mesh) -> str:
    h = hashlib.sha256(f"{model_dir.resolve()}|{dtype}|{LAYOUT_VERSION}|{mesh and mesh.shape}".encode())
    for fn in sorted(model_dir.glob("*")):
        if fn.suffix in (".safetensors", ".json"):
            st = fn.stat()
            h.update(f"{fn.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def param_bytes(shapes) -> int:
    return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes))


def check_fits(nbytes: int, devices) -> None:
    """Fail before loading when the weights cannot fit in device memory (per device, evenly sharded)."""
    per_dev = nbytes / len(devices)
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    stats = local[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:  # CPU: compare with host memory available
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            limit = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError):
            return
    if per_dev > limit:
        raise MemoryError(f"the model's weights need {per_dev / 2**30:.1f} GiB per device but a device has "
                          f"{limit / 2**30:.1f} GiB; use more devices (--tensor-parallel-size) or a smaller dtype")


def load_params(model_dir: str | Path, c: ArchConfig, dtype: str, shapes, specs, *, load_format: str = "auto",
                seed: int = 0, mesh=None, use_cache: bool = True, shardings=None, tp=None) -> dict:
    """Runtime params on device. `shapes`/`specs` from `llama.abstract_params` (specs give the shardings
    over `mesh`, unless `shardings` is given: parallel.ParallelPlan.param_shardings). `c` is the
    checkpoint's architecture; `tp` a parallel.TpLayout when the runtime layout differs from it."""
    model_dir = Path(model_dir)
    shardings = _shardings(specs, mesh) if shardings is None else shardings
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    nbytes = param_bytes(shapes)
    check_fits(nbytes, devices)
    t0 = time.perf_counter()
    if load_format == "dummy":
        params = dummy_params(shapes, shardings, dtype, seed, c, tp)
        jax.block_until_ready(params)
        log.info("dummy weights: %.2f GB in %.2f s", nbytes / 1e9, time.perf_counter() - t0)
        return params
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"load_format {load_format!r} is not supported (auto, safetensors, dummy)")
    ckpt = cache_root() / "converted" / _cache_key(model_dir, dtype, mesh)
    if use_cache and (ckpt / "done").exists():
        import orbax.checkpoint as ocp
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        params = ocp.StandardCheckpointer().restore(ckpt / "params", target)
        log.info("restored converted weights from %s in %.2f s", ckpt, time.perf_counter() - t0)
        return params
    params = load_safetensors(model_dir, c, dtype, shardings, tp)
    jax.block_until_ready(params)
    log.info("loaded %s (%.2f GB) in %.2f s", model_dir, nbytes / 1e9, time.perf_counter() - t0)
    if use_cache:
        _write_cache(ckpt, params, nbytes)
    return params


def _write_cache(ckpt: Path, params, nbytes: int) -> None:
    import orbax.checkpoint as ocp
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(ckpt.parent).free
    if free < 2 * nbytes:
        log.warning("not caching converted weights: %s has %.1f GB free, the conversion needs about %.1f GB "
                    "(2x the model)", ckpt.parent, free / 1e9, 2 * nbytes / 1e9)
        return
    t0 = time.perf_counter()
    shutil.rmtree(ckpt, ignore_errors=True)
    with ocp.StandardCheckpointer() as cp:
        cp.save(ckpt / "params", params)
        cp.wait_until_finished()
    (ckpt / "done").touch()
    log.info("cached converted weights at %s in %.2f s", ckpt, time.perf_counter() - t0)
