"""Packaging: repo folders models/ and pallas_kernels/ install as jaxserve.models and jaxserve.pallas_kernels
(pyproject.toml package-dir), never as top-level packages; README and .ci/run quote the same test command."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_import_from_the_installed_distribution(tmp_path):
    # From an unrelated folder, so nothing resolves through the current directory or the repo root.
    code = ("import importlib.util, jaxserve, jaxserve.models, jaxserve.pallas_kernels, jaxserve.models.llama, "
            "jaxserve.pallas_kernels.reference\n"
            "print(jaxserve.models.__file__); print(jaxserve.pallas_kernels.__file__)\n"
            "spec = importlib.util.find_spec('models'); print(spec.origin if spec else None)\n"
            "spec = importlib.util.find_spec('pallas_kernels'); print(spec.origin if spec else None)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    models_file, kernels_file, top_models, top_kernels = proc.stdout.split()[-4:]
    # editable install: the files are the repo's own folders; a wheel install puts them under jaxserve/
    assert Path(models_file).parent.name in ("models",) and Path(models_file).name == "__init__.py"
    assert Path(kernels_file).parent.name == "pallas_kernels"
    # our folders are not importable as top-level `models` / `pallas_kernels`
    for origin in (top_models, top_kernels):
        assert origin == "None" or not origin.startswith(str(REPO)), origin


@pytest.mark.slow
def test_wheel_maps_folders_under_jaxserve(tmp_path):
    """A real (non-editable) wheel: jaxserve/models/*, jaxserve/pallas_kernels/*, no top-level models/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("jaxserve", "models", "pallas_kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "setuptools" in proc.stderr and "No matching distribution" in proc.stderr:
        pytest.skip("no setuptools for the isolated build (offline)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("jaxserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxserve/models/__init__.py" in names and "jaxserve/models/llama.py" in names
    assert "jaxserve/pallas_kernels/__init__.py" in names and "jaxserve/pallas_kernels/paged_decode.py" in names
    assert "jaxserve/server/app.py" in names
    assert not any(n.startswith(("models/", "pallas_kernels/")) for n in names), names
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["jaxserve"]


def test_readme_and_ci_run_quote_the_same_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    args = re.search(r"^PYTEST_ARGS=\((.*)\)$", ci, re.M).group(1)
    assert "tests" in args.split() and "-x" not in args.split()
    assert f"python -m pytest {args}" in readme
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert "-m jaxserve.serve" in blocks[0] and "python3.12 -m venv" in blocks[0]  # 1: install + serve
    assert blocks[1].strip() == "bash .ci/run"  # 2: the tests, exactly what CI runs
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111  # executable


def test_readme_flags_exist():
    """Every --flag the README shows is one the server, bench or batch scripts accept."""
    from jaxserve.serve import make_parser

    readme = (REPO / "README.md").read_text()
    known = {a for act in make_parser()._actions for a in act.option_strings}
    for script in ("bench_throughput.py", "run_batch.py", "bench_serving.py", "bench_latency.py", "bench_frontend.py"):
        text = (REPO / "scripts" / script).read_text()
        known |= set(re.findall(r"--[a-z][a-z0-9-]+", text))
    known |= set(re.findall(r"--[a-z][a-z0-9-]+", (REPO / ".ci" / "run").read_text()))  # pytest's
    known |= {"--gpus", "--no-deps"}  # docker run's, pip download's
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", readme))
    assert shown - known == set()
