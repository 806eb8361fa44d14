"""sortpool_ref: the reference implementation of sorted weighted pooling.

Each pooling window is sorted in decreasing order; the first ``pool_range``
values are kept and their softmax-weighted sum is returned. ``pool_range = 1``
is max pooling.

``import sortpool_ref`` imports NumPy only: Numba is imported and kernels are
compiled on first use; CuPy only when the CUDA engine is asked for.
"""

from ._api import sortpool2d, sortpool2d_backward
from ._engines import EngineUnavailableError, available_engines
from .layer import SortPool2d
from . import reference

__version__ = "0.1.0"

__all__ = [
    "EngineUnavailableError",
    "SortPool2d",
    "available_engines",
    "reference",
    "sortpool2d",
    "sortpool2d_backward",
]
