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
    values = (rng.permutation(size) - size / 2.0) * gap
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
