"""The one validator: argument checking, geometry and normalisation.

Every engine receives a :class:`Problem` built here and does no checking of
its own. Everything in this module is pure Python on shapes, dtypes and
integers: it never touches array data, so it runs before any work is done
and works the same for NumPy and CuPy arrays.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

LAYOUTS = ("NHWC", "NCHW")
WEIGHTINGS = ("softmax", "raw")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Geometry:
    """Checked pooling geometry, in the words PyTorch uses.

    Padding is stored per side (``pad_top``, ``pad_bottom``, ``pad_left``,
    ``pad_right``). Window ``(oh, ow)`` covers input rows
    ``oh * stride_h - pad_top + i * dilation_h`` for ``i < kernel_h`` and the
    matching columns.
    """

    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    dilation_h: int
    dilation_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    out_h: int
    out_w: int

    @property
    def window_size(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def overlapping_rows(self) -> bool:
        """Whether windows of neighbouring output rows share input rows."""
        return self.stride_h < (self.kernel_h - 1) * self.dilation_h + 1


@dataclass(frozen=True)
class Problem:
    """Everything an engine needs to know, checked and normalised."""

    geometry: Geometry
    batch: int
    channels: int
    layout: str
    weighting: str
    pool_range: int
    per_channel: bool
    pad_value: Optional[float]
    dtype: np.dtype  # dtype of x, the compute and output dtype
    weight_dtype: np.dtype

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        g = self.geometry
        if self.layout == "NHWC":
            return (self.batch, g.out_h, g.out_w, self.channels)
        return (self.batch, self.channels, g.out_h, g.out_w)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(name: str, value: Any, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``."""
    if _is_int(value):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_int(v) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(
            f"{name} must be an int or a pair of ints, got {value!r}"
        )
    if min(pair) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return pair


_PADDING_FORMS = (
    "an int, a pair (pad_h, pad_w), ((top, bottom), (left, right)), "
    "'valid' or 'same'"
)


def _explicit_padding(padding: Any) -> Optional[Tuple[int, int, int, int]]:
    """(top, bottom, left, right) for the numeric forms, None for strings."""
    if isinstance(padding, str):
        if padding in ("valid", "same"):
            return None
        raise ValueError(f"padding must be {_PADDING_FORMS}, got {padding!r}")
    if _is_int(padding):
        p = int(padding)
        sides = (p, p, p, p)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        a, b = padding
        if _is_int(a) and _is_int(b):
            sides = (int(a), int(a), int(b), int(b))
        elif (
            isinstance(a, (tuple, list))
            and isinstance(b, (tuple, list))
            and len(a) == 2
            and len(b) == 2
            and all(_is_int(v) for v in (*a, *b))
        ):
            sides = (int(a[0]), int(a[1]), int(b[0]), int(b[1]))
        else:
            raise TypeError(
                f"padding must be {_PADDING_FORMS}, got {padding!r}"
            )
    else:
        raise TypeError(f"padding must be {_PADDING_FORMS}, got {padding!r}")
    if min(sides) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return sides


def _out_size(size: int, lead: int, trail: int, kernel: int, stride: int,
              dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, generalised to unequal padding.

    Floor (or ceil) of (size + padding - effective kernel) / stride, plus
    one; in ceil mode the last window must start inside the input or its
    leading padding.
    """
    span = size + lead + trail - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = (span + stride - 1) // stride + 1
        if (out - 1) * stride >= size + lead:
            out -= 1
    else:
        out = span // stride + 1
    return max(out, 0)


def _same_padding(size: int, kernel: int, stride: int,
                  dilation: int) -> Tuple[int, int]:
    """TensorFlow's SAME split: the extra row/column goes bottom/right."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _first_empty_window(size: int, lead: int, kernel: int, stride: int,
                        dilation: int, out: int) -> Optional[int]:
    """Index of the first window along one axis with no real position."""
    starts = np.arange(out, dtype=np.int64) * stride - lead
    taps = starts[:, None] + np.arange(kernel, dtype=np.int64) * dilation
    real = ((taps >= 0) & (taps < size)).any(axis=1)
    empty = np.flatnonzero(~real)
    return int(empty[0]) if empty.size else None


