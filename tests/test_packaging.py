"""A wheel built from the repository carries the CUDA sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_FILES = ("sortpool_kernels.cu", "host_shim.h", "engine.py", "_plan.py",
             "check.py", "__init__.py")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # build from a copy, so that the shared checkout gets no build/ folder
    src = tmp_path_factory.mktemp("src") / "sortpool_ref"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
        ".hypothesis", ".pytest_cache", "tests", "docs"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
           "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("sortpool_ref-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_the_cuda_engine(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in GPU_FILES:
            assert f"sortpool_ref/gpu/{name}" in names, name
        shipped = zf.read("sortpool_ref/gpu/sortpool_kernels.cu")
    assert shipped == (ROOT / "gpu" / "sortpool_kernels.cu").read_bytes()
    assert not any(n.startswith("gpu/") for n in names)
