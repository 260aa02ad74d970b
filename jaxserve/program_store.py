"""Compiled step programs kept on disk between processes, found without tracing.

jax's persistent compilation cache keys a program on its lowered text, so even a warm start traces and lowers
every step shape before it can look one up: ~0.75 s per shape for Llama-3-8B on the H100, 13-14 s of a 21 s
warm start over 17 shapes (docs/PERF.md, session 10). This store keys each compiled step on what the program is
made of instead (`ModelRunner._program_key`: the package's source, the versions, the device and XLA flags, the
model, the weights' and the cache's layout, the step's shape), and keeps the executable jax serializes
(`jax.experimental.serialize_executable`) in a folder beside the compilation cache. A hit is loaded as it is,
with nothing traced; a miss, a file that does not load, or a runtime that cannot serialize its programs falls
back to compiling, and the step runs either way.

A file here is unpickled, as jax's own cache files are deserialized: the folder must be as trusted as the
compilation cache it sits in. `JAXSERVE_PROGRAM_STORE=0` turns the store off.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)

FOLDER = "jaxserve_programs"
MAX_BYTES = 4 << 30  # the least recently used programs go first past this (an 8B model's 17 steps: ~90 MB)
_FORMAT = 2  # change it when what a file holds changes
_STALE_TMP_S = 3600.0  # a half-written file this old belongs to a writer that died


class ProgramStore:
    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.saved = 0
        self._lock = threading.Lock()  # the counters: loads and saves come from several threads
        self.dir.mkdir(parents=True, exist_ok=True)

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    @classmethod
    def beside_compile_cache(cls) -> ProgramStore | None:
        """The store in jax's compilation cache folder; None where jax keeps no cache, or it cannot be made."""
        cache_dir = jax.config.jax_compilation_cache_dir
        if (not cache_dir or not jax.config.jax_enable_compilation_cache
                or os.environ.get("JAXSERVE_PROGRAM_STORE", "1") == "0"):
            return None
        try:
            return cls(Path(cache_dir) / FOLDER)
        except OSError as e:  # a read-only cache must not stop serving
            log.warning("compiled step programs not kept: %s", e)
            return None

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def discard(self, key: str | None) -> None:
        """Drop a stored program (one that does not load or does not run), so that the next start compiles it."""
        if key is not None:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError:  # a folder this process may not write: the file stays, a miss each time
                pass

    def load(self, key: str | None, shape: tuple):
        """The jax.stages.Compiled stored under key for step shape `shape`, loaded onto the devices it was compiled
        for; None on a miss. A file under another key or for another shape (a copied or mixed-up file) is a miss:
        padded inputs of several buckets have the same length, so such a program could run and give wrong
        tokens."""
        if key is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self._count("misses")
            return None
        from jax.experimental import serialize_executable
        try:
            fmt, stored_key, stored_shape, payload, in_tree, out_tree, device_ids = pickle.loads(data)
            if fmt != _FORMAT:
                raise ValueError(f"format {fmt}, not {_FORMAT}")
            if stored_key != key or tuple(stored_shape) != tuple(shape):
                raise ValueError(f"stored for {stored_shape} under another key, not for {shape}")
            by_id = {d.id: d for d in jax.devices()}
            if any(i not in by_id for i in device_ids):
                raise ValueError(f"devices {device_ids} are not all here")
            # The devices it was compiled for, in their order: left to its default (every device) a program of
            # 2 devices in a process of 8 aborts the process in XLA's loader (seen on CPU, jax 0.11).
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=[by_id[i] for i in device_ids])
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any broken or foreign file is a miss; the step compiles instead
            log.warning("stored step program %s not loaded (%s: %s); compiling it", path.name, type(e).__name__, e)
            self.discard(key)  # once: a program compiled now takes its place where it can be stored
            self._count("misses")
            return None
        try:
            os.utime(path)  # recently used: kept longest (prune)
        except OSError:
            pass
        self._count("hits")
        return compiled

    def save(self, key: str | None, shape: tuple, compiled) -> bool:
        """Store a compiled program under key (atomically: a reader never sees half a file). False where the
        runtime cannot serialize it or the folder cannot be written; serving goes on either way."""
        if key is None:
            return False
        from jax.experimental import serialize_executable
        try:
            device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
            data = pickle.dumps((_FORMAT, key, tuple(shape), payload, in_tree, out_tree, device_ids))
        except Exception as e:  # noqa: BLE001 - e.g. a program with closed-over constants, a runtime without it
            log.info("step program not kept for the next start: %s: %s", type(e).__name__, e)
            return False
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self.prune()
        except OSError as e:
            log.warning("step program not kept for the next start: %s", e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        self._count("saved")
        return True

    def prune(self) -> None:
        """Delete the least recently used programs until the folder holds at most max_bytes, and half-written
        files that a writer which died left behind."""
        files, now = [], time.time()
        for f in self.dir.iterdir():
            try:
                st = f.stat()
                if f.name.startswith(".") and now - st.st_mtime > _STALE_TMP_S:
                    f.unlink(missing_ok=True)
                elif f.suffix == ".bin":
                    files.append((st.st_mtime, st.st_size, f))
            except OSError:  # deleted meanwhile by another process, or not ours to delete
                continue
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total <= self.max_bytes:
                break
            try:
                f.unlink(missing_ok=True)
            except OSError:
                continue
            total -= size
