"""Multi-host serving: one `jax.distributed` job, process 0 leads, the others replay its device steps.

Design note. JAX is multi-controller: every process must run the same jitted calls on the global
arrays in the same order. Process 0 alone runs the scheduler, the server and sampling; before each
device call that touches the sharded weights or KV pages (a forward, a block copy) it broadcasts
that call's host inputs with `multihost_utils.broadcast_one_to_all`, and the followers (`follow`)
run the same call with them. Start-up (weights, profiling, KV allocation, warm-up) is the same code
on every process, so it needs no messages; only the KV block count is agreed (the minimum).
Logits are replicated, so process 0 samples from its own local copy and nothing else is mirrored.

A message is a pickled tuple (the sender is process 0 of the same job: trusted), sent as a length
then the bytes padded to a power of two (so the broadcast compiles for a handful of sizes only).
Process 0 sends "stop" at exit; if it dies instead, the followers wait in the next broadcast until
the job is killed.
"""
from __future__ import annotations

import atexit
import logging
import pickle

import jax
import numpy as np

from jaxserve.attention import AttentionMetadata
from jaxserve.model_runner import ModelRunner

log = logging.getLogger("jaxserve")
_META_FIELDS = ("slot_mapping", "positions", "token_seq_ids", "block_tables", "seq_lens", "query_start_loc")


def init_distributed(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize, before anything touches a device."""
    if not coordinator_address:
        raise ValueError("--num-processes > 1 needs --coordinator-address host:port (process 0's address)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes, coordinator_address)


def _broadcast(obj=None):
    """Process 0's `obj` on every process (others pass None)."""
    from jax.experimental import multihost_utils as mu
    leader = jax.process_index() == 0
    data = np.frombuffer(pickle.dumps(obj), np.uint8) if leader else None
    n = int(mu.broadcast_one_to_all(np.array([data.size if leader else 0], np.int32))[0])
    buf = np.zeros(max(1024, 1 << (n - 1).bit_length()), np.uint8)
    if leader:
        buf[:n] = data
    buf = np.asarray(mu.broadcast_one_to_all(buf))
    return pickle.loads(buf[:n].tobytes())


def agree_min(value: int) -> int:
    """The smallest of every process's `value`."""
    from jax.experimental import multihost_utils as mu
    return int(np.min(mu.process_allgather(np.array([value], np.int32))))


class LeaderRunner(ModelRunner):
    """Process 0's runner: announces each forward and block copy to the followers, then runs it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.device_inputs = False  # the followers replay host inputs
        self.fuse_unpack = False  # so warm-up and compile_ahead build the plain forward that steps run
        self._stopped = False
        atexit.register(self.stop_followers)

    def copy_blocks(self, src, dst) -> None:
        _broadcast(("copy", np.asarray(src), np.asarray(dst)))
        super().copy_blocks(src, dst)

    def run_forward(self, token_ids, meta: AttentionMetadata, logits_indices):
        arrays = {f: np.asarray(getattr(meta, f)) for f in _META_FIELDS}
        _broadcast(("forward", np.asarray(token_ids), arrays, meta.decode_only, np.asarray(logits_indices)))
        return super().run_forward(token_ids, meta, logits_indices)

    def stop_followers(self) -> None:
        if not self._stopped:
            self._stopped = True
            _broadcast(("stop",))


def follow(runner: ModelRunner) -> None:
    """A follower's loop: replay process 0's device calls until it says stop."""
    steps = 0
    while True:
        msg = _broadcast()
        if msg[0] == "stop":
            log.info("process %d: leader stopped after %d steps", jax.process_index(), steps)
            return
        if msg[0] == "copy":
            runner.copy_blocks(msg[1], msg[2])
        elif msg[0] == "forward":
            _, ids, arrays, decode_only, li = msg
            runner.run_forward(ids, AttentionMetadata(**arrays, decode_only=decode_only), li)
            steps += 1
        else:
            raise RuntimeError(f"unknown step message {msg[0]!r} from process 0")
