"""The CUDA engine: entry points ``forward(x, w, problem)`` and
``backward(grad_y, x, w, problem)``, like every engine of the project.

Importing this module imports CuPy; :mod:`sortpool_ref._engines` imports it
only once CuPy and a GPU are known to be usable. The kernels of
``sortpool_kernels.cu`` are compiled by NVRTC on first use, one
``cupy.RawModule`` per (device, dtype, window variant), instantiated through
``name_expressions`` and cached for the life of the process (CuPy also keeps
the compiled binaries in its on-disk kernel cache). What is launched, and with
which exact argument types, is decided in :mod:`sortpool_ref.gpu._plan`,
which the tests also run on the CPU.

Arrays: CuPy arrays, or any CUDA array that ``cupy.from_dlpack`` takes
without a copy (PyTorch CUDA tensors). Work runs on the device that holds
``x`` and on CuPy's current stream of that device; results are CuPy arrays.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple

import cupy
import numpy as np

from . import _plan
from ._plan import DEFAULT_CONFIG, LaunchConfig, Plan
from .._checks import Problem

__all__ = ["forward", "backward", "check_same_device", "as_cupy"]

#: NVRTC options (see _plan.COMPILE_OPTIONS).
_COMPILE_OPTIONS = _plan.COMPILE_OPTIONS
_modules: Dict[Tuple[int, str, Tuple[int, int]], "cupy.RawModule"] = {}
_kernels: Dict[Tuple[int, str, Tuple[int, int], str], Any] = {}
_modules_lock = threading.Lock()


def source() -> str:
    """The CUDA source text shipped with the package."""
    return _plan.SOURCE_PATH.read_text()


def _module(device_id: int, dtype: np.dtype,
            variant: Tuple[int, int]) -> "cupy.RawModule":
    key = (device_id, np.dtype(dtype).str, variant)
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            module = cupy.RawModule(
                code=source(), options=_COMPILE_OPTIONS,
                name_expressions=_plan.module_name_expressions(dtype,
                                                               variant))
            _modules[key] = module
    return module


def _kernel(device_id: int, dtype: np.dtype, variant: Tuple[int, int],
            name: str) -> Any:
    """The ``RawKernel`` of one name expression, looked up once.

    ``RawModule.get_function`` builds a new ``RawKernel`` (and looks the
    module up again) on every call; a launch should not pay for that.
    """
    key = (device_id, np.dtype(dtype).str, variant, name)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _module(device_id, dtype, variant).get_function(name)
        with _modules_lock:
            kernel = _kernels.setdefault(key, kernel)
    return kernel


def as_cupy(a: Any) -> Optional["cupy.ndarray"]:
    """``a`` as a CuPy array sharing its memory (None stays None)."""
    if a is None or isinstance(a, cupy.ndarray):
        return a
    if hasattr(a, "__dlpack__"):
        return cupy.from_dlpack(a)
    return cupy.asarray(a)  # __cuda_array_interface__, zero-copy


def check_same_device(x: Any, w: Any, grad_y: Any = None) -> None:
    """Raise ValueError unless every array is on the device of ``x``."""
    arrays = [("x", as_cupy(x)), ("w", as_cupy(w))]
    if grad_y is not None:
        arrays.append(("grad_y", as_cupy(grad_y)))
    device = arrays[0][1].device.id
    for name, a in arrays[1:]:
        if a.device.id != device:
            raise ValueError(
                f"x and {name} must be on the same device: x is on CUDA "
                f"device {device}, {name} is on CUDA device {a.device.id}")


def _plan_for(x: "cupy.ndarray", p: Problem,
              config: LaunchConfig) -> Plan:
    device_id = x.device.id
    variant = _plan.variant_for(p.geometry.window_size, p.pool_range)

    def launch(name: str, grid: int, block: int, args: tuple) -> None:
        # on CuPy's current stream of the current device (the one of x)
        _kernel(device_id, p.dtype, variant, name)((grid,), (block,), args)

    return Plan(cupy, launch, p, config)


def forward(x: Any, w: Any, problem: Problem,
            config: LaunchConfig = DEFAULT_CONFIG) -> "cupy.ndarray":
    """y for arrays already checked into ``problem``."""
    x, w = as_cupy(x), as_cupy(w)
    with x.device:
        return _plan_for(x, problem, config).forward(x, w)


def backward(grad_y: Any, x: Any, w: Any, problem: Problem,
             config: LaunchConfig = DEFAULT_CONFIG
             ) -> Tuple["cupy.ndarray", "cupy.ndarray"]:
    """(grad_x, grad_w) for arrays already checked into ``problem``."""
    grad_y, x, w = as_cupy(grad_y), as_cupy(x), as_cupy(w)
    with x.device:
        return _plan_for(x, problem, config).backward(grad_y, x, w)
