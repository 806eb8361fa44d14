"""out=: results written into the caller's arrays, the same numbers as
without, whatever the arrays held before and whatever their strides."""

import re

import numpy as np
import pytest

import sortpool_ref
from sortpool_ref import reference
from sortpool_ref.testing import assert_close, tolerance_scale

from conftest import to_engine, to_host

GEOMETRIES = [
    # (kernel, stride, padding): register paths that store grad_x (2x2
    # tiling), that add into it (3x3 overlapping, 3x3 s1), a border path;
    # 3x3 s2 stores where it writes first and zeroes the other columns
    # (without padding on the even width 10, the last column is in no
    # window); 2x2 stride 3 leaves every third row and column between
    # windows, which the backward must find and zero
    dict(kernel_size=2, stride=2, padding=0),
    dict(kernel_size=2, stride=3, padding=0),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=0),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=2, stride=1, padding=1, pad_value=0.0),
]


def _stale(engine, shape, dtype, strides, layout):
    """An array of ``shape`` full of NaN where ``engine`` runs:
    C-contiguous, contiguous in the other memory order, or strided (every
    other element of a wider array)."""
    xp = np
    if engine == "cuda":
        import cupy as xp
    if strides == "C":
        return xp.full(shape, np.nan, dtype)
    if strides == "strided":
        return xp.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype)[..., ::2]
    perm = (0, 3, 1, 2) if layout == "NHWC" else (0, 2, 3, 1)
    other = xp.full(tuple(shape[i] for i in perm), np.nan, dtype)
    return other.transpose(tuple(int(i) for i in np.argsort(perm)))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("strides", ["C", "other", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES,
                         ids=lambda g: "k{kernel_size}s{stride}p{padding}"
                         .format(**g))
def test_out_gives_the_same_numbers_into_stale_arrays(engine, layout,
                                                      strides, dtype,
                                                      geometry):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 9, 10, 5)).astype(dtype)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    x[0, 1, 2, 3] = np.nan
    w = rng.standard_normal((5, 3))
    kwargs = dict(geometry, layout=layout, engine=engine)
    g = rng.standard_normal(reference.sortpool2d(x, w, **geometry,
                                                 layout=layout).shape)
    g = g.astype(dtype)
    # The reference first: results with and without out= are compared
    # with each other below, and a bug they share would go unseen.
    ref_kwargs = dict(geometry, layout=layout)
    gx_ref, gw_ref = reference.sortpool2d_backward(
        g.astype(np.float64), x.astype(np.float64), w, **ref_kwargs)
    tol_x = tolerance_scale("grad_x", x, w, g, "softmax",
                            int(np.prod(np.broadcast_to(
                                geometry["kernel_size"], 2))))
    x, w, g = (to_engine(engine, a) for a in (x, w, g))
    y = to_host(sortpool_ref.sortpool2d(x, w, **kwargs))
    gx, gw = (to_host(a) for a in
              sortpool_ref.sortpool2d_backward(g, x, w, **kwargs))
    assert_close(gx, gx_ref, dtype, tol_x, "grad_x")

    out = _stale(engine, y.shape, dtype, strides, layout)
    assert sortpool_ref.sortpool2d(x, w, out=out, **kwargs) is out
    np.testing.assert_array_equal(to_host(out), y)

    out_x = _stale(engine, x.shape, dtype, strides, layout)
    out_w = _stale(engine, w.shape, np.float64, "C", layout)
    rx, rw = sortpool_ref.sortpool2d_backward(g, x, w, out=(out_x, out_w),
                                              **kwargs)
    assert rx is out_x and rw is out_w
    np.testing.assert_array_equal(to_host(out_x), gx)
    np.testing.assert_array_equal(to_host(out_w), gw)

    # Either one alone; the other is allocated as without out.
    rx, rw = sortpool_ref.sortpool2d_backward(g, x, w, out=[None, out_w],
                                              **kwargs)
    assert rw is out_w
    np.testing.assert_array_equal(to_host(rx), gx)
    out_x[...] = np.inf
    rx, rw = sortpool_ref.sortpool2d_backward(g, x, w, out=(out_x, None),
                                              **kwargs)
    assert rx is out_x
    np.testing.assert_array_equal(to_host(out_x), gx)
    np.testing.assert_array_equal(to_host(rw), gw)