def make_geometry(height: int, width: int, kernel_size: Any = 2,
                  stride: Any = None, padding: Any = 0, dilation: Any = 1,
                  ceil_mode: Any = False) -> Geometry:
    """Check the geometry words and compute output size and padding split.

    Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    kh, kw = _pair("kernel_size", kernel_size, 1)
    if stride is None:
        sh, sw = kh, kw
    else:
        sh, sw = _pair("stride", stride, 1)
    dh, dw = _pair("dilation", dilation, 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    ceil_mode = bool(ceil_mode)

    sides = _explicit_padding(padding)
    if sides is None:
        if padding == "valid":
            sides = (0, 0, 0, 0)
        else:
            top, bottom = _same_padding(height, kh, sh, dh)
            left, right = _same_padding(width, kw, sw, dw)
            sides = (top, bottom, left, right)
    else:
        top, bottom, left, right = sides
        if max(top, bottom) > kh // 2 or max(left, right) > kw // 2:
            raise ValueError(
                f"padding {padding!r} is too large for kernel_size "
                f"{(kh, kw)}: each side may be at most half the kernel, "
                f"(pad_h, pad_w) <= {(kh // 2, kw // 2)}, as in PyTorch"
            )
    top, bottom, left, right = sides

    out_h = _out_size(height, top, bottom, kh, sh, dh, ceil_mode)
    out_w = _out_size(width, left, right, kw, sw, dw, ceil_mode)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be empty: input (H, W) = {(height, width)} "
            f"with kernel_size {(kh, kw)}, dilation {(dh, dw)} and padding "
            f"(top, bottom, left, right) = {sides} gives output "
            f"{(max(out_h, 0), max(out_w, 0))}"
        )
    for axis, size, lead, k, s, d, out in (
        ("row", height, top, kh, sh, dh, out_h),
        ("column", width, left, kw, sw, dw, out_w),
    ):
        empty = _first_empty_window(size, lead, k, s, d, out)
        if empty is not None:
            raise ValueError(
                f"window {empty} along the output {axis}s would contain no "
                f"input position (only padding): input (H, W) = "
                f"{(height, width)}, kernel_size {(kh, kw)}, stride "
                f"{(sh, sw)}, dilation {(dh, dw)}, padding (top, bottom, "
                f"left, right) = {sides}, ceil_mode={ceil_mode}"
            )
    return Geometry(height, width, kh, kw, sh, sw, dh, dw,
                    top, bottom, left, right, out_h, out_w)


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    return str(layout)


def check_weighting(weighting: Any) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be 'softmax' or 'raw', got {weighting!r}"
        )
    return str(weighting)


def check_pad_value(pad_value: Any) -> Optional[float]:
    if pad_value is None:
        return None
    if isinstance(pad_value, (bool, np.bool_)) or not isinstance(
        pad_value, numbers.Real
    ):
        raise TypeError(
            f"pad_value must be None or a real number, got {pad_value!r}"
        )
    return float(pad_value)


def check_float_dtype(name: str, dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32 or float64, got {dtype}"
        )
    return dtype


def _freeze(value: Any) -> Any:
    """A hashable key for a geometry word that tells apart values which
    compare equal but check differently (True and 1, 2 and 2.0): every
    leaf is kept with its type. Raises TypeError for anything else (lists,
    arrays), which is then checked without the cache."""
    if isinstance(value, tuple):
        return (tuple, tuple(_freeze(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str, type,
                                           np.generic, np.dtype)):
        return (type(value), value)
    raise TypeError("not cached")


def _thaw(key: Any) -> Any:
    kind, value = key
    if kind is tuple:
        return tuple(_thaw(v) for v in value)
    return value


@functools.lru_cache(maxsize=256)
def _problem_for(arrays: Any, words: Any) -> Problem:
    return _make_problem(*arrays, **{k: _thaw(v) for k, v in words})


def make_problem(x_shape: Tuple[int, ...], x_dtype: Any,
                 w_shape: Tuple[int, ...], w_dtype: Any,
                 **words: Any) -> Problem:
    """Check every argument of a forward call and describe the problem
    (see _make_problem). The checks are pure functions of the arguments,
    so Problems are cached by them: the checks cost about 40 us, a fifth
    of a small forward call. Shapes and dtypes are used as they are (the
    checks convert them, so equal values check the same); failed checks
    are not cached and raise every time."""
    try:
        key = (tuple(x_shape), x_dtype, tuple(w_shape), w_dtype)
        frozen = tuple((k, _freeze(v)) for k, v in sorted(words.items()))
        hash(key)
    except TypeError:
        return _make_problem(x_shape, x_dtype, w_shape, w_dtype, **words)
    return _problem_for(key, frozen)


def _make_problem(x_shape: Tuple[int, ...], x_dtype: Any,
                  w_shape: Tuple[int, ...], w_dtype: Any, *,
                  kernel_size: Any = 2, stride: Any = None, padding: Any = 0,
                  dilation: Any = 1, ceil_mode: Any = False,
                  layout: Any = "NHWC", weighting: Any = "softmax",
                  pad_value: Any = None) -> Problem:
    """Check every argument of a forward call and describe the problem."""
    layout = check_layout(layout)
    weighting = check_weighting(weighting)
    pad_value = check_pad_value(pad_value)
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4:
        raise ValueError(
            f"x must be a 4-D array in {layout} layout, got "
            f"{len(x_shape)}-D with shape {x_shape}"
        )
    dtype = check_float_dtype("x", x_dtype)
    weight_dtype = check_float_dtype("w", w_dtype)
    if layout == "NHWC":
        batch, height, width, channels = x_shape
    else:
        batch, channels, height, width = x_shape
    geometry = make_geometry(height, width, kernel_size, stride, padding,
                             dilation, ceil_mode)

    w_shape = tuple(int(s) for s in w_shape)
    if len(w_shape) not in (1, 2):
        raise ValueError(
            f"w must have shape (pool_range,) or (C, pool_range), got shape "
            f"{w_shape}"
        )
    pool_range = w_shape[-1]
    per_channel = len(w_shape) == 2
    if per_channel and w_shape[0] != channels:
        raise ValueError(
            f"w has shape {w_shape}: per-channel weights need one row per "
            f"channel of x, i.e. shape ({channels}, pool_range)"
        )
    window = geometry.window_size
    if not 1 <= pool_range <= window:
        raise ValueError(
            f"pool_range (the last dimension of w) must be between 1 and "
            f"kernel_h * kernel_w = {window}, got {pool_range}"
        )
    return Problem(geometry, batch, channels, layout, weighting, pool_range,
                   per_channel, pad_value, dtype, weight_dtype)


def check_grad_y(problem: Problem, shape: Tuple[int, ...], dtype: Any) -> None:
    """grad_y must have the output's shape and a float dtype."""
    shape = tuple(int(s) for s in shape)
    if shape != problem.out_shape:
        raise ValueError(
            f"grad_y must have the output's shape {problem.out_shape}, got "
            f"{shape}"
        )
    check_float_dtype("grad_y", dtype)


