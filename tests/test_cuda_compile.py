"""Every kernel instantiation of gpu/sortpool_kernels.cu compiles for a GPU.

Runs wherever ``nvcc`` is on the PATH (as on CI), GPU or not; skipped
visibly elsewhere. The instantiations are the exact name expressions the
engine gives NVRTC, taken by address as NVRTC's name expressions are.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from sortpool_ref.gpu import _plan

NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on the PATH: kernels not compiled")


def test_every_instantiation_compiles(tmp_path):
    names = _plan.all_name_expressions()
    lines = [f'#include "{_plan.SOURCE_PATH.name}"',
             "void* const sortpool_every_instantiation[] = {"]
    lines += [f"    (void*)&{name}," for name in names]
    lines += ["};"]
    unit = tmp_path / "instantiate.cu"
    unit.write_text("\n".join(lines) + "\n")
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin",
           f"-I{_plan.SOURCE_PATH.parent}", "--resource-usage",
           "-Werror", "all-warnings", "-diag-suppress", "177",
           str(unit), "-o", str(tmp_path / "sortpool.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    entries = set(re.findall(r"Compiling entry function '(\w+)'",
                             done.stdout + done.stderr))
    # one kernel per name expression, each a distinct mangled symbol
    assert len(entries) == len(names), sorted(entries)
    for base in ("sortpool_forward", "sortpool_backward_x_owned",
                 "sortpool_backward_x_gather", "sortpool_grad_w_partials",
                 "sortpool_rank_weights", "sortpool_sum_columns",
                 "sortpool_grad_w_finish"):
        assert any(base in e for e in entries), base
