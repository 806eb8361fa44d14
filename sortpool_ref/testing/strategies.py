"""Hypothesis strategies for sorted weighted pooling problems.

Used by every test file of this project and meant for users checking their own
implementation::

    from hypothesis import given
    from sortpool_ref.testing import strategies as sps

    @given(sps.pooling_cases(values="distinct"))
    def test_mine(case):
        expected = sortpool_ref.reference.sortpool2d(case.x, case.w,
                                                     **case.kwargs)
        ...

Every case drawn here is a valid problem: the geometry passes the project's
validator. Array values are drawn through a seed so that large arrays stay
cheap to generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from .._checks import Geometry, make_geometry  # noqa: F401  (re-exported)

VALUE_KINDS = ("distinct", "ties", "special", "normal")


@dataclass
class PoolingCase:
    """One pooling problem: ``sortpool2d(x, w, **kwargs)``."""

    x: np.ndarray
    w: np.ndarray
    kwargs: Dict[str, Any]
    geometry: Geometry = field(repr=False)

    @property
    def layout(self) -> str:
        return self.kwargs.get("layout", "NHWC")

    @property
    def weighting(self) -> str:
        return self.kwargs.get("weighting", "softmax")


def distinct_array(shape: Sequence[int], dtype: Any = np.float64,
                   seed: int = 0, gap: float = 0.1) -> np.ndarray:
    """Values that differ pairwise by at least ``gap`` (a shuffled arange),
    centred on zero: right for finite-difference checks with a step below
    ``gap / 2``."""
    size = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    values = (rng.permutation(size) - size // 2) * gap  # multiples of gap
    return values.reshape(shape).astype(dtype)


def tied_array(shape: Sequence[int], dtype: Any = np.float64,
               seed: int = 0) -> np.ndarray:
    """Values from {-2, -1, 0, 1, 2} and -0.0: many ties in every window."""
    rng = np.random.default_rng(seed)
    values = rng.integers(-2, 3, size=shape).astype(dtype)
    zeros = values == 0
    values[zeros & (rng.random(shape) < 0.5)] = -0.0
    return values


def special_array(shape: Sequence[int], dtype: Any = np.float64,
                  seed: int = 0) -> np.ndarray:
    """Small integers mixed with NaN, +inf, -inf and signed zeros."""
    rng = np.random.default_rng(seed)
    pool = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, -1.0, 2.0])
    values = rng.normal(size=shape)
    special = rng.random(shape) < 0.3
    values[special] = rng.choice(pool, size=int(special.sum()))
    return values.astype(dtype)


def array_of(kind: str, shape: Sequence[int], dtype: Any,
             seed: int) -> np.ndarray:
    if kind == "distinct":
        return distinct_array(shape, dtype, seed)
    if kind == "ties":
        return tied_array(shape, dtype, seed)
    if kind == "special":
        return special_array(shape, dtype, seed)
    if kind == "normal":
        return np.random.default_rng(seed).normal(size=shape).astype(dtype)
    raise ValueError(f"kind must be one of {VALUE_KINDS}, got {kind!r}")


@st.composite
def geometries(draw, max_kernel: int = 3, max_stride: int = 3,
               max_dilation: int = 2, max_size: int = 8,
               padding: bool = True, dilation: bool = True,
               ceil_mode: bool = True, string_padding: bool = True
               ) -> Tuple[Tuple[int, int], Dict[str, Any], Geometry]:
    """((H, W), geometry keyword arguments, checked Geometry).

    The keyword arguments use every form the API accepts (ints, pairs,
    per-side padding, 'valid'/'same', ``stride=None``).
    """
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    kernel = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    stride = draw(st.one_of(st.none(), st.integers(1, max_stride),
                            st.tuples(st.integers(1, max_stride),
                                      st.integers(1, max_stride))))
    dil = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation))) \
        if dilation else (1, 1)
    forms = ["zero"]
    if padding:
        forms += ["int", "pair", "sides"]
    if string_padding:
        forms += ["valid", "same"]
    form = draw(st.sampled_from(forms))
    if form == "zero":
        pad: Any = 0
    elif form == "int":
        pad = draw(st.integers(0, min(kh, kw) // 2))
    elif form == "pair":
        pad = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    elif form == "sides":
        pad = ((draw(st.integers(0, kh // 2)), draw(st.integers(0, kh // 2))),
               (draw(st.integers(0, kw // 2)), draw(st.integers(0, kw // 2))))
    else:
        pad = form
    ceil = draw(st.booleans()) if ceil_mode else False
    eff_h = (kh - 1) * dil[0] + 1
    eff_w = (kw - 1) * dil[1] + 1
    height = draw(st.integers(1, max(max_size, eff_h)))
    width = draw(st.integers(1, max(max_size, eff_w)))
    kwargs: Dict[str, Any] = dict(kernel_size=kernel, stride=stride,
                                  padding=pad, ceil_mode=ceil)
    if dil != (1, 1):
        kwargs["dilation"] = dil if dil[0] != dil[1] else dil[0]
    try:
        geometry = make_geometry(height, width, kernel, stride, pad,
                                 kwargs.get("dilation", 1), ceil)
    except ValueError:
        assume(False)
        raise  # unreachable: assume(False) aborts the example
    return (height, width), kwargs, geometry


@st.composite
def pooling_cases(draw, values: str = "distinct", dtype: Any = np.float64,
                  layouts: Sequence[str] = ("NHWC", "NCHW"),
                  weightings: Sequence[str] = ("softmax", "raw"),
                  per_channel: Optional[bool] = None,
                  pad_values: Sequence[Optional[float]] = (None, 0.0, -1.5),
                  max_batch: int = 2, max_channels: int = 3,
                  max_pool_range: Optional[int] = None,
                  **geometry_options: Any) -> PoolingCase:
    """A complete problem: x, w and the keyword arguments of sortpool2d.

    ``values`` is 'distinct' (pairwise gap 0.1), 'ties', 'special' (NaN,
    inf, signed zeros) or 'normal'. ``per_channel=None`` draws both weight
    shapes. Extra keyword arguments go to :func:`geometries`.
    """
    (height, width), kwargs, geometry = draw(geometries(**geometry_options))
    layout = draw(st.sampled_from(list(layouts)))
    weighting = draw(st.sampled_from(list(weightings)))
    batch = draw(st.integers(1, max_batch))
    channels = draw(st.integers(1, max_channels))
    limit = geometry.window_size
    if max_pool_range is not None:
        limit = min(limit, max_pool_range)
    k = draw(st.integers(1, limit))
    shared = (not per_channel) if per_channel is not None else draw(
        st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    shape = ((batch, height, width, channels) if layout == "NHWC"
             else (batch, channels, height, width))
    x = array_of(values, shape, dtype, seed)
    w_shape = (k,) if shared else (channels, k)
    rng = np.random.default_rng(seed + 1)
    if weighting == "softmax":
        w = rng.normal(0.0, 1.0, size=w_shape)
    else:
        w = rng.uniform(-1.0, 1.0, size=w_shape)
    pad_value = draw(st.sampled_from(list(pad_values)))
    kwargs = dict(kwargs, layout=layout, weighting=weighting,
                  pad_value=pad_value)
    return PoolingCase(x=x, w=w, kwargs=kwargs, geometry=geometry)


# ---------------------------------------------------------------------------
# Restricted problems for the conformance kit (sortpool_ref.testing._kit).
# An implementation under test often supports only part of the contract; these
# strategies draw only the options it declares.

PADDING_FORMS = ("none", "int", "pair", "sides", "valid", "same")


@dataclass
class ConformanceCase(PoolingCase):
    """A :class:`PoolingCase` with what the conformance kit also needs:
    the kind of values drawn, the seed they came from and an upstream
    gradient ``grad_y`` (finite, the output's shape and x's dtype)."""

    values: str = "distinct"
    seed: int = 0
    grad_y: Optional[np.ndarray] = None


def _kernel_pair(kernel: Any) -> Tuple[int, int]:
    if isinstance(kernel, (tuple, list)):
        return int(kernel[0]), int(kernel[1])
    return int(kernel), int(kernel)


@st.composite
def restricted_geometries(draw, kernel_sizes: Optional[Sequence[Any]] = None,
                          max_kernel: int = 3, stride: bool = True,
                          max_stride: int = 3,
                          padding: Sequence[str] = PADDING_FORMS,
                          dilation: bool = True, max_dilation: int = 2,
                          ceil_mode: bool = True, max_size: int = 8
                          ) -> Tuple[Tuple[int, int], Dict[str, Any],
                                     Geometry]:
    """Like :func:`geometries`, restricted to what an implementation supports.

    ``kernel_sizes``: the kernel sizes to draw from (ints or pairs), or
    ``None`` for every size up to ``max_kernel`` in both forms.
    ``stride=False``: always ``stride=None`` (the kernel size).
    ``padding``: the forms to draw from, a subset of :data:`PADDING_FORMS`
    ('none' is the default ``padding=0``). ``dilation=False`` and
    ``ceil_mode=False`` keep those at their defaults. The keyword arguments
    returned hold only ``kernel_size``, ``stride``, ``padding``,
    ``dilation`` and ``ceil_mode``.
    """
    if kernel_sizes is None:
        kh = draw(st.integers(1, max_kernel))
        kw = draw(st.integers(1, max_kernel))
        kernel: Any = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    else:
        kernel = draw(st.sampled_from(list(kernel_sizes)))
        kh, kw = _kernel_pair(kernel)
    step: Any = None
    if stride:
        step = draw(st.one_of(st.none(), st.integers(1, max_stride),
                              st.tuples(st.integers(1, max_stride),
                                        st.integers(1, max_stride))))
    dil = ((draw(st.integers(1, max_dilation)),
            draw(st.integers(1, max_dilation))) if dilation else (1, 1))
    form = draw(st.sampled_from(list(padding)))
    if form == "none":
        pad: Any = 0
    elif form == "int":
        pad = draw(st.integers(0, min(kh, kw) // 2))
    elif form == "pair":
        pad = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    elif form == "sides":
        pad = ((draw(st.integers(0, kh // 2)), draw(st.integers(0, kh // 2))),
               (draw(st.integers(0, kw // 2)), draw(st.integers(0, kw // 2))))
    elif form in ("valid", "same"):
        pad = form
    else:
        raise ValueError(
            f"padding forms must be among {PADDING_FORMS}, got {form!r}")
    ceil = draw(st.booleans()) if ceil_mode else False
    eff_h = (kh - 1) * dil[0] + 1
    eff_w = (kw - 1) * dil[1] + 1
    height = draw(st.integers(1, max(max_size, eff_h)))
    width = draw(st.integers(1, max(max_size, eff_w)))
    dil_arg: Any = dil if dil[0] != dil[1] else dil[0]
    kwargs: Dict[str, Any] = dict(kernel_size=kernel, stride=step,
                                  padding=pad, dilation=dil_arg,
                                  ceil_mode=ceil)
    try:
        geometry = make_geometry(height, width, kernel, step, pad, dil_arg,
                                 ceil)
    except ValueError:
        assume(False)
        raise  # unreachable: assume(False) aborts the example
    return (height, width), kwargs, geometry


@st.composite
def conformance_cases(draw, values: Sequence[str] = ("distinct", "ties",
                                                     "special"),
                      dtype: Any = np.float64,
                      layouts: Sequence[str] = ("NHWC", "NCHW"),
                      weightings: Sequence[str] = ("softmax", "raw"),
                      per_channel: Optional[bool] = None,
                      pad_values: Sequence[Optional[float]] = (None, 0.0,
                                                               -1.5),
                      max_batch: int = 2, max_channels: int = 3,
                      max_pool_range: Optional[int] = None,
                      **geometry_options: Any) -> ConformanceCase:
    """A complete problem, every argument drawn from the allowed choices.

    ``values`` is a sequence of value kinds (see :data:`VALUE_KINDS`),
    ``dtype`` the dtype of ``x``, ``w`` and ``grad_y``. ``per_channel=None``
    draws both weight shapes. Extra keyword arguments go to
    :func:`restricted_geometries`. The keyword arguments of the case hold
    every argument of :func:`sortpool_ref.sortpool2d` but ``engine``.
    """
    (height, width), kwargs, geometry = draw(
        restricted_geometries(**geometry_options))
    kind = draw(st.sampled_from(list(values)))
    layout = draw(st.sampled_from(list(layouts)))
    weighting = draw(st.sampled_from(list(weightings)))
    pad_value = draw(st.sampled_from(list(pad_values)))
    batch = draw(st.integers(1, max_batch))
    channels = draw(st.integers(1, max_channels))
    limit = geometry.window_size
    if max_pool_range is not None:
        limit = min(limit, max_pool_range)
    k = draw(st.integers(1, limit))
    shared = (not per_channel) if per_channel is not None else draw(
        st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    shape = ((batch, height, width, channels) if layout == "NHWC"
             else (batch, channels, height, width))
    x = array_of(kind, shape, dtype, seed)
    rng = np.random.default_rng(seed + 1)
    w_shape = (k,) if shared else (channels, k)
    if weighting == "softmax":
        w = rng.normal(0.0, 1.0, size=w_shape)
    else:
        w = rng.uniform(-1.0, 1.0, size=w_shape)
    out_shape = ((batch, geometry.out_h, geometry.out_w, channels)
                 if layout == "NHWC"
                 else (batch, channels, geometry.out_h, geometry.out_w))
    grad_y = rng.normal(size=out_shape)
    kwargs = dict(kwargs, layout=layout, weighting=weighting,
                  pad_value=pad_value)
    return ConformanceCase(x=x, w=w.astype(dtype), kwargs=kwargs,
                           geometry=geometry, values=kind, seed=seed,
                           grad_y=grad_y.astype(dtype))
