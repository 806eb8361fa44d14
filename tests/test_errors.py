"""Bad input: the exact exception and message, raised before any work, with
the inputs left unchanged."""

import re

import numpy as np
import pytest

import sortpool_ref
from sortpool_ref import reference

X = np.zeros((2, 6, 6, 3))
W = np.zeros(2)

CASES = [
    # (description, args, kwargs, exception, exact message)
    ("3-D x", (np.zeros((6, 6, 3)), W), {}, ValueError,
     "x must be a 4-D array in NHWC layout, got 3-D with shape (6, 6, 3)"),
    ("integer x", (np.zeros((2, 6, 6, 3), dtype=np.int64), W), {}, TypeError,
     "x must have dtype float32 or float64, got int64"),
    ("float16 x", (X.astype(np.float16), W), {}, TypeError,
     "x must have dtype float32 or float64, got float16"),
    ("integer w", (X, np.zeros(2, dtype=np.int32)), {}, TypeError,
     "w must have dtype float32 or float64, got int32"),
    ("3-D w", (X, np.zeros((3, 2, 1))), {}, ValueError,
     "w must have shape (pool_range,) or (C, pool_range), got shape "
     "(3, 2, 1)"),
    ("w rows != channels", (X, np.zeros((4, 2))), {}, ValueError,
     "w has shape (4, 2): per-channel weights need one row per channel of "
     "x, i.e. shape (3, pool_range)"),
    ("pool_range too large", (X, np.zeros(5)), {}, ValueError,
     "pool_range (the last dimension of w) must be between 1 and kernel_h "
     "* kernel_w = 4, got 5"),
    ("pool_range zero", (X, np.zeros(0)), {}, ValueError,
     "pool_range (the last dimension of w) must be between 1 and kernel_h "
     "* kernel_w = 4, got 0"),
    ("kernel zero", (X, W), dict(kernel_size=0), ValueError,
     "kernel_size must be positive, got 0"),
    ("kernel float", (X, W), dict(kernel_size=2.0), TypeError,
     "kernel_size must be an int or a pair of ints, got 2.0"),
    ("kernel triple", (X, W), dict(kernel_size=(2, 2, 2)), TypeError,
     "kernel_size must be an int or a pair of ints, got (2, 2, 2)"),
    ("stride negative", (X, W), dict(stride=(1, -1)), ValueError,
     "stride must be positive, got (1, -1)"),
    ("dilation zero", (X, W), dict(dilation=0), ValueError,
     "dilation must be positive, got 0"),
    ("padding negative", (X, W), dict(padding=-1), ValueError,
     "padding must be non-negative, got -1"),
    ("padding word", (X, W), dict(padding="full"), ValueError,
     "padding must be an int, a pair (pad_h, pad_w), ((top, bottom), "
     "(left, right)), 'valid' or 'same', got 'full'"),
    ("padding float", (X, W), dict(padding=1.5), TypeError,
     "padding must be an int, a pair (pad_h, pad_w), ((top, bottom), "
     "(left, right)), 'valid' or 'same', got 1.5"),
    ("padding too large", (X, W), dict(kernel_size=3, padding=2), ValueError,
     "padding 2 is too large for kernel_size (3, 3): each side may be at "
     "most half the kernel, (pad_h, pad_w) <= (1, 1), as in PyTorch"),
    ("padding side too large", (X, W),
     dict(kernel_size=2, padding=((0, 0), (0, 2))), ValueError,
     "padding ((0, 0), (0, 2)) is too large for kernel_size (2, 2): each "
     "side may be at most half the kernel, (pad_h, pad_w) <= (1, 1), as in "
     "PyTorch"),
    ("ceil_mode not bool", (X, W), dict(ceil_mode="yes"), TypeError,
     "ceil_mode must be a bool, got 'yes'"),
    ("layout", (X, W), dict(layout="NWHC"), ValueError,
     "layout must be 'NHWC' or 'NCHW', got 'NWHC'"),
    ("weighting", (X, W), dict(weighting="linear"), ValueError,
     "weighting must be 'softmax' or 'raw', got 'linear'"),
    ("pad_value string", (X, W), dict(pad_value="zero"), TypeError,
     "pad_value must be None or a real number, got 'zero'"),
    ("engine", (X, W), dict(engine="gpu"), ValueError,
     "engine must be one of 'auto', 'reference', 'numba', 'cuda', got "
     "'gpu'"),
    ("kernel larger than input", (X, W), dict(kernel_size=7), ValueError,
     "the output would be empty: input (H, W) = (6, 6) with kernel_size "
     "(7, 7), dilation (1, 1) and padding (top, bottom, left, right) = "
     "(0, 0, 0, 0) gives output (0, 0)"),
    # PyTorch's max_pool2d reads out of bounds on this one.
    ("window of padding only", (np.zeros((1, 1, 5, 1)), np.zeros(1)),
     dict(kernel_size=2, dilation=2, padding=1), ValueError,
     "window 0 along the output rows would contain no input position (only "
     "padding): input (H, W) = (1, 5), kernel_size (2, 2), stride (2, 2), "
     "dilation (2, 2), padding (top, bottom, left, right) = (1, 1, 1, 1), "
     "ceil_mode=False"),
    ("same with dilation leaves an empty window",
     (np.zeros((1, 1, 1, 1)), np.zeros(1)),
     dict(kernel_size=2, dilation=3, padding="same", stride=1), ValueError,
     "window 0 along the output rows would contain no input position (only "
     "padding): input (H, W) = (1, 1), kernel_size (2, 2), stride (1, 1), "
     "dilation (3, 3), padding (top, bottom, left, right) = (1, 2, 1, 2), "
     "ceil_mode=False"),
]


