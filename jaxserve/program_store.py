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
from pathlib import Path

import jax

log = logging.getLogger(__name__)

FOLDER = "jaxserve_programs"
MAX_BYTES = 4 << 30  # the least recently used programs go first past this (an 8B model's 17 steps: ~90 MB)
_FORMAT = 1  # change it when what a file holds changes


class ProgramStore:
    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES):
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.saved = 0
        self.dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def beside_compile_cache(cls) -> ProgramStore | None:
        """The store in jax's compilation cache folder; None where there is none, or it cannot be made."""
        cache_dir = jax.config.jax_compilation_cache_dir
        if not cache_dir or os.environ.get("JAXSERVE_PROGRAM_STORE", "1") == "0":
            return None
        try:
            return cls(Path(cache_dir) / FOLDER)
        except OSError as e:  # a read-only cache must not stop serving
            log.warning("compiled step programs not kept: %s", e)
            return None

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.bin"

    def load(self, key: str | None):
        """The jax.stages.Compiled stored under key, loaded onto this process's devices; None on a miss."""
        if key is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        from jax.experimental import serialize_executable
        try:
            fmt, payload, in_tree, out_tree, device_ids = pickle.loads(data)
            if fmt != _FORMAT:
                raise ValueError(f"format {fmt}, not {_FORMAT}")
            by_id = {d.id: d for d in jax.devices()}
            if any(i not in by_id for i in device_ids):
                raise ValueError(f"devices {device_ids} are not all here")
            # The devices it was compiled for, in their order: left to its default (every device) a program of
            # 2 devices in a process of 8 aborts the process in XLA's loader (seen on CPU, jax 0.11).
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001 - any broken or foreign file is a miss; the step compiles instead
            log.warning("stored step program %s not loaded (%s: %s); compiling it", path.name, type(e).__name__, e)
            path.unlink(missing_ok=True)  # once: a program compiled now takes its place where it can be stored
            self.misses += 1
            return None
        try:
            os.utime(path)  # recently used: kept longest (prune)
        except OSError:
            pass
        self.hits += 1
        return compiled

    def save(self, key: str | None, compiled) -> bool:
        """Store a compiled program under key (atomically: a reader never sees half a file). False where the
        runtime cannot serialize it or the folder cannot be written; serving goes on either way."""
        if key is None:
            return False
        from jax.experimental import serialize_executable
        try:
            device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
            data = pickle.dumps((_FORMAT, payload, in_tree, out_tree, device_ids))
        except Exception as e:  # noqa: BLE001 - e.g. a program with closed-over constants, a runtime without it
            log.info("step program not kept for the next start: %s: %s", type(e).__name__, e)
            return False
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("step program not kept for the next start: %s", e)
            tmp.unlink(missing_ok=True)
            return False
        self.saved += 1
        self.prune()
        return True

    def prune(self) -> None:
        """Delete the least recently used programs until the folder holds at most max_bytes."""
        files = []
        for f in self.dir.glob("*.bin"):
            try:
                st = f.stat()
            except OSError:  # deleted meanwhile by another process
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size
