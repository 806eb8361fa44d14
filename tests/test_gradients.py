"""Gradients against central finite differences, and adjoint dot-tests.

Inputs have pairwise distinct values (gap 0.1) and pad values that sit
between them, so a step of 1e-6 never changes a ranking: the output is then
exactly linear in x, and central differences are exact up to rounding
(about eps_machine * |L| / step = 1e-10 relative). In w the softmax is smooth
and the truncation error is O(step^2) = 1e-12.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sortpool_ref
from sortpool_ref.testing import strategies as sps

from conftest import to_engine, to_host

STEP = 1e-6
# Pad values at an odd multiple of 0.05: never equal to a distinct value.
PAD_VALUES = (None, 0.05, -1.55)


def forward(engine, case, x, w):
    return to_host(sortpool_ref.sortpool2d(
        to_engine(engine, x), to_engine(engine, w), engine=engine,
        **case.kwargs))


def backward(engine, case, g):
    gx, gw = sortpool_ref.sortpool2d_backward(
        to_engine(engine, g), to_engine(engine, case.x),
        to_engine(engine, case.w), engine=engine, **case.kwargs)
    return to_host(gx), to_host(gw)


def fd_tolerance(loss_terms):
    """Rounding error bound of a central difference of L = <y, g>."""
    return 1e-13 * loss_terms / STEP + 1e-9


def check_directional(engine, case, seed):
    rng = np.random.default_rng(seed)
    y = forward(engine, case, case.x, case.w)
    g = rng.normal(size=y.shape)
    gx, gw = backward(engine, case, g)

    def loss(x, w):
        return float(np.sum(forward(engine, case, x, w) * g))

    terms = float(np.abs(g).sum() * (np.abs(case.x).max() + 2))
    for _ in range(2):
        u = rng.normal(size=case.x.shape)
        fd = (loss(case.x + STEP * u, case.w)
              - loss(case.x - STEP * u, case.w)) / (2 * STEP)
        assert abs(fd - np.sum(gx * u)) <= fd_tolerance(terms) * (
            1 + np.abs(u).max()), "grad_x disagrees with finite differences"
        v = rng.normal(size=case.w.shape)
        fd = (loss(case.x, case.w + STEP * v)
              - loss(case.x, case.w - STEP * v)) / (2 * STEP)
        assert abs(fd - np.sum(gw * v)) <= fd_tolerance(terms) * (
            1 + np.abs(v).max()), "grad_w disagrees with finite differences"


GEOMETRY_KINDS = {
    "plain": dict(padding=False, dilation=False, ceil_mode=False,
                  string_padding=False),
    "padded": dict(dilation=False),
    "dilated": dict(padding=False, ceil_mode=False),
    "everything": dict(),
    "overlapping": dict(max_stride=1, max_kernel=3),
}


@pytest.mark.parametrize("kind", sorted(GEOMETRY_KINDS))
def test_gradients_match_directional_finite_differences(engine, kind):
    @settings(max_examples=20)
    @given(case=sps.pooling_cases(values="distinct", pad_values=PAD_VALUES,
                                  **GEOMETRY_KINDS[kind]),
           seed=st.integers(0, 2**16))
    def check(case, seed):
        check_directional(engine, case, seed)

    check()


@pytest.mark.parametrize("weighting", ["softmax", "raw"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True),
    dict(kernel_size=3, stride=1, padding="same", pad_value=0.05),
])
def test_gradients_match_elementwise_finite_differences(engine, weighting,
                                                        per_channel,
                                                        geometry):
    """Every element of grad_x and grad_w, one finite difference each."""
    x = sps.distinct_array((1, 5, 6, 2), seed=4)
    k = 3
    rng = np.random.default_rng(5)
    w = rng.normal(size=(2, k) if per_channel else (k,))
    kwargs = dict(geometry, weighting=weighting, layout="NHWC")
    case = sps.PoolingCase(x, w, kwargs, None)
    y = forward(engine, case, x, w)
    g = rng.normal(size=y.shape)
    gx, gw = backward(engine, case, g)

    def loss(xx, ww):
        return float(np.sum(forward(engine, case, xx, ww) * g))

    tol = fd_tolerance(float(np.abs(g).sum() * (np.abs(x).max() + 2)))
    for target, grad, name in ((x, gx, "x"), (w, gw, "w")):
        fd = np.zeros_like(target)
        for idx in np.ndindex(target.shape):
            e = np.zeros_like(target)
            e[idx] = STEP
            if name == "x":
                fd[idx] = (loss(x + e, w) - loss(x - e, w)) / (2 * STEP)
            else:
                fd[idx] = (loss(x, w + e) - loss(x, w - e)) / (2 * STEP)
        np.testing.assert_allclose(grad, fd, rtol=0, atol=tol,
                                   err_msg=f"grad_{name}")


def test_adjoint_dot_test(engine):
    """<J u, v> = <u, J^T v> with J = dy/dx at x.

    With pad_value None or 0 the output is homogeneous of degree one in x
    (y = J x, ranks fixed), so J u is the forward at u with x's ranking;
    here J u comes from a central difference, exact for a map that is
    linear around x, and J^T v from the backward pass.
    """
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="distinct", pad_values=PAD_VALUES),
           seed=st.integers(0, 2**16))
    def check(case, seed):
        rng = np.random.default_rng(seed)
        u = rng.normal(size=case.x.shape)
        y = forward(engine, case, case.x, case.w)
        v = rng.normal(size=y.shape)
        ju = (forward(engine, case, case.x + STEP * u, case.w)
              - forward(engine, case, case.x - STEP * u, case.w)) / (2 * STEP)
        jtv, _ = backward(engine, case, v)
        lhs, rhs = float(np.sum(ju * v)), float(np.sum(u * jtv))
        scale = float(np.abs(v).sum() * np.abs(u).max()
                      * (np.abs(case.x).max() + 2))
        assert abs(lhs - rhs) <= fd_tolerance(scale)

    check()


def test_euler_identity_without_padding_values(engine):
    """y is homogeneous of degree 1 in x: <y(x), v> = <x, J^T v>, exactly
    up to rounding, with no finite difference at all."""
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="ties", pad_values=(None, 0.0)),
           seed=st.integers(0, 2**16))
    def check(case, seed):
        rng = np.random.default_rng(seed)
        y = forward(engine, case, case.x, case.w)
        v = rng.normal(size=y.shape)
        jtv, _ = backward(engine, case, v)
        lhs, rhs = float(np.sum(y * v)), float(np.sum(case.x * jtv))
        scale = float(np.abs(v).sum() * np.abs(case.x).max()
                      * max(1.0, np.abs(case.w).sum()))
        assert abs(lhs - rhs) <= 1e-12 * scale + 1e-300

    check()
