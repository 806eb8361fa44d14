"""The conformance kit accepts correct implementations and names planted bugs.

The implementation under test here is written independently of the reference
(a loop over windows with Python's stable ``sorted``; only the geometry comes
from the shared validator). Each planted bug is one flag of it.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sortpool_ref import reference, sortpool2d, sortpool2d_backward
from sortpool_ref._checks import make_geometry
from sortpool_ref.testing import (ConformanceError, assert_matches_reference,
                                  strategies as sps)
from sortpool_ref.testing import _kit

# Deterministic runs, no example database: a planted bug is found (or not)
# the same way on every run and machine.
FIXED = settings(derandomize=True, database=None)


# ---------------------------------------------------------------------------
# An independent implementation with plantable bugs

BUGS = ("ascending", "pad_zero", "bottom_k", "no_renorm", "tie_split",
        "tie_last")


def _softmax(v):
    e = np.exp(np.asarray(v) - np.max(v))
    return e / e.sum()


def independent(x, w, grad_y=None, *, kernel_size=2, stride=None, padding=0,
                dilation=1, ceil_mode=False, layout="NHWC",
                weighting="softmax", pad_value=None, bug=None):
    """(y, grad_x, grad_w), window by window, in float64 Python arithmetic."""
    x = np.asarray(x)
    w = np.asarray(w)
    xn = x.astype(np.float64)
    if layout == "NHWC":
        xn = xn.transpose(0, 3, 1, 2)
    n_batch, n_chan, height, width = xn.shape
    g = make_geometry(height, width, kernel_size, stride, padding, dilation,
                      ceil_mode)
    pad = 0.0 if bug == "pad_zero" and pad_value is None else pad_value
    k = w.shape[-1]
    logits = w.astype(np.float64).reshape(-1, k)
    gy = None
    if grad_y is not None:
        gy = np.asarray(grad_y, dtype=np.float64)
        if layout == "NHWC":
            gy = gy.transpose(0, 3, 1, 2)
    y = np.zeros((n_batch, n_chan, g.out_h, g.out_w))
    gx = np.zeros(xn.shape)
    gw = np.zeros(logits.shape)
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            taps = []  # (row, column, is_real) in scan order
            for i in range(g.kernel_h):
                h = oh * g.stride_h - g.pad_top + i * g.dilation_h
                for j in range(g.kernel_w):
                    c = ow * g.stride_w - g.pad_left + j * g.dilation_w
                    real = 0 <= h < height and 0 <= c < width
                    padded = (-g.pad_top <= h < height + g.pad_bottom
                              and -g.pad_left <= c < width + g.pad_right)
                    if real or (pad is not None and padded):
                        taps.append((h, c, real))
            m = min(k, len(taps))
            for n in range(n_batch):
                for ch in range(n_chan):
                    vals = [xn[n, ch, h, c] if real else pad
                            for h, c, real in taps]

                    def key(s):
                        v = vals[s]
                        nan = 0 if math.isnan(v) else 1
                        if bug == "bottom_k":
                            return (nan, 0.0 if nan == 0 else v)
                        if bug == "tie_last":
                            return (nan, 0.0 if nan == 0 else -v, -s)
                        return (nan, 0.0 if nan == 0 else -v)

                    ranked = sorted(range(len(taps)), key=key)[:m]
                    if bug == "ascending":
                        ranked = ranked[::-1]
                    lw = logits[ch if logits.shape[0] > 1 else 0]
                    if weighting == "raw":
                        p = lw[:m]
                    elif bug == "no_renorm":
                        p = _softmax(lw)[:m]
                    else:
                        p = _softmax(lw[:m])
                    a = [vals[s] for s in ranked]
                    y[n, ch, oh, ow] = sum(p[r] * a[r] for r in range(m))
                    if gy is None:
                        continue
                    go = gy[n, ch, oh, ow]
                    for r, s in enumerate(ranked):
                        if bug == "tie_split":
                            group = [t for t in range(len(taps))
                                     if vals[t] == vals[s] or (
                                         math.isnan(vals[t])
                                         and math.isnan(vals[s]))]
                        else:
                            group = [s]
                        for t in group:
                            h, c, real = taps[t]
                            if real:
                                gx[n, ch, h, c] += go * p[r] / len(group)
                    cw = ch if logits.shape[0] > 1 else 0
                    ga = np.array([go * a[r] for r in range(m)])
                    if weighting == "raw":
                        gw[cw, :m] += ga
                    elif bug == "no_renorm":
                        q = _softmax(lw)
                        full = np.zeros(k)
                        full[:m] = ga
                        gw[cw] += q * (full - (q * full).sum())
                    else:
                        gw[cw, :m] += p * (ga - (p * ga).sum())
    if layout == "NHWC":
        y = y.transpose(0, 2, 3, 1)
        gx = gx.transpose(0, 2, 3, 1)
    return (y.astype(x.dtype), gx.astype(x.dtype),
            gw.reshape(w.shape).astype(w.dtype))


def implementation(bug=None):
    # inf - inf in the weight gradient of special values is expected.
    def forward(x, w, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return independent(x, w, bug=bug, **kwargs)[0]

    def backward(grad_y, x, w, **kwargs):
        with np.errstate(invalid="ignore", over="ignore"):
            return independent(x, w, grad_y, bug=bug, **kwargs)[1:]

    return forward, backward


# ---------------------------------------------------------------------------
# Correct implementations pass


def test_kit_lists_match_the_strategies_module():
    assert _kit.VALUE_KINDS == sps.VALUE_KINDS
    assert _kit.PADDING_FORMS == sps.PADDING_FORMS


def test_importing_the_kit_imports_neither_hypothesis_nor_torch():
    code = ("import sys, sortpool_ref.testing; "
            "print(sorted(m for m in ('hypothesis', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_accepts_an_independent_implementation():
    assert_matches_reference(*implementation(), max_examples=40,
                             settings=FIXED)


def test_accepts_an_independent_implementation_in_float32():
    assert_matches_reference(*implementation(), dtype=np.float32,
                             max_examples=25, settings=FIXED)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_accepts_the_numba_engine(dtype):
    def forward(x, w, **kwargs):
        return sortpool2d(x, w, engine="numba", **kwargs)

    def backward(grad_y, x, w, **kwargs):
        return sortpool2d_backward(grad_y, x, w, engine="numba", **kwargs)

    assert_matches_reference(forward, backward, dtype=dtype,
                             max_examples=30, settings=FIXED)


def test_accepts_the_seed_conventions_with_the_documented_recipe():
    """An implementation with the seed's conventions (weights in ascending
    rank order, SAME padding with zeros, 2x2 windows, NHWC, softmax) passes
    when checked as docs/conformance.md says: reverse w, declare
    padding=('same',) and pad_values=(0.0,)."""

    def seed_pool(x, w):
        return independent(x, w, kernel_size=2, padding="same",
                           pad_value=0.0, bug="ascending")[0]

    def forward(x, w):
        return seed_pool(x, w[..., ::-1])

    assert_matches_reference(
        forward, kernel_sizes=(2,), stride=False, padding=("same",),
        pad_values=(0.0,), layouts=("NHWC",), weightings=("softmax",),
        per_channel=False, dilation=False, ceil_mode=False,
        max_examples=25, settings=FIXED)
    with pytest.raises(ConformanceError, match="ascending rank order"):
        assert_matches_reference(
            seed_pool, kernel_sizes=(2,), stride=False, padding=("same",),
            pad_values=(0.0,), layouts=("NHWC",), weightings=("softmax",),
            per_channel=False, dilation=False, ceil_mode=False,
            values=("distinct",), max_examples=25, settings=FIXED)


# ---------------------------------------------------------------------------
# Planted bugs are caught, shrunk and named

PLANTED = [
    ("ascending", dict(padding=False, ceil_mode=False, values=("distinct",)),
     "weights applied in ascending rank order"),
    ("pad_zero", dict(padding=("int", "pair", "sides", "same"),
                      pad_values=(None,), values=("distinct",)),
     "padding taken as zero"),
    ("bottom_k", dict(values=("distinct",)),
     "top-k taken from the wrong end"),
    ("no_renorm", dict(weightings=("softmax",), pad_values=(None,),
                       values=("distinct",)),
     "softmax not renormalised in partial windows"),
    ("tie_split", dict(values=("ties",)),
     "gradient split between tied elements"),
    ("tie_last", dict(values=("ties",)),
     "ties broken towards the later position"),
]


@pytest.mark.parametrize("bug, options, diagnosis", PLANTED,
                         ids=[p[0] for p in PLANTED])
def test_rejects_and_diagnoses_a_planted_bug(bug, options, diagnosis):
    forward, backward = implementation(bug)
    with pytest.raises(ConformanceError) as info:
        assert_matches_reference(forward, backward, max_examples=60,
                                 settings=FIXED, **options)
    report = str(info.value)
    found = report.split("Diagnosis: the mismatch looks like\n")[1]
    named = [line.split(":")[0] for line in found.splitlines()]
    # A smallest case can fit two mistakes at once (with pool_range equal
    # to the window size, ascending weights and an ascending sort give the
    # same numbers; one real zero beside one padded position makes zero
    # padding and an unrenormalised softmax agree): all those are named.
    assert f"  - {diagnosis}" in named and len(named) <= 2
    if bug.startswith("tie"):
        assert "disagrees with the reference (backward): grad_x: " in report
    # Shrunk: a bug that shows in any problem shows in one sample, one
    # channel.
    case = info.value.case
    channels = case.x.shape[3 if case.layout == "NHWC" else 1]
    assert (case.x.shape[0], channels) == (1, 1)


def test_report_shows_inputs_calls_expected_and_actual():
    forward, _ = implementation("bottom_k")
    with pytest.raises(ConformanceError) as info:
        assert_matches_reference(forward, values=("distinct",),
                                 max_examples=30, settings=FIXED)
    report = str(info.value)
    case = info.value.case
    for text in ("Smallest failing case found", "  x =\n", "  w =\n",
                 "  expected y (float64 reference) =\n", "  actual y =\n",
                 f"seed {case.seed}", "calls:\n    forward(x, w, "):
        assert text in report
    expected = reference.sortpool2d(case.x, case.w, **case.kwargs)
    actual = forward(case.x, case.w, **case.kwargs)
    assert not np.allclose(expected, actual)
    assert isinstance(info.value, AssertionError)


def test_unrecognised_mismatch_says_so():
    def forward(x, w, **kwargs):
        return reference.sortpool2d(x, w, **kwargs) + 1.0

    with pytest.raises(ConformanceError,
                       match="no known bug pattern matches"):
        assert_matches_reference(forward, max_examples=10, settings=FIXED)


def test_rejects_a_wrong_shape():
    def forward(x, w, **kwargs):
        y = reference.sortpool2d(x, w, **kwargs)
        return y[:, :, :, :1] if kwargs["layout"] == "NHWC" else y[:, :1]

    with pytest.raises(ConformanceError) as info:
        assert_matches_reference(forward, max_examples=30, settings=FIXED)
    assert "y: shape (1, 1, 1, 1) != expected (1, 1, 1, 2)" in str(
        info.value) or "y: shape (1, 1, 1, 1) != expected (1, 2, 1, 1)" in \
        str(info.value)


def test_rejects_an_implementation_that_modifies_its_input():
    def forward(x, w, **kwargs):
        y = reference.sortpool2d(x, w, **kwargs)
        x[...] = 0.0
        return y

    with pytest.raises(ConformanceError,
                       match="forward modified its argument x in place"):
        assert_matches_reference(forward, max_examples=10, settings=FIXED)


def test_rejects_a_backward_that_does_not_return_a_pair():
    def backward(grad_y, x, w, **kwargs):
        return reference.sortpool2d_backward(grad_y, x, w, **kwargs)[0]

    with pytest.raises(ConformanceError,
                       match=r"backward must return a pair \(grad_x, "
                             r"grad_w\), got ndarray"):
        assert_matches_reference(reference.sortpool2d, backward,
                                 max_examples=10, settings=FIXED)


def test_grad_w_is_checked():
    def backward(grad_y, x, w, **kwargs):
        gx, gw = reference.sortpool2d_backward(grad_y, x, w, **kwargs)
        return gx, 2.0 * gw

    with pytest.raises(ConformanceError, match="grad_w: "):
        assert_matches_reference(reference.sortpool2d, backward,
                                 values=("distinct",), max_examples=20,
                                 settings=FIXED)


def test_passes_only_the_keywords_the_implementation_accepts():
    seen = []

    def forward(x, w, kernel_size=2, stride=None):
        seen.append((kernel_size, stride))
        return reference.sortpool2d(x, w, kernel_size, stride,
                                    layout="NCHW", weighting="raw")

    assert_matches_reference(forward, layouts=("NCHW",), weightings=("raw",),
                             padding=False, dilation=False, ceil_mode=False,
                             pad_values=(None,), max_examples=10,
                             settings=FIXED)
    assert len(seen) >= 10


# ---------------------------------------------------------------------------
# Bad options: word-for-word messages


def _fwd(x, w, **kwargs):
    return reference.sortpool2d(x, w, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype=np.int32), TypeError,
     "dtype must be float32 or float64, got int32"),
    (dict(dtype="half"), TypeError,
     "dtype must be float32 or float64, got float16"),
    (dict(values=("ties", "nan")), ValueError,
     "values must be a non-empty sequence of 'distinct', 'ties', 'special', "
     "'normal', got ('ties', 'nan')"),
    (dict(values=()), ValueError,
     "values must be a non-empty sequence of 'distinct', 'ties', 'special', "
     "'normal', got ()"),
    (dict(layouts=("NWHC",)), ValueError,
     "layouts must be a non-empty sequence of 'NHWC', 'NCHW', got "
     "('NWHC',)"),
    (dict(weightings="max"), ValueError,
     "weightings must be a non-empty sequence of 'softmax', 'raw', got "
     "'max'"),
    (dict(padding="full"), ValueError,
     "padding must be True, False or a non-empty sequence of 'none', 'int', "
     "'pair', 'sides', 'valid', 'same', got 'full'"),
    (dict(padding=1), ValueError,
     "padding must be True, False or a non-empty sequence of 'none', 'int', "
     "'pair', 'sides', 'valid', 'same', got 1"),
    (dict(pad_values=(None, "zero")), TypeError,
     "pad_values must be a non-empty sequence of None or real numbers, got "
     "(None, 'zero')"),
    (dict(pad_values=None), TypeError,
     "pad_values must be a non-empty sequence of None or real numbers, got "
     "None"),
    (dict(per_channel="yes"), TypeError,
     "per_channel must be None, True or False, got 'yes'"),
    (dict(kernel_sizes=(2, (0, 1))), ValueError,
     "kernel_sizes must be None or a non-empty sequence of positive ints or "
     "pairs of them, got (2, (0, 1))"),
    (dict(stride=1), TypeError, "stride must be True or False, got 1"),
    (dict(dilation=None), TypeError,
     "dilation must be True or False, got None"),
    (dict(ceil_mode="no"), TypeError,
     "ceil_mode must be True or False, got 'no'"),
    (dict(max_examples=0), ValueError,
     "max_examples must be a positive int, got 0"),
    (dict(max_pool_range=1.5), ValueError,
     "max_pool_range must be None or a positive int, got 1.5"),
    (dict(max_size=True), ValueError,
     "max_size must be a positive int, got True"),
    (dict(max_kernel=-1), ValueError,
     "max_kernel must be a positive int, got -1"),
])
def test_bad_options_are_named(kwargs, error, message):
    with pytest.raises(error) as info:
        assert_matches_reference(_fwd, **kwargs)
    assert str(info.value) == message


def test_callables_are_checked():
    with pytest.raises(TypeError) as info:
        assert_matches_reference(3)
    assert str(info.value) == "forward must be callable, got 3"
    with pytest.raises(TypeError) as info:
        assert_matches_reference(_fwd, "backward")
    assert str(info.value) == ("backward must be None or callable, got "
                               "'backward'")


def test_a_varying_keyword_must_be_accepted():
    def forward(x, w, kernel_size=2, stride=None):
        return reference.sortpool2d(x, w, kernel_size, stride)

    with pytest.raises(TypeError) as info:
        assert_matches_reference(forward, padding=False, dilation=False,
                                 ceil_mode=False, pad_values=(None,),
                                 weightings=("softmax",))
    assert str(info.value) == (
        "forward does not accept the keyword argument 'layout', but "
        "layouts=('NHWC', 'NCHW') lets the cases vary it: accept 'layout' in "
        "forward, or restrict the option to a single choice")

    def backward(grad_y, x, w, kernel_size=2, stride=None, layout="NHWC"):
        raise AssertionError("never called")

    with pytest.raises(TypeError) as info:
        assert_matches_reference(_fwd, backward, padding=False,
                                 dilation=False, ceil_mode=False,
                                 pad_values=(None,))
    assert str(info.value) == (
        "backward does not accept the keyword argument 'weighting', but "
        "weightings=('softmax', 'raw') lets the cases vary it: accept "
        "'weighting' in backward, or restrict the option to a single choice")


# ---------------------------------------------------------------------------
# The diagnosis machinery itself


@settings(max_examples=25)
@given(case=sps.conformance_cases(values=("ties", "special")))
def test_tie_variant_first_is_the_reference_gradient(case):
    expected, _ = reference.sortpool2d_backward(case.grad_y, case.x, case.w,
                                                **case.kwargs)
    got = _kit.tie_variant_grad_x(case.grad_y, case.x, case.w, "first",
                                  **case.kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_tie_variants_on_a_known_window():
    # One 2x2 window, values 1, 1, 0, 1 in scan order, pool_range 2, raw
    # weights 0.75 and 0.25, upstream gradient 1.
    x = np.array([1.0, 1.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
    w = np.array([0.75, 0.25])
    g = np.ones((1, 1, 1, 1))
    kw = dict(weighting="raw")

    def grad(rule):
        return _kit.tie_variant_grad_x(g, x, w, rule, **kw).ravel()

    np.testing.assert_array_equal(grad("first"), [0.75, 0.25, 0.0, 0.0])
    np.testing.assert_array_equal(grad("last"), [0.0, 0.25, 0.0, 0.75])
    np.testing.assert_array_equal(grad("split"),
                                  [1 / 3, 1 / 3, 0.0, 1 / 3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=15)
@given(data=st.data())
def test_conformance_cases_are_valid_problems(dtype, data):
    case = data.draw(sps.conformance_cases(dtype=dtype))
    with np.errstate(invalid="ignore"):  # +inf and -inf in one window
        y = reference.sortpool2d(case.x, case.w, **case.kwargs)
    assert case.grad_y.shape == y.shape
    assert case.grad_y.dtype == case.x.dtype == case.w.dtype == dtype
    assert set(case.kwargs) == set(_kit.DEFAULTS)
    assert case.values in ("distinct", "ties", "special")


@settings(max_examples=15)
@given(case=sps.conformance_cases(
    values=("normal",), layouts=("NCHW",), weightings=("raw",),
    per_channel=True, pad_values=(0.0,), kernel_sizes=((2, 3),),
    stride=False, padding=("same",), dilation=False, ceil_mode=False,
    max_pool_range=2))
def test_conformance_cases_keep_to_the_declared_options(case):
    assert case.values == "normal"
    assert case.kwargs == dict(kernel_size=(2, 3), stride=None,
                               padding="same", dilation=1, ceil_mode=False,
                               layout="NCHW", weighting="raw", pad_value=0.0)
    assert case.w.shape in ((case.x.shape[1], 1), (case.x.shape[1], 2))


def test_tolerance_scale_counts_the_pad_value():
    """A pad_value is summed like a value of x: a window of zeros and
    padding at -1.5 has terms of size 1.5 (found by Hypothesis: the
    float32 rounding of such a window failed a scale taken from x
    alone)."""
    from sortpool_ref.testing import tolerance_scale

    x = np.zeros((1, 1, 1, 1), np.float32)
    w = np.zeros(2)
    tiny = np.finfo(np.float64).tiny
    assert tolerance_scale("y", x, w) == tiny
    assert tolerance_scale("y", x, w, pad_value=-1.5) == 1.5
    assert tolerance_scale("y", x + 2, w, pad_value=-1.5) == 2.0
    assert tolerance_scale("grad_w", x, w, np.ones((1, 1, 1, 1)),
                           pad_value=-1.5) == 3.0
    assert tolerance_scale("grad_x", x, w, np.ones((1, 1, 1, 1)),
                           pad_value=-1.5) == 1.0
    assert tolerance_scale("y", x, w, pad_value=float("inf")) == tiny

