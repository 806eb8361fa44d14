"""Every kernel instantiation of gpu/sortpool_kernels.cu compiles for a GPU.

With nvcc, wherever it is on the PATH (as on CI), GPU or not: the
instantiations are the exact name expressions the engine gives NVRTC, taken
by address as NVRTC's name expressions are. With NVRTC itself, wherever
libnvrtc can be loaded (``SORTPOOL_NVRTC_LIB``, the nvidia-cuda-nvrtc wheel
that CuPy installs, a CUDA toolkit), GPU or not: the source, name
expressions and options that ``cupy.RawModule`` passes. Each is skipped
visibly where its compiler is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from sortpool_ref.gpu import _plan

NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on the PATH: kernels not compiled")


@needs_nvcc
def test_every_instantiation_compiles(tmp_path):
    names = _plan.all_name_expressions()
    # two translation units, compiled side by side (each nvcc is one
    # process on one core)
    jobs = []
    for part, chunk in enumerate((names[0::2], names[1::2])):
        lines = [f'#include "{_plan.SOURCE_PATH.name}"',
                 "void* const sortpool_every_instantiation[] = {"]
        lines += [f"    (void*)&{name}," for name in chunk]
        lines += ["};"]
        unit = tmp_path / f"instantiate{part}.cu"
        unit.write_text("\n".join(lines) + "\n")
        cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin",
               f"-I{_plan.SOURCE_PATH.parent}", "--resource-usage",
               "-Werror", "all-warnings", "-diag-suppress", "177",
               str(unit), "-o", str(tmp_path / f"sortpool{part}.cubin")]
        jobs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    entries = set()
    for job in jobs:
        output = job.communicate()[0]
        assert job.returncode == 0, output
        entries |= set(re.findall(r"Compiling entry function '(\w+)'",
                                  output))
    # one kernel per name expression, each a distinct mangled symbol
    assert len(entries) == len(names), sorted(entries)
    for base in ("sortpool_forward", "sortpool_backward_x_owned",
                 "sortpool_backward_x_gather", "sortpool_backward_x_cells",
                 "sortpool_grad_w_partials", "sortpool_rank_weights",
                 "sortpool_sum_columns", "sortpool_grad_w_finish"):
        assert any(base in e for e in entries), base


# -- NVRTC, as CuPy's RawModule drives it ------------------------------------

def _nvrtc_candidates():
    import glob
    import os
    import site
    import sys

    env = os.environ.get("SORTPOOL_NVRTC_LIB")
    if env:
        yield env
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots += [p for p in sys.path if p.endswith("site-packages")]
    for root in roots:  # the nvidia-cuda-nvrtc wheel (CuPy's dependency)
        yield from sorted(glob.glob(os.path.join(
            root, "nvidia", "*", "lib", "libnvrtc.so*")))
        yield from sorted(glob.glob(os.path.join(
            root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
    for cuda in sorted(glob.glob("/usr/local/cuda*")):
        yield from sorted(glob.glob(os.path.join(cuda, "lib64",
                                                 "libnvrtc.so*")))
    import ctypes.util
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found


def _load_nvrtc():
    import ctypes
    import glob
    import os

    for path in _nvrtc_candidates():
        if "builtins" in os.path.basename(path) or ".alt." in path:
            continue
        folder = os.path.dirname(path)
        # NVRTC dlopens libnvrtc-builtins by name: load it first, globally
        for builtins in sorted(glob.glob(os.path.join(
                folder, "libnvrtc-builtins.so*"))):
            if ".alt." in builtins:
                continue
            try:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError:
                pass
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib, path
    return None, None


class _Nvrtc:
    def __init__(self, lib):
        self.lib = lib

    def _check(self, status, what):
        if status != 0:
            raise AssertionError(
                f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, source, names, options):
        """(log, {name expression: lowered name}, cubin size)."""
        import ctypes

        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), b"sortpool_kernels.cu", 0,
            None, None), "nvrtcCreateProgram")
        try:
            for name in names:
                self._check(lib.nvrtcAddNameExpression(prog, name.encode()),
                            f"nvrtcAddNameExpression({name})")
            opts = [o.encode() for o in options]
            status = lib.nvrtcCompileProgram(
                prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(max(size.value, 1))
            lib.nvrtcGetProgramLog(prog, log)
            log_text = log.value.decode(errors="replace").strip()
            assert status == 0, f"NVRTC failed ({options}):\n{log_text}"
            lowered = {}
            for name in names:
                out = ctypes.c_char_p()
                self._check(lib.nvrtcGetLoweredName(
                    prog, name.encode(), ctypes.byref(out)),
                    f"nvrtcGetLoweredName({name})")
                lowered[name] = out.value.decode()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)),
                        "nvrtcGetCUBINSize")
            return log_text, lowered, size.value
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc():
    lib, path = _load_nvrtc()
    if lib is None:
        pytest.skip("no libnvrtc found (set SORTPOOL_NVRTC_LIB, or install "
                    "the nvidia-cuda-nvrtc wheel): NVRTC compile not checked")
    return _Nvrtc(lib)


# What cupy.RawModule(code, options, name_expressions) hands NVRTC for an
# H100/H200: the engine's options, then CuPy's -ftz=true and the device's
# architecture (CuPy's include paths do not matter: the source includes
# nothing).
_CUPY_OPTIONS = _plan.COMPILE_OPTIONS + ("-ftz=true",
                                         "--gpu-architecture=sm_90")


def test_every_instantiation_compiles_with_nvrtc(nvrtc):
    names = _plan.all_name_expressions()
    log, lowered, cubin = nvrtc.compile(_plan.SOURCE_PATH.read_text(), names,
                                        _CUPY_OPTIONS)
    assert log == "", log  # not even a warning
    assert cubin > 0
    # one distinct kernel symbol per name expression
    assert len(set(lowered.values())) == len(names)
    for name, symbol in lowered.items():
        base = name.split("<")[0]
        assert symbol.startswith("_Z") and base in symbol, (name, symbol)


def test_one_engine_module_compiles_with_nvrtc(nvrtc):
    # exactly one module as the engine builds it: one dtype and variant
    names = _plan.module_name_expressions(np.float32, (0, 4))
    log, lowered, _ = nvrtc.compile(_plan.SOURCE_PATH.read_text(), names,
                                    _CUPY_OPTIONS)
    assert log == "", log
    assert set(lowered) == set(names)