FORWARD_CALLS = [
    pytest.param(case, function, id=f"{function}-{case[0]}")
    for case in CASES for function in ("sortpool2d", "reference")
    # the reference has no engine argument
    if not (function == "reference" and "engine" in case[2])
]


@pytest.mark.parametrize("case, function", FORWARD_CALLS)
def test_forward_rejects_bad_input_with_exact_message(case, function):
    _, args, kwargs, exc, message = case
    call = (reference.sortpool2d if function == "reference"
            else sortpool_ref.sortpool2d)
    copies = [np.array(a, copy=True) for a in args]
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        call(*args, **kwargs)
    for before, after in zip(copies, args):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_rejects_the_same_input(case):
    _, (x, w), kwargs, exc, message = case
    grad_y = np.zeros((2, 3, 3, 3))
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        sortpool_ref.sortpool2d_backward(grad_y, x, w, **kwargs)


def test_grad_y_of_the_wrong_shape():
    with pytest.raises(ValueError, match=re.escape(
            "grad_y must have the output's shape (2, 3, 3, 3), got "
            "(2, 3, 3, 4)")):
        sortpool_ref.sortpool2d_backward(np.zeros((2, 3, 3, 4)), X, W)


def test_grad_y_of_integer_dtype():
    with pytest.raises(TypeError, match=re.escape(
            "grad_y must have dtype float32 or float64, got int64")):
        sortpool_ref.sortpool2d_backward(np.zeros((2, 3, 3, 3), np.int64),
                                         X, W)


class FakeCudaArray:
    """Looks like a CUDA array to the front door; holds no data."""

    def __init__(self, shape=(2,)):
        self.shape = shape
        self.dtype = np.dtype(np.float64)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f8",
                                         "data": (0, False), "version": 3}


def test_arrays_on_different_devices():
    with pytest.raises(ValueError, match=re.escape(
            "x and w must be on the same device: x is a host (NumPy) array, "
            "w is a CUDA array")):
        sortpool_ref.sortpool2d(X, FakeCudaArray())


