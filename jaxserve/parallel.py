"""Tensor and pipeline parallelism: the device mesh, the per-shard weight layout, the sharded step.

Design note (docs/PARALLEL.md has the long form).
- Mesh: `tp * pp` devices as a (pp, tp) grid with axes ("pp", "tp"). Row s is pipeline stage s; each
  stage is its own 1-D "tp" mesh holding the weights and KV pages of its layers.
- Tensor parallelism, Megatron style: each stage's forward runs inside `jax.shard_map` over its "tp"
  mesh with per-shard weights (partition specs declared beside each weight in models/llama.py). The
  attention backend sees only the shard's kv heads; one psum follows wo and one w_down (2 all-reduces
  per layer); the last stage computes logits on its vocab slice and all-gathers them (1 all-gather).
- Runtime layout for N shards (`TpLayout`, applied by the loader and by dummy weights alike):
  kv heads: kept when K % N == 0, else (N % K == 0) each kv head is repeated r = N / K times and its
  G query heads are split between the copies (copy j of kv head k takes q heads j*G' .. (j+1)*G' - 1,
  G' = H / N), so query head h (unchanged order: wo is untouched) still reads a copy of kv head h // G
  and the cache holds N heads. Intermediate and vocab sizes are padded with zeros to a multiple of N:
  silu(0) * 0 = 0 keeps the MLP exact, and the padded logit columns are cut off before sampling.
- Pipeline parallelism, the simple correct version: stage by stage in one host thread, each stage
  one jitted (KV-donating) call on its own devices, the hidden state device_put to the next stage.
  Stages do not overlap (no micro-batches in flight): PP here buys memory capacity, not speed.
- Logits come back as one device's copy (they are replicated), so sampling runs on a single device.
- One stage in one process: the runner jits stage 0's step together with the step's input unpacking
  (`model_runner.packed_forward`), one program per step; otherwise the inputs are unpacked first.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve.models.arch import ArchConfig

TP, PP = "tp", "pp"  # mesh axis names (models/llama.py declares weight specs over TP)
KV_SPEC = P(TP, None, None, None)  # KV pages [K, num_blocks, block_size, E]: split by kv head


def _round_up(x: int, n: int) -> int:
    return -(-x // n) * n


@dataclasses.dataclass(frozen=True)
class TpLayout:
    size: int  # N shards
    num_kv_heads: int  # kv heads at runtime (and in the cache): K, or N when K < N
    kv_repeat: int  # copies of each checkpoint kv head (N / K when K < N, else 1)
    intermediate_size: int  # padded to a multiple of N
    vocab_size: int  # padded to a multiple of N (logits are cut back to the checkpoint's vocab)


def valid_tp_sizes(arch: ArchConfig, max_size: int) -> list[int]:
    H, K = arch.num_heads, arch.num_kv_heads
    return [n for n in range(1, max_size + 1) if H % n == 0 and (K % n == 0 or n % K == 0)]


def tp_layout(arch: ArchConfig, n: int) -> TpLayout:
    valid = valid_tp_sizes(arch, arch.num_heads)
    if n not in valid:
        raise ValueError(f"--tensor-parallel-size {n} does not fit {arch.num_heads} query heads and "
                         f"{arch.num_kv_heads} kv heads (the query heads must divide by it, and the kv heads "
                         f"divide by it or it by them); valid sizes: {', '.join(map(str, valid))}")
    K = arch.num_kv_heads
    kv = K if K % n == 0 else n
    return TpLayout(n, kv, kv // K, _round_up(arch.intermediate_size, n), _round_up(arch.vocab_size, n))


def runtime_arch(arch: ArchConfig, layout: TpLayout) -> ArchConfig:
    """The shapes the model is built with: expanded kv heads, padded intermediate and vocab sizes."""
    return dataclasses.replace(arch, num_kv_heads=layout.num_kv_heads, intermediate_size=layout.intermediate_size,
                               vocab_size=layout.vocab_size)


def checkpoint_shape(leaf: str, shape: tuple, arch: ArchConfig) -> tuple:
    """The checkpoint-layout shape of a runtime weight (inverse of `relayout`'s shape change)."""
    D, K, G, E, I, V = (arch.hidden_size, arch.num_kv_heads, arch.q_per_kv, arch.head_dim,
                        arch.intermediate_size, arch.vocab_size)
    return {"wqkv": (D, K, G + 2, E), "bqkv": (K, G + 2, E), "w_gate_up": (D, 2, I), "w_down": (I, D),
            "embed": (V, D), "lm_head": (D, V)}.get(leaf, tuple(shape))


def relayout(leaf: str, a, layout: TpLayout | None, xp=np):
    """One fused weight (models/llama.py layout, checkpoint sizes) -> its runtime layout for `layout`.

    `xp` is numpy (the loader, on the host) or jax.numpy (dummy weights, on the device).
    """
    if layout is None:
        return a

    def pad(axis: int, to: int):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, to - a.shape[axis])
        return xp.pad(a, widths)

    r = layout.kv_repeat
    if leaf in ("wqkv", "bqkv") and r > 1:
        x = a if leaf == "wqkv" else a[None]  # (D, K, G+2, E)
        D, K, C, E = x.shape
        G = C - 2
        q = x[:, :, :G].reshape(D, K * r, G // r, E)  # copy j of kv head k: q heads j*G' .. (j+1)*G' - 1
        kv = xp.repeat(x[:, :, G:], r, axis=1)  # (D, K*r, 2, E)
        x = xp.concatenate([q, kv], axis=2)  # (D, K*r, G'+2, E)
        return x if leaf == "wqkv" else x[0]
    if leaf == "w_gate_up":
        return pad(2, layout.intermediate_size)
    if leaf == "w_down":
        return pad(0, layout.intermediate_size)
    if leaf == "embed":
        return pad(0, layout.vocab_size)
    if leaf == "lm_head":
        return pad(1, layout.vocab_size)
    return a


def split_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, end) layer range of each stage, as even as possible (earlier stages take the remainder)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"--pipeline-parallel-size {pp} must be between 1 and the model's {num_layers} layers")
    bounds = np.cumsum([0] + [num_layers // pp + (s < num_layers % pp) for s in range(pp)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class ParallelPlan:
    """tp x pp over the first tp*pp devices: mesh, weight/KV shardings, the stage-by-stage forward."""

    def __init__(self, arch: ArchConfig, tp: int = 1, pp: int = 1, devices=None):
        devices = list(jax.devices() if devices is None else devices)
        self.tp, self.pp = tp, pp
        self.layout = tp_layout(arch, tp)
        self.stages = split_layers(arch.num_layers, pp)
        if tp * pp > len(devices):
            raise ValueError(f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} devices, but "
                             f"only {len(devices)} are visible")
        self.checkpoint_arch = arch
        self.arch = runtime_arch(arch, self.layout)
        self.mesh = Mesh(np.array(devices[:tp * pp]).reshape(pp, tp), (PP, TP))
        self.stage_meshes = [Mesh(self.mesh.devices[s], (TP,)) for s in range(pp)]
        self.replicated = [NamedSharding(m, P()) for m in self.stage_meshes]
        self.stage_fns: list = []  # the jitted per-stage steps, after make_forward (tests lower them)
        # The same steps un-jitted: with one stage the runner folds its input unpacking into stage 0's program.
        self.stage_steps: list = []
        self.microbatch_min_tokens = 0  # steps this long run as two micro-batches (pp > 1); set by the builder
        self.forward_microbatched = None  # after make_forward

    # ----------------------------------------------------------------------------------- placement
    def stage_of_layer(self, i: int) -> int:
        return next(s for s, (a, b) in enumerate(self.stages) if a <= i < b)

    def _stage_of_param(self, top: str) -> int:
        if top.startswith("layers_"):
            return self.stage_of_layer(int(top.split("_")[1]))
        return 0 if top == "embed" else self.pp - 1  # final_norm, lm_head

    def param_shardings(self, specs):
        """NamedSharding per weight: its stage's tp mesh with its declared spec."""
        return {top: jax.tree.map(lambda s, m=self.stage_meshes[self._stage_of_param(top)]: NamedSharding(m, s),
                                  sub, is_leaf=lambda x: isinstance(x, P))
                for top, sub in specs.items()}

    def split_params(self, params) -> tuple[dict, ...]:
        """Global params -> one dict per stage (a tied embedding is copied to the last stage too)."""
        out = tuple({} for _ in range(self.pp))
        for top, sub in params.items():
            out[self._stage_of_param(top)][top] = sub
        if self.pp > 1 and self.arch.tie_word_embeddings:
            out[-1]["embed"] = jax.device_put(params["embed"], self.replicated[-1])
        return out

    def stage_specs(self, specs) -> list[dict]:
        out = [{} for _ in range(self.pp)]
        for top, sub in specs.items():
            out[self._stage_of_param(top)][top] = sub
        if self.pp > 1 and self.arch.tie_word_embeddings:
            out[-1]["embed"] = specs["embed"]
        return out

    def kv_shardings(self) -> list[NamedSharding]:
        """Per layer: its stage's mesh, pages split by kv head."""
        return [NamedSharding(self.stage_meshes[self.stage_of_layer(i)], KV_SPEC)
                for i in range(self.arch.num_layers)]

    def kv_bytes_per_block(self, block_size: int, dtype) -> int:
        """KV bytes one block costs on the most loaded device (its stage's layers, K/tp heads each)."""
        layers = max(b - a for a, b in self.stages)
        heads = self.layout.num_kv_heads // self.tp
        return 2 * layers * heads * block_size * self.arch.head_dim * np.dtype(dtype).itemsize

    def local_devices(self) -> list:
        return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

    # ------------------------------------------------------------------------------------- forward
    def make_forward(self, model, specs):
        """-> forward(params, kv, token_ids, meta, logits_indices) -> (logits f32[S, V] on one device, kv).

        `params` is `split_params`' tuple; kv the tuple over all layers (each stage's slice donated).
        """
        stage_specs = self.stage_specs(specs)
        vocab = self.checkpoint_arch.vocab_size
        self.stage_fns, self.stage_steps = [], []
        for s, (a, b) in enumerate(self.stages):
            m = model.clone(tp_axis=TP if self.tp > 1 else None, layer_start=a, layer_end=b)
            last = s == self.pp - 1

            def run(params, kv, x, meta, li, m=m):
                return m.apply({"params": params}, x, kv, meta, li)

            if self.tp > 1:
                run = jax.shard_map(run, mesh=self.stage_meshes[s], in_specs=(stage_specs[s], KV_SPEC, P(), P(), P()),
                                    out_specs=(P(), KV_SPEC), check_vma=False)
                # check_vma=False: attention backends (jnp loops, Pallas kernels) are written per device and
                # know nothing of varying-axis types; the psums and the all-gather make the outputs replicated.

            def step(params, kv, x, meta, li, run=run, last=last):
                out, kv = run(params, kv, x, meta, li)
                if last and out.shape[-1] != vocab:
                    out = out[:, :vocab]  # drop the padded vocab columns before anything samples them
                return out, kv

            self.stage_steps.append(step)
            self.stage_fns.append(jax.jit(step, donate_argnums=(1,)))

        def forward(params, kv, token_ids, meta, li):
            # One process: device arrays (the runner's packed inputs), copied to each stage's mesh without a
            # sync. Multi-host: host arrays (numpy; warm-up's jnp zeros are brought back), every process puts
            # its own copy.
            if jax.process_count() > 1:
                token_ids, meta, li = jax.tree.map(np.asarray, (token_ids, meta, li))
            logits, kv = forward_microbatched(params, kv, [(token_ids, meta, li)])
            return logits[0], kv

        def forward_microbatched(params, kv, micro):
            """micro: [(token_ids, meta, li)] in order -> ([logits per micro-batch], kv). Stage s takes micro-batch
            m after m - 1 (the KV of its tokens is written before a later micro-batch reads it), and launches are
            asynchronous, so stage s + 1 works on micro-batch m while stage s works on m + 1."""
            xs, new_kv = [ids for ids, _, _ in micro], []
            for s, (a, b) in enumerate(self.stages):
                kv_s = kv[a:b]
                for m, (_, meta, li) in enumerate(micro):
                    x, mt, lt = jax.device_put((xs[m], meta, li), self.replicated[s])  # (T,) ids or (T, D) hidden
                    xs[m], kv_s = self.stage_fns[s](params[s], kv_s, x, mt, lt)
                new_kv.extend(kv_s)
            return [x.addressable_data(0) for x in xs], tuple(new_kv)  # replicated: one local copy serves sampling

        self.forward_microbatched = forward_microbatched
        return forward

    def copy_blocks(self, kv, src, dst):
        """Copy-on-write page copies, one jitted call per stage (a call cannot span stages' devices)."""
        from jaxserve.kv_cache import copy_blocks
        src, dst = np.asarray(src, np.int32), np.asarray(dst, np.int32)
        out = []
        for a, b in self.stages:
            out.extend(copy_blocks(kv[a:b], src, dst))
        return tuple(out)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Counts of collective ops in compiled HLO text (an async start/done pair counts once)."""
    ops = re.findall(r"(?<![%\w.-])(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                     r"(?:-start)?\(", hlo_text)
    out: dict[str, int] = {}
    for op in ops:
        out[op] = out.get(op, 0) + 1
    return out
