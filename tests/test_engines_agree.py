"""Every fast engine against the float64 reference, and determinism.

Tolerances come from the one table in sortpool_ref.testing (TOLERANCES).
The reference is always run on the float64 copy of the same input, so a
float32 engine is compared with the exact answer for its own input.
"""

import numpy as np
import pytest
from hypothesis import given, settings

import sortpool_ref
from sortpool_ref import reference
from sortpool_ref.testing import assert_close, tolerance_scale
from sortpool_ref.testing import strategies as sps

from conftest import to_engine, to_host


def compare_with_reference(engine, case, seed=0):
    dtype = case.x.dtype
    kwargs = case.kwargs
    y = to_host(sortpool_ref.sortpool2d(
        to_engine(engine, case.x), to_engine(engine, case.w), engine=engine,
        **kwargs))
    assert y.dtype == dtype
    x64 = case.x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        y_ref = reference.sortpool2d(x64, case.w, **kwargs)
    pad_value = kwargs.get("pad_value")
    assert_close(y, y_ref, dtype, tolerance_scale(
        "y", case.x, case.w, weighting=case.weighting,
        pad_value=pad_value), "y")

    g = np.random.default_rng(seed).normal(size=y.shape).astype(dtype)
    gx, gw = sortpool_ref.sortpool2d_backward(
        to_engine(engine, g), to_engine(engine, case.x),
        to_engine(engine, case.w), engine=engine, **kwargs)
    gx, gw = to_host(gx), to_host(gw)
    assert gx.dtype == dtype and gw.dtype == case.w.dtype
    with np.errstate(invalid="ignore", over="ignore"):
        gx_ref, gw_ref = reference.sortpool2d_backward(
            g.astype(np.float64), x64, case.w, **kwargs)
    window = case.geometry.window_size
    assert_close(gx, gx_ref, dtype, tolerance_scale(
        "grad_x", case.x, case.w, g, case.weighting, window), "grad_x")
    assert_close(gw, gw_ref, dtype, tolerance_scale(
        "grad_w", case.x, case.w, g, case.weighting, pad_value=pad_value),
        "grad_w")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("values", ["normal", "ties", "special"])
def test_engine_matches_reference(fast_engine, dtype, values):
    @settings(max_examples=40)
    @given(case=sps.pooling_cases(values=values, dtype=dtype, max_batch=2,
                                  max_channels=3))
    def check(case):
        compare_with_reference(fast_engine, case)

    check()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_engine_matches_reference_on_larger_windows(fast_engine, dtype):
    @settings(max_examples=15)
    @given(case=sps.pooling_cases(values="ties", dtype=dtype, max_kernel=5,
                                  max_size=12, max_dilation=3))
    def check(case):
        compare_with_reference(fast_engine, case)

    check()


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, pad_value=0.0),
    dict(kernel_size=7),
])
def test_engine_matches_reference_on_benchmark_geometries(
        fast_engine, layout, dtype, geometry):
    """Shapes like the benchmark's, smaller; every pool_range."""
    rng = np.random.default_rng(6)
    shape = (3, 14, 14, 16) if layout == "NHWC" else (3, 16, 14, 14)
    x = rng.normal(size=shape).astype(dtype)
    x.flat[::97] = np.nan
    k_max = 9 if geometry["kernel_size"] == 3 else (
        4 if geometry["kernel_size"] == 2 else 49)
    for k in sorted({1, 2, 3, 4, k_max}):
        for per_channel in (False, True):
            w = rng.normal(size=(16, k) if per_channel else (k,))
            kwargs = dict(geometry, layout=layout)
            g = sps.make_geometry(14, 14, geometry["kernel_size"],
                                  geometry.get("stride"),
                                  geometry.get("padding", 0))
            compare_with_reference(fast_engine,
                                   sps.PoolingCase(x, w, kwargs, g), seed=k)


def run_both(engine, x, w, g, **kwargs):
    y = to_host(sortpool_ref.sortpool2d(to_engine(engine, x),
                                        to_engine(engine, w), engine=engine,
                                        **kwargs))
    gx, gw = sortpool_ref.sortpool2d_backward(
        to_engine(engine, g), to_engine(engine, x), to_engine(engine, w),
        engine=engine, **kwargs)
    return y, to_host(gx), to_host(gw)


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=1, pad_value=0.0),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_across_runs(fast_engine, geometry, dtype):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 17, 15, 8)).astype(dtype)
    w = rng.normal(size=(8, 3))
    y0 = sortpool_ref.sortpool2d(x, w, **geometry)
    g = rng.normal(size=y0.shape).astype(dtype)
    first = run_both(fast_engine, x, w, g, **geometry)
    for _ in range(3):
        again = run_both(fast_engine, x, w, g, **geometry)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=1),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_bit_identical_for_any_thread_count(geometry, dtype):
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 19, 13, 6)).astype(dtype)
    w = rng.normal(size=4)
    y0 = sortpool_ref.sortpool2d(x, w, **geometry)
    g = rng.normal(size=y0.shape).astype(dtype)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, 2, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append(run_both("numba", x, w, g, **geometry))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
