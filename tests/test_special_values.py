"""Ties, NaN, infinities and signed zeros, with hand-computed answers."""

import math

import numpy as np
import pytest

import sortpool_ref

from conftest import to_engine, to_host


def window(values, layout="NHWC"):
    """A single 2x2 window (1 sample, 1 channel) from 4 scan-order values."""
    x = np.array(values, dtype=np.float64).reshape(1, 2, 2, 1)
    return x if layout == "NHWC" else x.transpose(0, 3, 1, 2).copy()


def pool(engine, x, w, **kwargs):
    with np.errstate(invalid="ignore"):
        return to_host(sortpool_ref.sortpool2d(
            to_engine(engine, x), to_engine(engine, np.asarray(w, float)),
            engine=engine, **kwargs))


def grads(engine, x, w, g=1.0, **kwargs):
    y = pool(engine, x, w, **kwargs)
    gy = np.full_like(y, g)
    with np.errstate(invalid="ignore"):
        gx, gw = sortpool_ref.sortpool2d_backward(
            to_engine(engine, gy), to_engine(engine, x),
            to_engine(engine, np.asarray(w, float)), engine=engine, **kwargs)
    return to_host(gx), to_host(gw)


def softmax(w):
    e = np.exp(np.asarray(w) - np.max(w))
    return e / e.sum()


def test_hand_computed_window(engine):
    # window 3, 1, 4, 2 -> ranked 4, 3, 2; weights softmax([0, ln 2, 0]).
    w = [0.0, math.log(2.0), 0.0]
    p = [0.25, 0.5, 0.25]
    y = pool(engine, window([3, 1, 4, 2]), w)
    assert y.item() == pytest.approx(p[0] * 4 + p[1] * 3 + p[2] * 2, abs=1e-15)
    gx, _ = grads(engine, window([3, 1, 4, 2]), w)
    np.testing.assert_allclose(gx.ravel(), [p[1], 0.0, p[0], p[2]], atol=1e-15)


def test_ties_route_gradient_by_scan_order(engine):
    p = softmax([0.3, -0.2])
    gx, _ = grads(engine, window([5, 5, 5, 5]), [0.3, -0.2])
    # The first two positions in scan order take ranks 1 and 2.
    np.testing.assert_allclose(gx.ravel(), [p[0], p[1], 0, 0], atol=1e-15)
    gx, _ = grads(engine, window([1, 7, 3, 7]), [0.3, -0.2])
    np.testing.assert_allclose(gx.ravel(), [0, p[0], 0, p[1]], atol=1e-15)


def test_ties_follow_scan_order_in_nchw_too(engine):
    p = softmax([1.0, 0.0])
    gx, _ = grads(engine, window([2, 9, 9, 9], "NCHW"), [1.0, 0.0],
                  layout="NCHW")
    np.testing.assert_allclose(gx.ravel(), [0, p[0], p[1], 0], atol=1e-15)


def test_signed_zeros_tie(engine):
    """-0.0 equals +0.0: scan order decides, whichever sign comes first."""
    for values in ([-0.0, 0.0, -1, -2], [0.0, -0.0, -1, -2]):
        gx, _ = grads(engine, window(values), [0.0])  # max pooling
        np.testing.assert_array_equal(gx.ravel(), [1, 0, 0, 0])


def test_nan_ranks_first_and_propagates(engine):
    y = pool(engine, window([1, np.nan, 3, 2]), [0.0, 0.0])
    assert np.isnan(y.item())
    gx, _ = grads(engine, window([1, np.nan, 3, 2]), [0.0, 0.0])
    np.testing.assert_allclose(gx.ravel(), [0, 0.5, 0.5, 0])
    # Two NaNs: scan order among them, like ties.
    gx, _ = grads(engine, window([np.nan, 1, np.nan, 2]), [0.0])
    np.testing.assert_array_equal(gx.ravel(), [1, 0, 0, 0])


def test_nan_outside_the_kept_ranks_does_not_matter_when_k_is_small(engine):
    # NaN always ranks first, so it is always kept: y is NaN for any k.
    for k in (1, 2, 4):
        assert np.isnan(pool(engine, window([np.nan, 1, 2, 3]), [0.0] * k))


def test_infinities_follow_ieee(engine):
    assert pool(engine, window([np.inf, 1, 2, 3]), [0.0, 0.0]).item() == np.inf
    assert pool(engine, window([-np.inf, 1, 2, 3]),
                [0.0, 0.0]).item() == 2.5
    # -inf kept: the result is -inf.
    assert pool(engine, window([-np.inf, 1, 2, 3]), [0.0] * 4).item() \
        == -np.inf
    # +inf and -inf in one kept set: inf - inf = NaN.
    assert np.isnan(pool(engine, window([np.inf, -np.inf, 2, 3]), [0.0] * 4))


