"""How close an engine must be to the float64 reference, and why.

Every comparison in the project is ``|actual - expected| <= rtol * scale``
elementwise, where ``scale`` is the size of the terms that were summed (not of
the result, which may cancel to zero). NaN must match NaN and infinities must
match exactly.

========  ======  ============================================================
dtype     rtol    why
========  ======  ============================================================
float64   1e-12   Same formula, different summation order: the error is a few
                  ulps (2.2e-16) times the number of terms (at most 49 ranks
                  for a 7x7 window, a few overlapping windows per input).
float32   1e-5    The engine computes in float32 while the reference rounds
                  only at the end. A window keeping m ranks accumulates at
                  most (m + 1) roundings of 6e-8 relative to the sum of
                  |p_r a_r|: 3e-6 for m = 49. 1e-5 leaves a factor of 3 and
                  still catches any wrong rank or weight, which errs by O(1).
========  ======  ============================================================

Weight gradients are accumulated in float64 by every engine, so for float32
inputs they agree with the reference to the float64 tolerance of the terms;
they are checked with the float32 row anyway, because the rank weights used
by the float32 forward were rounded to float32.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

TOLERANCES = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
}


def _finite_max_abs(a: Any) -> float:
    a = np.asarray(a, dtype=np.float64)
    finite = a[np.isfinite(a)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def tolerance_scale(kind: str, x: Any, w: Any, grad_y: Any = None,
                    weighting: str = "softmax", window_size: int = 1,
                    pad_value: Optional[float] = None) -> float:
    """Size of the summed terms for a comparison of ``kind``.

    ``kind`` is ``'y'`` (forward), ``'grad_x'`` or ``'grad_w'``. A
    ``pad_value`` takes part in the sums like a value of ``x``.
    """
    w = np.asarray(w, dtype=np.float64)
    if weighting == "softmax":
        weight_sum = 1.0
        weight_max = 1.0
    else:
        weight_sum = float(np.abs(w).sum(axis=-1).max())
        weight_max = float(np.abs(w).max())
    xmax = _finite_max_abs(x)
    if pad_value is not None and np.isfinite(pad_value):
        xmax = max(xmax, abs(float(pad_value)))
    if kind == "y":
        return max(xmax * weight_sum, np.finfo(np.float64).tiny)
    gmax = _finite_max_abs(grad_y)
    if kind == "grad_x":
        return max(gmax * weight_max * window_size, np.finfo(np.float64).tiny)
    if kind == "grad_w":
        g = np.asarray(grad_y, dtype=np.float64)
        gsum = float(np.abs(g[np.isfinite(g)]).sum())
        return max(2.0 * gsum * xmax, np.finfo(np.float64).tiny)
    raise ValueError(f"kind must be 'y', 'grad_x' or 'grad_w', got {kind!r}")


def assert_close(actual: Any, expected: Any, dtype: Any, scale: float,
                 what: str = "result") -> None:
    """Raise AssertionError unless actual matches expected (see module doc).

    ``dtype`` picks the row of :data:`TOLERANCES`; ``scale`` comes from
    :func:`tolerance_scale`.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: shape {actual.shape} != expected {expected.shape}")
    rtol = TOLERANCES[np.dtype(dtype)]
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    inf_a, inf_e = np.isinf(actual), np.isinf(expected)
    bad = nan_a != nan_e
    bad |= (inf_a | inf_e) & ~(nan_a | nan_e) & (actual != expected)
    both = ~(nan_a | nan_e | inf_a | inf_e)
    bad[both] |= np.abs(actual[both] - expected[both]) > rtol * scale
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ beyond "
            f"rtol={rtol} x scale={scale:.3g}; first at index {idx}: actual "
            f"{actual[idx]!r}, expected {expected[idx]!r}")
