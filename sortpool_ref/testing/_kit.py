"""The conformance kit: check another implementation against the reference.

:func:`assert_matches_reference` runs a user's ``forward`` (and optionally
``backward``) over Hypothesis-generated problems restricted to the options the
user declares, compares every result with the float64 reference at the
tolerance of :data:`sortpool_ref.testing.TOLERANCES` for the dtype, and on a
mismatch raises :class:`ConformanceError` for the smallest failing case
Hypothesis can find, with a diagnosis where the mismatch looks like a known
bug.

Hypothesis is imported when :func:`assert_matches_reference` is called and
PyTorch when a :func:`from_torch` wrapper is called, so importing
``sortpool_ref.testing`` needs neither.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, List, Optional, Sequence, Set,
                    Tuple)

import numpy as np

from .. import reference
from .._checks import LAYOUTS, WEIGHTINGS, make_problem
from ._compare import TOLERANCES, assert_close, tolerance_scale

__all__ = ["ConformanceError", "assert_matches_reference", "from_torch"]

# The value kinds and padding forms of sortpool_ref.testing.strategies,
# repeated here so that checking the options does not import Hypothesis (a
# test keeps the two lists equal).
VALUE_KINDS = ("distinct", "ties", "special", "normal")
PADDING_FORMS = ("none", "int", "pair", "sides", "valid", "same")

# sortpool2d's keyword arguments (engine aside) and their defaults, in the
# order the report prints them.
DEFAULTS: Dict[str, Any] = dict(
    kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False,
    layout="NHWC", weighting="softmax", pad_value=None)


# ---------------------------------------------------------------------------
# Checking the options


def _choices(name: str, value: Any, allowed: Sequence[str]) -> Tuple[str, ...]:
    """A non-empty tuple of allowed strings; a single string is accepted."""
    try:
        items = (value,) if isinstance(value, str) else tuple(value)
    except TypeError:
        items = ()
    if not items or any(not isinstance(v, str) or v not in allowed
                        for v in items):
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(
            f"{name} must be a non-empty sequence of {listed}, got {value!r}")
    return tuple(dict.fromkeys(items))


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _positive_int(name: str, value: Any, optional: bool = False
                  ) -> Optional[int]:
    if optional and value is None:
        return None
    if (isinstance(value, (bool, np.bool_))
            or not isinstance(value, numbers.Integral) or value < 1):
        what = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _padding_forms(padding: Any) -> Tuple[str, ...]:
    if padding is True:
        return PADDING_FORMS
    if padding is False:
        return ("none",)
    message = (f"padding must be True, False or a non-empty sequence of "
               f"{', '.join(repr(f) for f in PADDING_FORMS)}, got "
               f"{padding!r}")
    if isinstance(padding, str):
        padding = (padding,)
    try:
        forms = tuple(padding)
    except TypeError:
        raise ValueError(message) from None
    if not forms or any(f not in PADDING_FORMS for f in forms):
        raise ValueError(message)
    return tuple(dict.fromkeys(forms))


def _pad_values(pad_values: Any) -> Tuple[Optional[float], ...]:
    message = (f"pad_values must be a non-empty sequence of None or real "
               f"numbers, got {pad_values!r}")
    try:
        items = tuple(pad_values)
    except TypeError:
        raise TypeError(message) from None
    if not items or any(
            v is not None and (isinstance(v, (bool, np.bool_))
                               or not isinstance(v, numbers.Real))
            for v in items):
        raise TypeError(message)
    return tuple(None if v is None else float(v) for v in items)


def _kernel_sizes(kernel_sizes: Any) -> Optional[Tuple[Any, ...]]:
    if kernel_sizes is None:
        return None
    message = (f"kernel_sizes must be None or a non-empty sequence of "
               f"positive ints or pairs of them, got {kernel_sizes!r}")

    def ok(v):
        return (isinstance(v, numbers.Integral)
                and not isinstance(v, (bool, np.bool_)) and v >= 1)

    try:
        items = tuple(kernel_sizes)
    except TypeError:
        raise ValueError(message) from None
    if not items:
        raise ValueError(message)
    for item in items:
        if ok(item):
            continue
        if (isinstance(item, (tuple, list)) and len(item) == 2
                and all(ok(v) for v in item)):
            continue
        raise ValueError(message)
    return tuple(tuple(int(v) for v in i) if isinstance(i, (tuple, list))
                 else int(i) for i in items)


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        checked = np.dtype(dtype)
    except TypeError:
        checked = None
    if checked not in TOLERANCES:
        shown = checked if checked is not None else repr(dtype)
        raise TypeError(f"dtype must be float32 or float64, got {shown}")
    return checked


def _accepted_keywords(fn: Callable) -> Optional[Set[str]]:
    """Keyword names ``fn`` accepts, or None for 'any' (``**kwargs`` or no
    signature to read)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      inspect.Parameter.KEYWORD_ONLY):
            names.add(p.name)
    return names