def test_gradients_with_infinite_kept_values(engine):
    """What every engine returns where a kept value is infinite (docs:
    numerics): grad_x is still g * p_r; grad_w follows IEEE through the
    section-4 formula, so inf - inf gives NaN for softmax logits."""
    gx, gw = grads(engine, window([np.inf, 1, 2, 3]), [0.0, 0.0])
    np.testing.assert_array_equal(gx.ravel(), [0.5, 0, 0, 0.5])
    # softmax: p * (G - <p, G>) with G = (inf, 3): (inf - inf) -> NaN.
    assert np.isnan(gw[0])
    gx, gw = grads(engine, window([np.inf, 1, 2, 3]), [0.5, 0.5],
                   weighting="raw")
    np.testing.assert_array_equal(gw, [np.inf, 3.0])


def test_partial_windows_renormalise_softmax(engine):
    """A 3x3 window at the corner with padding 1 has 4 real positions; with
    pool_range 9 the weights are softmax over the first 4 logits."""
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    w = np.linspace(1.0, -1.0, 9)
    y = pool(engine, x, w, kernel_size=3, stride=2, padding=1)
    corner = np.sort(x[0, :2, :2, 0].ravel())[::-1]
    assert y[0, 0, 0, 0] == pytest.approx(softmax(w[:4]) @ corner, abs=1e-14)


def test_raw_weights_are_used_as_given(engine):
    y = pool(engine, window([3, 1, 4, 2]), [2.0, -1.0], weighting="raw")
    assert y.item() == 2.0 * 4 - 1.0 * 3


def test_pad_value_takes_part_in_the_ranking(engine):
    x = np.full((1, 2, 2, 1), -5.0)
    # 3x3 stride 1 'same': the corner window holds 4 values of -5 and 5 pads.
    y = pool(engine, x, [0.0], kernel_size=3, stride=1, padding=1,
             pad_value=0.0)
    assert np.all(y == 0.0)  # the padding wins the max
    y = pool(engine, x, [0.0], kernel_size=3, stride=1, padding=1)
    assert np.all(y == -5.0)  # padding excluded by default
    gx, _ = grads(engine, x, [0.0], kernel_size=3, stride=1, padding=1,
                  pad_value=0.0)
    assert np.all(gx == 0.0)  # padded positions receive nothing


def test_ceil_mode_overhang_is_not_part_of_the_window(engine):
    """With ceil_mode the last window may reach past the padding: those
    positions are not in the window even when pad_value is a number."""
    x = np.arange(6.0).reshape(1, 1, 6, 1)  # one row: 0 1 2 3 4 5
    y = pool(engine, x, [0.0, 0.0, 0.0], kernel_size=(1, 3), stride=2,
             ceil_mode=True, pad_value=100.0)
    # Windows [0 1 2], [2 3 4], [4 5 | overhang]: no padding, so no 100.
    np.testing.assert_allclose(y.ravel(), [1.0, 3.0, 4.5])
    y = pool(engine, x, [0.0, 0.0, 0.0], kernel_size=(1, 3), stride=2,
             padding=(0, 1), ceil_mode=True, pad_value=100.0)
    # Windows [pad 0 1], [1 2 3], [3 4 5], [5 pad | overhang].
    np.testing.assert_allclose(y.ravel(), [101 / 3, 2.0, 4.0, 52.5])


def test_sign_of_a_zero_result_is_the_same_on_every_engine(engine):
    y = pool(engine, window([-0.0, -1, -1, -2]), [0.0])
    assert y.item() == 0.0 and np.signbit(y.item())
    y = pool(engine, window([-0.0, -0.0, -1, -2]), [0.0, 0.0])
    assert y.item() == 0.0 and np.signbit(y.item())
    y = pool(engine, window([0.0, -0.0, -1, -2]), [0.0, 0.0])
    assert y.item() == 0.0 and not np.signbit(y.item())


def test_plus_and_minus_inf_in_one_window_warn_nothing(engine, recwarn):
    x = window([np.inf, -np.inf, 1, 2])
    y = to_host(sortpool_ref.sortpool2d(to_engine(engine, x),
                                        to_engine(engine, np.zeros(4)),
                                        engine=engine))
    assert np.isnan(y.item())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