def test_host_engine_refuses_cuda_arrays():
    with pytest.raises(ValueError, match=re.escape(
            "engine 'numba' runs on the host but the arrays are CUDA arrays; "
            "use engine='cuda' or 'auto', or copy them to the host")):
        sortpool_ref.sortpool2d(FakeCudaArray(), FakeCudaArray(),
                                engine="numba")


def test_cuda_engine_refuses_host_arrays():
    with pytest.raises(ValueError, match=re.escape(
            "engine 'cuda' needs CUDA arrays (e.g. CuPy) but x is a host "
            "(NumPy) array; use engine='numba' or 'auto', or copy it to the "
            "GPU")):
        sortpool_ref.sortpool2d(X, W, engine="cuda")


def test_unavailable_engine_says_what_is_missing():
    from sortpool_ref._engines import cupy_problem
    if cupy_problem() is None:
        pytest.skip("CuPy is installed here")
    with pytest.raises(sortpool_ref.EngineUnavailableError,
                       match="^engine 'cuda' is not available: CuPy is not "
                             "installed"):
        sortpool_ref.sortpool2d(FakeCudaArray((1, 4, 4, 1)), FakeCudaArray())


def test_inputs_are_never_modified_and_read_only_inputs_work():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3))
    x[0, 0, 0, 0] = np.nan
    w = rng.normal(size=(3, 4))
    g = rng.normal(size=(2, 3, 3, 3))
    for a in (x, w, g):
        a.setflags(write=False)
    copies = [a.copy() for a in (x, w, g)]
    for eng in ("reference", "numba"):
        kwargs = dict(kernel_size=3, stride=2, padding=1, engine=eng)
        sortpool_ref.sortpool2d(x, w, **kwargs)
        sortpool_ref.sortpool2d_backward(g, x, w, **kwargs)
    for before, after in zip(copies, (x, w, g)):
        np.testing.assert_array_equal(before, after)


def test_array_likes_are_accepted():
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    y = sortpool_ref.sortpool2d(x.tolist(), [0.0])
    np.testing.assert_array_equal(y, [[[[5.0], [7.0]], [[13.0], [15.0]]]])


def test_empty_batch_gives_empty_output():
    y = sortpool_ref.sortpool2d(np.zeros((0, 4, 4, 2)), W)
    assert y.shape == (0, 2, 2, 2)
    gx, gw = sortpool_ref.sortpool2d_backward(np.zeros((0, 2, 2, 2)),
                                              np.zeros((0, 4, 4, 2)), W)
    assert gx.shape == (0, 4, 4, 2) and np.all(gw == 0)


def test_cached_checks_tell_equal_values_of_other_types_apart():
    """Checked problems are cached by their arguments (sortpool_ref._checks
    .make_problem); an argument equal to a cached one but of a type the
    checks refuse (2.0 for 2, True for 1) still raises, every time, and
    lists (not hashable) are checked without the cache."""
    good = sortpool_ref.sortpool2d(X, W, kernel_size=(2, 1), stride=1)
    bad = [
        (dict(kernel_size=(2, 1.0), stride=1),
         "kernel_size must be an int or a pair of ints, got (2, 1.0)"),
        (dict(kernel_size=(2, True), stride=1),
         "kernel_size must be an int or a pair of ints, got (2, True)"),
        (dict(kernel_size=(2, 1), stride=True),
         "stride must be an int or a pair of ints, got True"),
        (dict(kernel_size=(2, 1), stride=1.0),
         "stride must be an int or a pair of ints, got 1.0"),
    ]
    for _ in range(2):
        for kwargs, message in bad:
            with pytest.raises(TypeError,
                               match="^" + re.escape(message) + "$"):
                sortpool_ref.sortpool2d(X, W, **kwargs)
    again = sortpool_ref.sortpool2d(X, W, kernel_size=[2, 1], stride=[1, 1])
    np.testing.assert_array_equal(good, again)