def softmax_table(logits: np.ndarray, weighting: str) -> np.ndarray:
    """Rank weights for every possible number of ranks, in float64.

    Returns ``table`` of shape ``(Cw, k + 1, k)`` with ``table[c, m, r]`` the
    weight of rank ``r`` (0-based) in a window that keeps ``m`` ranks, zero
    for ``r >= m``. Row ``m = 0`` is unused and zero.
    """
    w = np.asarray(logits, dtype=np.float64)
    w = w.reshape(-1, w.shape[-1])
    cw, k = w.shape
    table = np.zeros((cw, k + 1, k), dtype=np.float64)
    if weighting == "raw":
        for m in range(1, k + 1):
            table[:, m, :m] = w[:, :m]
        return table
    with np.errstate(invalid="ignore", over="ignore"):
        for m in range(1, k + 1):
            shifted = w[:, :m] - w[:, :m].max(axis=1, keepdims=True)
            e = np.exp(shifted)
            table[:, m, :m] = e / e.sum(axis=1, keepdims=True)
    return table


def weight_grad_from_partials(table: np.ndarray, partials: np.ndarray,
                              weighting: str) -> np.ndarray:
    """Turn per-m rank sums into dL/dw (float64, shape (Cw, k)).

    ``partials[c, m, r]`` is the sum, over windows that keep ``m`` ranks, of
    ``g_o * a_o(r)``. Raw weights take the plain sum over m; softmax logits
    take ``sum_m p^(m) * (G^(m) - <p^(m), G^(m)>)``.
    """
    if weighting == "raw":
        return partials.sum(axis=1)
    k = partials.shape[-1]
    grad = np.zeros((partials.shape[0], k), dtype=np.float64)
    for m in range(1, k + 1):
        p = table[:, m, :]
        G = partials[:, m, :]
        with np.errstate(invalid="ignore"):
            grad += p * (G - (p * G).sum(axis=1, keepdims=True))
    return grad