def _check_keywords(role: str, fn: Callable,
                    varying: Dict[str, str]) -> Optional[Set[str]]:
    """Every keyword the cases vary must be accepted by ``fn``.

    ``varying`` maps a keyword to the option (as written by the user) that
    lets it vary. A keyword the callable does not accept is left out of the
    call; that is only right when the options fix it to one value, which the
    implementation is then taken to have built in.
    """
    accepted = _accepted_keywords(fn)
    if accepted is None:
        return None
    for name, option in varying.items():
        if name not in accepted:
            raise TypeError(
                f"{role} does not accept the keyword argument {name!r}, but "
                f"{option} lets the cases vary it: accept {name!r} in "
                f"{role}, or restrict the option to a single choice")
    return accepted


# ---------------------------------------------------------------------------
# One case


@dataclass
class _Quantity:
    """One compared result: name, actual, expected and the comparison."""

    name: str
    actual: Any
    expected: np.ndarray
    scale: float
    message: Optional[str] = None  # None when it matched


@dataclass
class Failure:
    """Everything the report needs about one failing case."""

    case: Any
    stage: str                      # 'forward' or 'backward'
    summary: str
    calls: List[str]
    quantities: List[_Quantity] = field(default_factory=list)
    diagnose: Optional[Callable[[], List[str]]] = None


class ConformanceError(AssertionError):
    """An implementation disagrees with the reference.

    ``failure`` holds the case, the expected and actual results and the
    calls that produced them. The report (``str(error)``) is built on first
    use, so that the many failures Hypothesis meets while shrinking cost
    nothing; the one re-raised in the end is the smallest failing case.
    """

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.summary)
        self.failure = failure
        self._report: Optional[str] = None

    @property
    def case(self) -> Any:
        return self.failure.case

    def __str__(self) -> str:
        if self._report is None:
            self._report = _report(self.failure)
        return self._report


def _call_kwargs(kwargs: Dict[str, Any],
                 accepted: Optional[Set[str]]) -> Dict[str, Any]:
    ordered = {name: kwargs[name] for name in DEFAULTS if name in kwargs}
    if accepted is None:
        return ordered
    return {k: v for k, v in ordered.items() if k in accepted}


def _format_call(name: str, args: str, kwargs: Dict[str, Any],
                 case_kwargs: Dict[str, Any]) -> str:
    words = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    call = f"{name}({args}{', ' if words else ''}{words})"
    built_in = ", ".join(f"{k}={v!r}" for k, v in case_kwargs.items()
                         if k not in kwargs)
    return f"{call}  # built in: {built_in}" if built_in else call


