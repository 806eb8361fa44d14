"""The identities of SPEC section 3, on every engine."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sortpool_ref
from sortpool_ref import reference
from sortpool_ref.testing import assert_close, tolerance_scale
from sortpool_ref.testing import strategies as sps

from conftest import to_engine, to_host
from naive import naive_avg_pool2d, naive_max_pool2d, naive_sortpool2d


def run(engine, case, w=None, x=None, **override):
    x = case.x if x is None else x
    w = case.w if w is None else w
    kwargs = dict(case.kwargs, **override)
    return to_host(sortpool_ref.sortpool2d(
        to_engine(engine, x), to_engine(engine, w), engine=engine, **kwargs))


def run_backward(engine, case, grad_y, w=None, **override):
    w = case.w if w is None else w
    kwargs = dict(case.kwargs, **override)
    gx, gw = sortpool_ref.sortpool2d_backward(
        to_engine(engine, grad_y), to_engine(engine, case.x),
        to_engine(engine, w), engine=engine, **kwargs)
    return to_host(gx), to_host(gw)


@settings(max_examples=25)
@given(case=sps.pooling_cases(values="normal", max_batch=1, max_channels=2),
       dtype=st.sampled_from([np.float64]))
def test_reference_equals_naive_loops(case, dtype):
    """The vectorised reference against a window-by-window loop."""
    expected = naive_sortpool2d(case.x, case.w, **case.kwargs)
    actual = reference.sortpool2d(case.x, case.w, **case.kwargs)
    assert_close(actual, expected, dtype,
                 tolerance_scale("y", case.x, case.w, weighting=case.weighting,
                                 pad_value=case.kwargs.get("pad_value")))


@settings(max_examples=25)
@given(case=sps.pooling_cases(values="special", max_batch=1, max_channels=2))
def test_reference_equals_naive_loops_special_values(case):
    expected = naive_sortpool2d(case.x, case.w, **case.kwargs)
    with np.errstate(invalid="ignore"):
        actual = reference.sortpool2d(case.x, case.w, **case.kwargs)
    assert_close(actual, expected, np.float64,
                 tolerance_scale("y", case.x, case.w, weighting=case.weighting,
                                 pad_value=case.kwargs.get("pad_value")))


@pytest.mark.parametrize("values", ["normal", "ties", "special"])
def test_pool_range_1_is_max_pooling(engine, values):
    @settings(max_examples=20)
    @given(case=sps.pooling_cases(values=values, max_pool_range=1))
    def check(case):
        w = case.w * 3.0  # any weights: one rank always gets weight 1
        if case.weighting == "raw":
            w = np.ones_like(case.w)
        y = run(engine, case, w=w)
        y_max, gx_max = naive_max_pool2d(case.x, **case.kwargs)
        np.testing.assert_array_equal(y, y_max)
        gx, _ = run_backward(engine, case, np.ones_like(y), w=w)
        np.testing.assert_array_equal(gx, gx_max)

    check()


def test_pool_range_1_matches_torch_max_pool2d(engine):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    @settings(max_examples=25)
    @given(case=sps.pooling_cases(values="ties", max_pool_range=1,
                                  layouts=("NCHW",), pad_values=(None,),
                                  weightings=("softmax",),
                                  string_padding=False))
    def check(case):
        g = case.geometry
        if (g.pad_top, g.pad_left) != (g.pad_bottom, g.pad_right):
            return  # PyTorch has no per-side padding
        kwargs = case.kwargs
        xt = torch.tensor(case.x, requires_grad=True)
        yt = F.max_pool2d(xt, (g.kernel_h, g.kernel_w),
                          (g.stride_h, g.stride_w), (g.pad_top, g.pad_left),
                          (g.dilation_h, g.dilation_w),
                          ceil_mode=kwargs["ceil_mode"])
        yt.sum().backward()
        y = run(engine, case)
        np.testing.assert_array_equal(y, yt.detach().numpy())
        gx, _ = run_backward(engine, case, np.ones_like(y))
        np.testing.assert_array_equal(gx, xt.grad.numpy())

    check()


def test_equal_logits_full_range_is_average_pooling(engine):
    @settings(max_examples=25)
    @given(case=sps.pooling_cases(values="normal", weightings=("softmax",)))
    def check(case):
        k = case.geometry.window_size
        shape = (k,) if case.w.ndim == 1 else (case.w.shape[0], k)
        w = np.full(shape, 0.7)
        y = run(engine, case, w=w)
        assert_close(y, naive_avg_pool2d(case.x, **case.kwargs),
                     case.x.dtype, tolerance_scale("y", case.x, w))

    check()


def test_average_pooling_matches_torch_avg_pool2d(engine):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    @settings(max_examples=25)
    @given(case=sps.pooling_cases(values="normal", layouts=("NCHW",),
                                  weightings=("softmax",),
                                  pad_values=(None, 0.0), dilation=False,
                                  string_padding=False))
    def check(case):
        g = case.geometry
        if (g.pad_top, g.pad_left) != (g.pad_bottom, g.pad_right):
            return
        w = np.zeros(g.window_size)
        y = run(engine, case, w=w)
        include_pad = case.kwargs["pad_value"] is not None
        yt = F.avg_pool2d(torch.tensor(case.x), (g.kernel_h, g.kernel_w),
                          (g.stride_h, g.stride_w), (g.pad_top, g.pad_left),
                          ceil_mode=case.kwargs["ceil_mode"],
                          count_include_pad=include_pad)
        assert_close(y, yt.numpy(), np.float32,  # torch sums in its own order
                     tolerance_scale("y", case.x, w))

    check()


def test_softmax_output_lies_between_window_min_and_max(engine):
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="normal", weightings=("softmax",)))
    def check(case):
        y = run(engine, case)
        # pool_range = window size with one huge / tiny logit gives max / min
        # of each window through the same code path; y must lie between.
        y_max, _ = naive_max_pool2d(case.x, **case.kwargs)
        y_min = -naive_max_pool2d(-case.x, **dict(
            case.kwargs, pad_value=None if case.kwargs["pad_value"] is None
            else -case.kwargs["pad_value"]))[0]
        slack = 1e-12 * np.abs(case.x).max()
        assert np.all(y <= y_max + slack)
        assert np.all(y >= y_min - slack)

    check()


def test_affine_equivariance(engine):
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="normal", weightings=("softmax",),
                                  pad_values=(None,)),
           a=st.floats(0.1, 10.0), b=st.floats(-5.0, 5.0))
    def check(case, a, b):
        y = run(engine, case)
        y2 = run(engine, case, x=a * case.x + b)
        scale = tolerance_scale("y", a * case.x + b, case.w)
        assert_close(y2, a * y + b, case.x.dtype, 4 * scale)  # a*x+b rounds

    check()


def test_monotone_in_x_for_nonnegative_weights(engine):
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="ties"), seed=st.integers(0, 1000))
    def check(case, seed):
        w = case.w if case.weighting == "softmax" else np.abs(case.w)
        bump = np.random.default_rng(seed).integers(0, 2, size=case.x.shape)
        x2 = case.x + bump.astype(case.x.dtype)
        y = run(engine, case, w=w)
        y2 = run(engine, case, w=w, x=x2)
        slack = 1e-5 * (np.abs(x2).max() + 1)
        assert np.all(y2 >= y - slack)

    check()


def test_layouts_give_the_same_numbers(engine):
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="ties", layouts=("NHWC",)))
    def check(case):
        y = run(engine, case)
        x_nchw = np.ascontiguousarray(case.x.transpose(0, 3, 1, 2))
        y2 = run(engine, case, x=x_nchw, layout="NCHW")
        np.testing.assert_array_equal(y2.transpose(0, 2, 3, 1), y)
        g = np.random.default_rng(0).normal(size=y.shape)
        gx, gw = run_backward(engine, case, g)
        case2 = sps.PoolingCase(x_nchw, case.w, dict(case.kwargs),
                                case.geometry)
        gx2, gw2 = run_backward(engine, case2, g.transpose(0, 3, 1, 2),
                                layout="NCHW")
        np.testing.assert_array_equal(gx2.transpose(0, 2, 3, 1), gx)
        # The weight gradient (x is float64 here) is a float64 sum that an
        # engine may add up in another order for each layout: equal to
        # rounding.
        scale = np.abs(g).sum() * np.abs(case.x).max() + 1.0
        np.testing.assert_allclose(gw2, gw, rtol=1e-12, atol=1e-12 * scale)

    check()


def test_shared_weights_equal_per_channel_rows(engine):
    @settings(max_examples=30)
    @given(case=sps.pooling_cases(values="ties", per_channel=False))
    def check(case):
        channels = case.x.shape[3 if case.layout == "NHWC" else 1]
        rows = np.tile(case.w, (channels, 1))
        y = run(engine, case)
        np.testing.assert_array_equal(run(engine, case, w=rows), y)
        g = np.random.default_rng(1).normal(size=y.shape)
        gx, gw = run_backward(engine, case, g)
        gx2, gw2 = run_backward(engine, case, g, w=rows)
        np.testing.assert_array_equal(gx2, gx)
        # The shared gradient is the per-channel one summed over channels.
        assert_close(gw2.sum(axis=0), gw, np.float64,
                     tolerance_scale("grad_w", case.x, case.w, g))

    check()


@pytest.mark.parametrize("make_view", ["sliced", "fortran", "negative"])
def test_any_strides_give_the_contiguous_result(engine, make_view):
    rng = np.random.default_rng(2)
    big = rng.normal(size=(3, 14, 11, 8))
    if make_view == "sliced":
        x = big[::2, ::2, :, 1::3]
    elif make_view == "fortran":
        x = np.asfortranarray(big)
    else:
        x = big[::-1, :, ::-1, ::-2]
    assert not x.flags.c_contiguous
    w = rng.normal(size=3)
    kwargs = dict(kernel_size=3, stride=2, padding=1)
    xc = np.ascontiguousarray(x)
    y = to_host(sortpool_ref.sortpool2d(to_engine(engine, x), w,
                                        engine=engine, **kwargs)
                if engine != "cuda" else
                sortpool_ref.sortpool2d(to_engine(engine, x),
                                        to_engine(engine, w), engine=engine,
                                        **kwargs))
    yc = to_host(sortpool_ref.sortpool2d(to_engine(engine, xc),
                                         to_engine(engine, w), engine=engine,
                                         **kwargs))
    np.testing.assert_array_equal(y, yc)
    g = rng.normal(size=y.shape)
    gx, gw = sortpool_ref.sortpool2d_backward(
        to_engine(engine, g), to_engine(engine, x), to_engine(engine, w),
        engine=engine, **kwargs)
    gxc, gwc = sortpool_ref.sortpool2d_backward(
        to_engine(engine, g), to_engine(engine, xc), to_engine(engine, w),
        engine=engine, **kwargs)
    np.testing.assert_array_equal(to_host(gx), to_host(gxc))
    np.testing.assert_array_equal(to_host(gw), to_host(gwc))


def test_global_pooling_up_to_the_whole_window(engine):
    """A 7x7 map pooled whole, pool_range up to 49."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 7, 7, 3))
    for k in (1, 5, 25, 49):
        w = rng.normal(size=k)
        kwargs = dict(kernel_size=7)
        y = to_host(sortpool_ref.sortpool2d(to_engine(engine, x),
                                            to_engine(engine, w),
                                            engine=engine, **kwargs))
        assert y.shape == (2, 1, 1, 3)
        p = np.exp(w - w.max())
        p /= p.sum()
        ranked = -np.sort(-x.reshape(2, 49, 3), axis=1)[:, :k, :]
        expected = np.einsum("r,nrc->nc", p, ranked)
        assert_close(y[:, 0, 0, :], expected, np.float64,
                     tolerance_scale("y", x, w))


@pytest.mark.parametrize("geometry", [dict(kernel_size=2),
                                      dict(kernel_size=3, stride=2,
                                           padding=1)])
def test_numba_results_keep_the_memory_order_of_x(geometry):
    """docs/numerics.md: C-contiguous in, C-contiguous out; channels-last
    NCHW in, channels-last out."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 7, 8))
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) \
        .transpose(0, 3, 1, 2)
    w = rng.normal(size=2)
    for xx, contiguous_as in ((x, (0, 1, 2, 3)), (channels_last,
                                                  (0, 2, 3, 1))):
        y = sortpool_ref.sortpool2d(xx, w, layout="NCHW", engine="numba",
                                    **geometry)
        gx, _ = sortpool_ref.sortpool2d_backward(
            np.ones_like(y), xx, w, layout="NCHW", engine="numba",
            **geometry)
        assert y.transpose(contiguous_as).flags.c_contiguous
        assert gx.transpose(contiguous_as).flags.c_contiguous
        assert_close(y, reference.sortpool2d(xx, w, layout="NCHW",
                                             **geometry),
                     np.float64, tolerance_scale("y", xx, w))
