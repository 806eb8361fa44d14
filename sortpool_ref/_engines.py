"""Which engines exist, which can run here, and how to get one.

Each engine is a module with the same two entry points,
``forward(x, w, problem)`` and ``backward(grad_y, x, w, problem)``.
Nothing is imported or compiled until an engine is asked for; whether CuPy
is installed and whether a GPU is usable are two separate facts, each found
out once.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Dict, Optional

ENGINES = ("auto", "reference", "numba", "cuda")


class EngineUnavailableError(RuntimeError):
    """The engine asked for cannot run on this machine."""


@functools.lru_cache(maxsize=None)
def numba_problem() -> Optional[str]:
    """None when Numba imports, else why it does not."""
    try:
        importlib.import_module("numba")
    except Exception as exc:  # pragma: no cover - numba is a core dependency
        return f"Numba cannot be imported ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def cupy_problem() -> Optional[str]:
    """None when CuPy imports, else why it does not."""
    try:
        importlib.import_module("cupy")
    except Exception as exc:
        return (f"CuPy is not installed or cannot be imported ({exc}); "
                "install the extra for your CUDA version, e.g. "
                "pip install 'sortpool_ref[cuda13]'")
    return None


@functools.lru_cache(maxsize=None)
def gpu_problem() -> Optional[str]:
    """None when CuPy sees at least one usable CUDA device, else why not."""
    reason = cupy_problem()
    if reason is not None:
        return reason
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"CuPy is installed but no CUDA GPU is usable ({exc})"
    if count < 1:
        return "CuPy is installed but no CUDA GPU is usable (0 devices)"
    return None


def engine_problem(name: str) -> Optional[str]:
    """None when engine ``name`` can run here, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "numba":
        return numba_problem()
    if name == "cuda":
        reason = gpu_problem()
        if reason is not None:
            return reason
        try:
            importlib.import_module("sortpool_ref.gpu.engine")
        except ImportError as exc:
            return f"the CUDA engine cannot be imported ({exc})"
        return None
    raise ValueError(
        f"engine must be one of {', '.join(repr(e) for e in ENGINES)}, "
        f"got {name!r}"
    )


def available_engines() -> Dict[str, Optional[str]]:
    """Every concrete engine mapped to None (usable) or why it is not."""
    return {name: engine_problem(name) for name in ("reference", "numba",
                                                    "cuda")}


def get_engine(name: str) -> ModuleType:
    """The engine module; raises EngineUnavailableError if it cannot run."""
    reason = engine_problem(name)
    if reason is not None:
        raise EngineUnavailableError(f"engine {name!r} is not available: "
                                     f"{reason}")
    if name == "reference":
        return importlib.import_module("sortpool_ref.reference")
    if name == "numba":
        return importlib.import_module("sortpool_ref._numba_engine")
    return importlib.import_module("sortpool_ref.gpu.engine")