def test_out_reused_in_a_loop_does_not_accumulate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    w = np.zeros(3)
    kwargs = dict(kernel_size=3, stride=2, padding=1)
    g = np.ones((2, 4, 4, 4), np.float32)
    gx, _ = sortpool_ref.sortpool2d_backward(g, x, w, **kwargs)
    buf = np.empty_like(x)
    for _ in range(3):
        sortpool_ref.sortpool2d_backward(g, x, w, out=(buf, None), **kwargs)
    np.testing.assert_array_equal(buf, gx)


X = np.zeros((2, 6, 6, 3))
W = np.zeros(2)
G = np.zeros((2, 3, 3, 3))

FORWARD_ERRORS = [
    ("list", [[0.0]], TypeError,
     "out must be a NumPy array (the result is written into it), got list"),
    ("shape", np.zeros((2, 3, 3, 4)), ValueError,
     "out must have the result's shape (2, 3, 3, 3), got (2, 3, 3, 4)"),
    ("dtype", np.zeros((2, 3, 3, 3), np.float32), TypeError,
     "out must have the result's dtype float64, got float32"),
    ("read-only", np.lib.stride_tricks.as_strided(np.zeros(1), (2, 3, 3, 3),
                                                  (0, 0, 0, 0),
                                                  writeable=False),
     ValueError, "out is read-only"),
]


@pytest.mark.parametrize("engine", ["numba", "reference"])
@pytest.mark.parametrize("case", FORWARD_ERRORS,
                         ids=[c[0] for c in FORWARD_ERRORS])
def test_bad_out_is_rejected_before_any_work(case, engine):
    _, out, exc, message = case
    before = np.array(out, copy=True)
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        sortpool_ref.sortpool2d(X, W, out=out, engine=engine)
    np.testing.assert_array_equal(np.asarray(out), before)


def test_out_must_not_overlap_an_input():
    x = np.zeros((2, 6, 6, 3))
    with pytest.raises(ValueError, match="^out must not overlap x$"):
        sortpool_ref.sortpool2d(x, W, out=x[:, ::2, ::2])
    g = np.zeros((2, 3, 3, 3))
    with pytest.raises(ValueError,
                       match=re.escape("out[0] (grad_x) must not overlap "
                                       "grad_y")):
        sortpool_ref.sortpool2d_backward(
            g, x, W, out=(np.lib.stride_tricks.as_strided(
                g, x.shape, (0, 0, 0, 8)), None))
    gx = np.zeros((2, 6, 6, 3))
    with pytest.raises(ValueError,
                       match=re.escape("out[1] (grad_w) must not overlap "
                                       "out[0] (grad_x)")):
        sortpool_ref.sortpool2d_backward(g, x, W,
                                         out=(gx, gx[0, 0, 0, :2]))


@pytest.mark.parametrize("out, exc, message", [
    (np.zeros((2, 6, 6, 3)), TypeError,
     "out must be None or a pair (grad_x, grad_w), each an array or None, "
     "got ndarray"),
    ((None,), TypeError,
     "out must be None or a pair (grad_x, grad_w), each an array or None, "
     "got tuple"),
    ((np.zeros((2, 6, 6, 4)), None), ValueError,
     "out[0] (grad_x) must have the result's shape (2, 6, 6, 3), got "
     "(2, 6, 6, 4)"),
    ((None, np.zeros(2, np.float32)), TypeError,
     "out[1] (grad_w) must have the result's dtype float64, got float32"),
])
def test_bad_backward_out_is_rejected(out, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        sortpool_ref.sortpool2d_backward(G, X, W, out=out)