def _as_float_array(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _compare(q: _Quantity, dtype: np.dtype) -> _Quantity:
    try:
        actual = _as_float_array(q.actual)
    except Exception as exc:  # the user's result is not array-like
        q.message = (f"{q.name}: the result is not array-like "
                     f"({type(q.actual).__name__}: {exc})")
        return q
    q.actual = actual
    try:
        assert_close(actual, q.expected, dtype, q.scale, q.name)
    except AssertionError as exc:
        q.message = str(exc)
    return q


def _close(actual: np.ndarray, candidate: np.ndarray, dtype: np.dtype,
           scale: float) -> bool:
    try:
        assert_close(actual, candidate, dtype, scale)
    except AssertionError:
        return False
    return True


def _run_case(case: Any, forward: Callable, backward: Optional[Callable],
              forward_keywords: Optional[Set[str]],
              backward_keywords: Optional[Set[str]],
              dtype: np.dtype) -> Optional[Failure]:
    x, w, kwargs = case.x, case.w, case.kwargs
    x64 = x.astype(np.float64)
    w64 = w.astype(np.float64)
    weighting = kwargs["weighting"]

    fwd_kwargs = _call_kwargs(kwargs, forward_keywords)
    calls = [_format_call("forward", "x, w", fwd_kwargs, kwargs)]
    x_in, w_in = x.copy(), w.copy()
    actual_y = forward(x_in, w_in, **fwd_kwargs)
    for name, given, kept in (("x", x_in, x), ("w", w_in, w)):
        if not np.array_equal(given, kept, equal_nan=True):
            return Failure(case, "forward",
                           f"forward modified its argument {name} in place",
                           calls)
    with np.errstate(invalid="ignore", over="ignore"):
        expected_y = reference.sortpool2d(x64, w64, **kwargs)
    pad_value = kwargs.get("pad_value")
    y = _compare(_Quantity("y", actual_y, expected_y, tolerance_scale(
        "y", x64, w64, weighting=weighting, pad_value=pad_value)), dtype)
    if y.message is not None:
        return Failure(case, "forward", y.message, calls, [y],
                       lambda: _diagnose(case, "forward", [y], dtype))
    if backward is None:
        return None

    g = case.grad_y
    g64 = g.astype(np.float64)
    bwd_kwargs = _call_kwargs(kwargs, backward_keywords)
    calls.append(_format_call("backward", "grad_y, x, w", bwd_kwargs,
                              kwargs))
    g_in, x_in, w_in = g.copy(), x.copy(), w.copy()
    result = backward(g_in, x_in, w_in, **bwd_kwargs)
    for name, given, kept in (("grad_y", g_in, g), ("x", x_in, x),
                              ("w", w_in, w)):
        if not np.array_equal(given, kept, equal_nan=True):
            return Failure(case, "backward",
                           f"backward modified its argument {name} in place",
                           calls)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        return Failure(case, "backward",
                       f"backward must return a pair (grad_x, grad_w), got "
                       f"{type(result).__name__}", calls)
    with np.errstate(invalid="ignore", over="ignore"):
        expected_gx, expected_gw = reference.sortpool2d_backward(
            g64, x64, w64, **kwargs)
    quantities = [_compare(_Quantity("grad_x", result[0], expected_gx,
                                     tolerance_scale(
                                         "grad_x", x64, w64, g64,
                                         weighting=weighting,
                                         window_size=case.geometry.window_size
                                     )), dtype)]
    # The contract specifies weight gradients for finite inputs only.
    if np.isfinite(x64).all():
        quantities.append(_compare(_Quantity(
            "grad_w", result[1], expected_gw,
            tolerance_scale("grad_w", x64, w64, g64, weighting=weighting,
                            pad_value=pad_value)),
            dtype))
    failed = [q for q in quantities if q.message is not None]
    if failed:
        return Failure(case, "backward",
                       "; ".join(q.message for q in failed), calls,
                       quantities,
                       lambda: _diagnose(case, "backward", quantities,
                                         dtype))
    return None


# ---------------------------------------------------------------------------
# Diagnosis: what known bugs would have produced, computed with the reference


def _softmax(w: np.ndarray) -> np.ndarray:
    z = w - w.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tie_variant_grad_x(grad_y: np.ndarray, x: np.ndarray, w: np.ndarray,
                       rule: str, **kwargs: Any) -> np.ndarray:
    """dL/dx in float64 under another handling of ties.

    ``rule='first'`` is the contract (ties keep scan order: the earlier
    position takes the higher rank). ``'last'`` gives the higher rank to the
    later position. ``'split'`` ranks as the contract does, then shares the
    gradient that reached a group of equal values in a window equally among
    all its members, kept or not (what a gradient through ``x == max``
    masks does).
    """
    from ..reference import _nchw, _rank_weights, _Windows

    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    p = make_problem(x.shape, x.dtype, w.shape, w.dtype, **kwargs)
    gy = _nchw(grad_y, p.layout)
    windows = _Windows(x, p)
    values, usable = windows.values, windows.usable
    scan = np.arange(len(windows.slices))
    order = windows.rank_order(-scan if rule == "last" else None)
    k = p.pool_range
    kept = np.minimum(usable.sum(axis=-1), k)               # (Ho, Wo)
    keep = np.arange(k) < kept[..., None]                   # (Ho, Wo, k)
    weights = _rank_weights(w, p.weighting, k)[:, kept, :]  # (Cw, Ho, Wo, k)
    to_rank = np.where(keep, gy[..., None] * weights[None], 0.0)
    to_position = np.zeros(values.shape)
    np.put_along_axis(to_position, order[..., :k], to_rank, axis=-1)
    if rule == "split":
        is_nan = np.isnan(values)
        both = usable[..., :, None] & usable[..., None, :]
        equal = ((values[..., :, None] == values[..., None, :])
                 | (is_nan[..., :, None] & is_nan[..., None, :])) & both
        members = equal.sum(axis=-1)
        shared = (equal * to_position[..., None, :]).sum(axis=-1)
        to_position = np.where(members > 0, shared / np.maximum(members, 1),
                               0.0)
    return windows.to_input(to_position)


def _candidates(case: Any) -> List[Tuple[str, Callable[[], Dict[str, Any]]]]:
    """(diagnosis, results) for each recognisable bug that applies here.

    ``results()`` returns what that bug gives for y, grad_x and grad_w, in
    float64, computed with the reference.
    """
    x = case.x.astype(np.float64)
    w = case.w.astype(np.float64)
    g = case.grad_y.astype(np.float64)
    kw = case.kwargs
    ref_f, ref_b = reference.sortpool2d, reference.sortpool2d_backward
    out: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []

    def ascending():
        wr = np.ascontiguousarray(w[..., ::-1])
        gx, gw = ref_b(g, x, wr, **kw)
        return dict(y=ref_f(x, wr, **kw), grad_x=gx, grad_w=gw[..., ::-1])

    out.append((
        "weights applied in ascending rank order: the result equals the "
        "reference with w reversed, i.e. w[..., 0] weights the smallest kept "
        "value instead of the largest (the order of the seed's public TF "
        "code). If that order is intended, check the implementation with "
        "w[..., ::-1].", ascending))

    if kw["pad_value"] != 0.0:
        zero = dict(kw, pad_value=0.0)

        def pad_zero():
            gx, gw = ref_b(g, x, w, **zero)
            return dict(y=ref_f(x, w, **zero), grad_x=gx, grad_w=gw)

        out.append((
            f"padding taken as zero: the result equals the reference with "
            f"pad_value=0.0 (padded positions hold 0.0 and compete for the "
            f"top ranks) where this case has pad_value={kw['pad_value']!r}. "
            f"If zero padding is intended, declare pad_values=(0.0,).",
            pad_zero))

    def bottom_k():
        gx, gw = ref_b(g, -x, w, **kw)
        return dict(y=-ref_f(-x, w, **kw), grad_x=gx, grad_w=-gw)

    out.append((
        "top-k taken from the wrong end: the result equals "
        "-reference(-x), i.e. the pool_range smallest values of each window "
        "are kept (an ascending sort where the contract sorts in "
        "decreasing order).", bottom_k))

    if kw["weighting"] == "softmax":
        raw = dict(kw, weighting="raw")

        def no_renorm():
            p = _softmax(w)
            gx, gp = ref_b(g, x, p, **raw)
            gw = p * (gp - (p * gp).sum(axis=-1, keepdims=True))
            return dict(y=ref_f(x, p, **raw), grad_x=gx, grad_w=gw)

        out.append((
            "softmax not renormalised in partial windows: windows with fewer "
            "values than pool_range use softmax over all pool_range logits, "
            "cut short, so their weights do not sum to 1 (the contract "
            "renormalises the softmax over the ranks a window has).",
            no_renorm))

    def tie(rule):
        def results():
            _, gw = ref_b(g, x, w, **kw)
            return dict(y=ref_f(x, w, **kw),
                        grad_x=tie_variant_grad_x(g, x, w, rule, **kw),
                        grad_w=gw)
        return results

    out.append((
        "gradient split between tied elements: grad_x equals the "
        "reference's except that equal values in a window share their "
        "ranks' gradient equally; the contract gives each element exactly "
        "one rank, the earlier position in scan order taking the higher "
        "rank.", tie("split")))
    out.append((
        "ties broken towards the later position: grad_x equals the "
        "reference's except that of two equal values the later one in scan "
        "order takes the higher rank (an unstable or reversed sort); the "
        "contract gives the higher rank to the earlier position.",
        tie("last")))
    return out


def _diagnose(case: Any, stage: str, quantities: List[_Quantity],
              dtype: np.dtype) -> List[str]:
    """The diagnoses whose results match the actual ones on every compared
    quantity and differ from the reference on at least one."""
    found = []
    for text, results in _candidates(case):
        try:
            with np.errstate(all="ignore"):
                candidate = results()
        except Exception:  # a variant the reference cannot compute here
            continue
        matches, differs = True, False
        for q in quantities:
            if not isinstance(q.actual, np.ndarray):
                matches = False
                break
            c = np.asarray(candidate[q.name], dtype=np.float64)
            if not _close(q.actual, c, dtype, q.scale):
                matches = False
                break
            differs |= not _close(c, q.expected, dtype, q.scale)
        if matches and differs:
            found.append(text)
    return found


# ---------------------------------------------------------------------------
# The report


def _show(a: Any, indent: str = "    ") -> str:
    a = np.asarray(a)
    if a.size > 2000:
        return f"{indent}(shape {a.shape}, too large to print)"
    with np.printoptions(threshold=2001, floatmode="unique", linewidth=88):
        text = np.array2string(a, separator=", ")
    return "\n".join(indent + line for line in text.splitlines())


def _report(f: Failure) -> str:
    case = f.case
    lines = [
        f"the implementation disagrees with the reference "
        f"({f.stage}): {f.summary}",
        "",
        "Smallest failing case found (Hypothesis shrank it before this "
        "report):",
        f"  values {case.values!r} drawn with seed {case.seed}, dtype "
        f"{case.x.dtype}, x of shape {case.x.shape} in layout "
        f"{case.layout!r}, w of shape {case.w.shape} "
        f"(pool_range {case.w.shape[-1]})",
        "  x =",
        _show(case.x),
        "  w =",
        _show(case.w),
    ]
    if f.stage == "backward":
        lines += ["  grad_y =", _show(case.grad_y)]
    lines += ["  calls:"] + [f"    {c}" for c in f.calls]
    for q in f.quantities:
        if q.message is None:
            continue
        lines += ["", f"  expected {q.name} (float64 reference) =",
                  _show(q.expected), f"  actual {q.name} ="]
        if isinstance(q.actual, np.ndarray):
            lines.append(_show(q.actual))
        else:
            lines.append(f"    {q.actual!r}")
    if f.diagnose is not None:
        found = f.diagnose()
        lines.append("")
        if found:
            lines.append("Diagnosis: the mismatch looks like")
            lines += [f"  - {text}" for text in found]
        else:
            lines.append("Diagnosis: no known bug pattern matches this "
                         "mismatch.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The public entry points


def assert_matches_reference(
        forward: Callable[..., Any],
        backward: Optional[Callable[..., Any]] = None, *,
        dtype: Any = np.float64,
        values: Sequence[str] = ("distinct", "ties", "special"),
        layouts: Sequence[str] = LAYOUTS,
        weightings: Sequence[str] = WEIGHTINGS,
        per_channel: Optional[bool] = None,
        kernel_sizes: Optional[Sequence[Any]] = None,
        max_kernel: int = 3,
        stride: bool = True,
        padding: Any = True,
        dilation: bool = True,
        ceil_mode: bool = True,
        pad_values: Sequence[Optional[float]] = (None, 0.0, -1.5),
        max_pool_range: Optional[int] = None,
        max_size: int = 8,
        max_examples: int = 200,
        settings: Any = None) -> None:
    """Check an implementation of sorted weighted pooling against the
    float64 reference on generated problems.

    Parameters
    ----------
    forward : callable
        ``forward(x, w, **kwargs) -> y`` with the signature of
        :func:`sortpool_ref.sortpool2d`: NumPy arrays in, an array-like out.
        Only the keyword arguments it accepts are passed (all of them if it
        takes ``**kwargs``); one it does not accept must be fixed by the
        options below to a single choice, which the implementation is then
        taken to have built in.
    backward : callable, optional
        ``backward(grad_y, x, w, **kwargs) -> (grad_x, grad_w)`` with the
        signature of :func:`sortpool_ref.sortpool2d_backward`. Wrap a
        PyTorch implementation with :func:`from_torch` to get both from
        autograd.
    dtype : float32 or float64, default float64
        dtype of ``x``, ``w`` and ``grad_y``; picks the tolerance row of
        :data:`sortpool_ref.testing.TOLERANCES`.
    values : sequence of {'distinct', 'ties', 'special', 'normal'}
        Kinds of input values: pairwise distinct, many ties (and signed
        zeros), NaN/inf mixed in, plain normal draws.
    layouts, weightings : sequences of strings
        The layouts (``'NHWC'``, ``'NCHW'``) and weightings (``'softmax'``,
        ``'raw'``) the implementation supports.
    per_channel : bool, optional
        ``False``: shared weights of shape ``(pool_range,)`` only; ``True``:
        per-channel weights ``(C, pool_range)`` only; ``None``: both.
    kernel_sizes : sequence of ints or pairs, optional
        Kernel sizes to use; default every size up to ``max_kernel``.
    stride, dilation, ceil_mode : bool, default True
        ``False`` keeps that argument at its default (``stride=None``,
        ``dilation=1``, ``ceil_mode=False``).
    padding : bool or sequence of str, default True
        ``True``: every form; ``False``: none; or a subset of ``'none'``
        (``padding=0``), ``'int'``, ``'pair'``, ``'sides'`` (per side),
        ``'valid'``, ``'same'``.
    pad_values : sequence of None or float, default (None, 0.0, -1.5)
        ``None`` leaves padded positions out of the window; a number is the
        value padded positions hold.
    max_pool_range, max_size : int
        Largest pool_range (``None``: up to the window size) and largest
        input height and width.
    max_examples : int, default 200
        Number of problems Hypothesis tries (before shrinking a failure).
    settings : hypothesis.settings, optional
        Base settings (database, derandomize, ...); ``max_examples``,
        ``deadline=None`` and ``report_multiple_bugs=False`` are applied on
        top.

    Raises
    ------
    ConformanceError
        (an ``AssertionError``) for the smallest failing case: the inputs,
        the calls, expected and actual results and, where one is
        recognisable, a diagnosis.
    TypeError, ValueError
        For bad options, and when ``forward`` or ``backward`` does not
        accept a keyword argument that the options let vary.

    Notes
    -----
    Results are compared elementwise as ``|actual - expected| <= rtol *
    scale`` with ``rtol`` from the dtype and ``scale`` the size of the
    summed terms (:func:`sortpool_ref.testing.tolerance_scale`); NaN must
    match NaN and infinities must match exactly. ``grad_w`` is compared
    only for inputs that are all finite, where the contract specifies it;
    ``y`` and ``grad_x`` always. The arguments passed in are copies, and an
    implementation that modifies them fails.
    """
    if not callable(forward):
        raise TypeError(f"forward must be callable, got {forward!r}")
    if backward is not None and not callable(backward):
        raise TypeError(f"backward must be None or callable, got "
                        f"{backward!r}")
    dtype = _float_dtype(dtype)
    values = _choices("values", values, VALUE_KINDS)
    layouts = _choices("layouts", layouts, LAYOUTS)
    weightings = _choices("weightings", weightings, WEIGHTINGS)
    if per_channel is not None and not isinstance(per_channel,
                                                  (bool, np.bool_)):
        raise TypeError(f"per_channel must be None, True or False, got "
                        f"{per_channel!r}")
    kernel_sizes = _kernel_sizes(kernel_sizes)
    max_kernel = _positive_int("max_kernel", max_kernel)
    stride = _flag("stride", stride)
    forms = _padding_forms(padding)
    dilation = _flag("dilation", dilation)
    ceil_mode = _flag("ceil_mode", ceil_mode)
    pads = _pad_values(pad_values)
    max_pool_range = _positive_int("max_pool_range", max_pool_range,
                                   optional=True)
    max_size = _positive_int("max_size", max_size)
    max_examples = _positive_int("max_examples", max_examples)

    varying: Dict[str, str] = {}
    if kernel_sizes is None or len(kernel_sizes) > 1:
        varying["kernel_size"] = (f"kernel_sizes={kernel_sizes!r}")
    if stride:
        varying["stride"] = "stride=True"
    if not (set(forms) <= {"none", "valid"} or set(forms) == {"same"}):
        varying["padding"] = f"padding={padding!r}"
    if dilation:
        varying["dilation"] = "dilation=True"
    if ceil_mode:
        varying["ceil_mode"] = "ceil_mode=True"
    if len(layouts) > 1:
        varying["layout"] = f"layouts={layouts!r}"
    if len(weightings) > 1:
        varying["weighting"] = f"weightings={weightings!r}"
    if len(set(pads)) > 1:
        varying["pad_value"] = f"pad_values={pads!r}"
    forward_keywords = _check_keywords("forward", forward, varying)
    backward_keywords = (None if backward is None else
                         _check_keywords("backward", backward, varying))

    import hypothesis
    from hypothesis import HealthCheck, Phase, given

    from .strategies import conformance_cases

    cases = conformance_cases(
        values=values, dtype=dtype, layouts=layouts, weightings=weightings,
        per_channel=None if per_channel is None else bool(per_channel),
        pad_values=pads, max_pool_range=max_pool_range,
        kernel_sizes=kernel_sizes, max_kernel=max_kernel, stride=stride,
        padding=forms, dilation=dilation, ceil_mode=ceil_mode,
        max_size=max_size)
    base = settings if settings is not None else hypothesis.settings()
    checks = set(base.suppress_health_check) | {
        HealthCheck.too_slow, HealthCheck.filter_too_much,
        HealthCheck.data_too_large}
    run_settings = hypothesis.settings(
        base, max_examples=max_examples, deadline=None,
        report_multiple_bugs=False, suppress_health_check=list(checks),
        # The report says what failed; the explain phase's guesses at which
        # lines did cost time and help no one here.
        phases=[p for p in base.phases if p is not Phase.explain])

    @run_settings
    @given(case=cases)
    def matches_reference(case):
        failure = _run_case(case, forward, backward, forward_keywords,
                            backward_keywords, dtype)
        if failure is not None:
            raise ConformanceError(failure)

    matches_reference()


def from_torch(fn: Callable[..., Any], *, device: Any = None
               ) -> Tuple[Callable[..., np.ndarray],
                          Callable[..., Tuple[np.ndarray, np.ndarray]]]:
    """Wrap a PyTorch implementation for :func:`assert_matches_reference`.

    Parameters
    ----------
    fn : callable
        ``fn(x, w, **kwargs) -> y`` on ``torch.Tensor`` arguments,
        differentiable with autograd (or with its own
        ``torch.autograd.Function``).
    device : str or torch.device, optional
        Where the tensors are made (default: the CPU).

    Returns
    -------
    forward : callable
        ``forward(x, w, **kwargs)``: NumPy arrays in, a NumPy array out; runs
        ``fn`` under ``torch.no_grad()``.
    backward : callable
        ``backward(grad_y, x, w, **kwargs) -> (grad_x, grad_w)`` from
        ``torch.autograd.grad`` of ``fn``'s output with ``grad_y``; an input
        the output does not depend on gets zeros.

    Notes
    -----
    Both wrappers carry ``fn``'s signature (after ``x, w``), so the kit
    passes exactly the keyword arguments ``fn`` accepts. Tensors keep the
    NumPy dtype; PyTorch is imported on the first call.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")

    def tensor(a, grad=False):
        import torch
        return torch.tensor(np.asarray(a), device=device,
                            requires_grad=grad)

    def to_numpy(t):
        return t.detach().cpu().numpy()

    def forward(x, w, **kwargs):
        import torch
        with torch.no_grad():
            return to_numpy(fn(tensor(x), tensor(w), **kwargs))

    def backward(grad_y, x, w, **kwargs):
        import torch
        xt, wt = tensor(x, True), tensor(w, True)
        y = fn(xt, wt, **kwargs)
        grads = torch.autograd.grad(y, (xt, wt), tensor(grad_y),
                                    allow_unused=True)
        return tuple(to_numpy(torch.zeros_like(t) if gr is None else gr)
                     for gr, t in zip(grads, (xt, wt)))

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        params = list(signature.parameters.values())
        grad_y = inspect.Parameter("grad_y", inspect.Parameter.POSITIONAL_ONLY)
        forward.__signature__ = signature  # type: ignore[attr-defined]
        backward.__signature__ = signature.replace(  # type: ignore
            parameters=[grad_y] + params)
    forward.__name__ = backward.__name__ = getattr(fn, "__name__", "fn")
    forward.__qualname__ = f"from_torch({forward.__name__}).forward"
    backward.__qualname__ = f"from_torch({forward.__name__}).backward"
    return forward, backward
