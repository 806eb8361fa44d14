"""The float64 NumPy reference: the definition of sorted weighted pooling.

Every other engine is judged against these two functions. They are written to
be read: each step of the contract is one vectorised NumPy expression, with a
Python loop only over the ``kernel_h * kernel_w`` positions of the kernel (never
over windows). Whatever the input dtype, the arithmetic is done in float64; the
results are returned in the dtype of ``x`` (and of ``w`` for ``grad_w``), as
every engine does. Call them with float64 arrays to get float64 ground truth.

The functions take the same arguments as :func:`sortpool_ref.sortpool2d` and
:func:`sortpool_ref.sortpool2d_backward`, without ``engine``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._checks import Geometry, Problem

__all__ = ["sortpool2d", "sortpool2d_backward"]

# Position kinds in the padded plane.
_REAL, _PAD, _OUTSIDE = 0, 1, 2


def _padded_plane(x: np.ndarray, g: Geometry, pad_value: Optional[float]):
    """x (N, C, H, W) float64 placed in a plane that every window fits in.

    Returns the plane and a (Hp, Wp) map of position kinds: real input,
    explicit padding, or outside both (ceil_mode's overhang).
    """
    n, c = x.shape[:2]
    hp = max(g.pad_top + g.height + g.pad_bottom,
             (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1)
    wp = max(g.pad_left + g.width + g.pad_right,
             (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1)
    fill = 0.0 if pad_value is None else pad_value
    plane = np.full((n, c, hp, wp), fill, dtype=np.float64)
    rows = slice(g.pad_top, g.pad_top + g.height)
    cols = slice(g.pad_left, g.pad_left + g.width)
    plane[:, :, rows, cols] = x
    kind = np.full((hp, wp), _OUTSIDE, dtype=np.int8)
    kind[: g.pad_top + g.height + g.pad_bottom,
         : g.pad_left + g.width + g.pad_right] = _PAD
    kind[rows, cols] = _REAL
    return plane, kind


def _kernel_slices(g: Geometry):
    """For each kernel position in scan order, the strided slices of the
    padded plane that hold that position of every window."""
    for i in range(g.kernel_h):
        r0 = i * g.dilation_h
        rows = slice(r0, r0 + (g.out_h - 1) * g.stride_h + 1, g.stride_h)
        for j in range(g.kernel_w):
            c0 = j * g.dilation_w
            cols = slice(c0, c0 + (g.out_w - 1) * g.stride_w + 1, g.stride_w)
            yield rows, cols


def _rank_weights(w: np.ndarray, weighting: str, pool_range: int) -> np.ndarray:
    """table[c, m, r]: weight of rank r in a window keeping m ranks."""
    w = w.reshape(-1, pool_range)
    table = np.zeros((w.shape[0], pool_range + 1, pool_range))
    for m in range(1, pool_range + 1):
        if weighting == "raw":
            table[:, m, :m] = w[:, :m]
        else:
            # Softmax renormalised over the m ranks the window has.
            z = w[:, :m] - w[:, :m].max(axis=1, keepdims=True)
            e = np.exp(z)
            table[:, m, :m] = e / e.sum(axis=1, keepdims=True)
    return table


def _nchw(a: Any, layout: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.transpose(0, 3, 1, 2) if layout == "NHWC" else a


class _Windows:
    """Every window's values in scan order, and where they came from.

    ``values[n, c, oh, ow, s]`` is position ``s`` of window ``(oh, ow)``
    (zero where the position is not part of the window); ``usable[oh, ow,
    s]`` says whether it is (a real input position, or padding when
    ``pad_value`` is a number).
    """

    def __init__(self, x, p: Problem):
        self.problem = p
        plane, kind = _padded_plane(_nchw(x, p.layout), p.geometry,
                                    p.pad_value)
        self.slices = list(_kernel_slices(p.geometry))
        self.plane_shape = plane.shape
        values = np.stack([plane[:, :, r, c] for r, c in self.slices], -1)
        kinds = np.stack([kind[r, c] for r, c in self.slices], axis=-1)
        self.usable = kinds == _REAL
        if p.pad_value is not None:
            self.usable |= kinds == _PAD
        self.values = np.where(self.usable, values, 0.0)

    def rank_order(self, tiebreak: Optional[np.ndarray] = None) -> np.ndarray:
        """Scan index of each rank, all positions (unusable ones last).

        Key: usable NaN first, then numbers in decreasing order, then
        unusable positions. np.lexsort is stable, so equal keys keep scan
        order unless a ``tiebreak`` key (one value per scan position) is
        given. Adding 0.0 turns -0.0 into +0.0 (they tie).
        """
        is_nan = np.isnan(self.values)
        group = np.where(self.usable, np.where(is_nan, 0, 1), 2)
        neg = np.where(is_nan, 0.0, -self.values) + 0.0
        keys = (neg, np.broadcast_to(group, neg.shape))
        if tiebreak is not None:
            keys = (np.broadcast_to(tiebreak, neg.shape),) + keys
        return np.lexsort(keys, axis=-1)

    def to_input(self, to_position: np.ndarray) -> np.ndarray:
        """Add per-position window contributions back onto the input grid
        (overlapping windows add up; padding is dropped), in x's layout."""
        g = self.problem.geometry
        plane = np.zeros(self.plane_shape)
        for pos, (r, c) in enumerate(self.slices):
            plane[:, :, r, c] += to_position[..., pos]
        grad = plane[:, :, g.pad_top:g.pad_top + g.height,
                     g.pad_left:g.pad_left + g.width]
        return grad.transpose(0, 2, 3, 1) if self.problem.layout == "NHWC" \
            else grad


class _Ranked:
    """The sorted windows of one problem, shared by forward and backward."""

    def __init__(self, x, w, p: Problem):
        self.windows = _Windows(x, p)
        k = p.pool_range
        self.order = self.windows.rank_order()[..., :k]  # scan index per rank
        self.ranked = np.take_along_axis(self.windows.values, self.order, -1)
        self.kept = np.minimum(self.windows.usable.sum(axis=-1), k)  # m_o
        self.keep = np.arange(k) < self.kept[..., None]  # (oh, ow, k)
        table = _rank_weights(np.asarray(w, dtype=np.float64), p.weighting, k)
        # weights[c, oh, ow, r], c of size 1 for shared weights.
        self.table = table
        self.weights = table[:, self.kept, :]


def sortpool2d(x: Any, w: Any, kernel_size: Any = 2, stride: Any = None,
               padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
               layout: str = "NHWC", weighting: str = "softmax",
               pad_value: Optional[float] = None) -> np.ndarray:
    """Sorted weighted pooling, computed in float64 (the definition).

    See :func:`sortpool_ref.sortpool2d` for the arguments.
    """
    from ._api import prepare

    _, x, w, _, p = prepare(
        x, w, engine="reference", kernel_size=kernel_size, stride=stride,
        padding=padding, dilation=dilation, ceil_mode=ceil_mode,
        layout=layout, weighting=weighting, pad_value=pad_value)
    return forward(x, w, p)


def forward(x: np.ndarray, w: np.ndarray, p: Problem) -> np.ndarray:
    """Engine entry point: y for arrays already checked into ``p``."""
    s = _Ranked(x, w, p)
    with np.errstate(invalid="ignore", over="ignore"):
        # -0.0 is the additive identity that keeps the sign of a zero sum
        # (a window whose kept values are all -0.0 gives -0.0).
        terms = np.where(s.keep, s.weights[None] * s.ranked, -0.0)
        y = terms.sum(axis=-1, initial=-0.0)  # (N, C, Ho, Wo)
    if p.layout == "NHWC":
        y = y.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(y, dtype=p.dtype)


def sortpool2d_backward(grad_y: Any, x: Any, w: Any, kernel_size: Any = 2,
                        stride: Any = None, padding: Any = 0,
                        dilation: Any = 1, ceil_mode: bool = False,
                        layout: str = "NHWC", weighting: str = "softmax",
                        pad_value: Optional[float] = None
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients of sorted weighted pooling, computed in float64.

    See :func:`sortpool_ref.sortpool2d_backward` for the arguments.
    """
    from ._api import prepare

    _, x, w, grad_y, p = prepare(
        x, w, grad_y, engine="reference", kernel_size=kernel_size,
        stride=stride, padding=padding, dilation=dilation,
        ceil_mode=ceil_mode, layout=layout, weighting=weighting,
        pad_value=pad_value)
    return backward(grad_y, x, w, p)


def backward(grad_y: np.ndarray, x: np.ndarray, w: np.ndarray,
             p: Problem) -> Tuple[np.ndarray, np.ndarray]:
    """Engine entry point: (grad_x, grad_w) for arrays checked into ``p``."""
    g = p.geometry
    s = _Ranked(x, w, p)
    gy = np.asarray(grad_y, dtype=np.float64)
    if p.layout == "NHWC":
        gy = gy.transpose(0, 3, 1, 2)
    gy = gy[..., None]  # (N, C, Ho, Wo, 1)

    # dL/dx: each kept rank sends g_o * p_r back to the position it came from.
    to_rank = np.where(s.keep, gy * s.weights[None], 0.0)
    to_position = np.zeros(s.ranked.shape[:-1] + (g.window_size,))
    np.put_along_axis(to_position, s.order, to_rank, axis=-1)
    grad_x = s.windows.to_input(to_position)

    # dL/dw: per number of kept ranks m, G^(m)_r = sum g_o * a_o(r).
    k = p.pool_range
    with np.errstate(invalid="ignore", over="ignore"):
        ga = np.where(s.keep, gy * s.ranked, 0.0)  # (N, C, Ho, Wo, k)
        # Sum over batch and positions; over channels too for shared weights.
        per_channel = ga.sum(axis=0)  # (C, Ho, Wo, k)
        if not p.per_channel:
            per_channel = per_channel.sum(axis=0, keepdims=True)
        grad_w = np.zeros((per_channel.shape[0], k))
        for m in range(1, k + 1):
            in_m = s.kept == m
            if not in_m.any():
                continue
            G = per_channel[:, in_m, :].sum(axis=1)  # (Cw, k)
            if p.weighting == "raw":
                grad_w += G
            else:
                pm = s.table[:, m, :]
                grad_w += pm * (G - (pm * G).sum(axis=1, keepdims=True))
    grad_w = grad_w.reshape(np.shape(w))
    return (np.ascontiguousarray(grad_x, dtype=p.dtype),
            np.ascontiguousarray(grad_w, dtype=p.weight_dtype))
