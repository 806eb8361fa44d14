"""The Numba CPU engine.

Entry points ``forward(x, w, problem)`` and ``backward(grad_y, x, w, problem)``
receive arrays already checked and normalised by :mod:`sortpool_ref._checks`.
Kernels see every tensor as an ``(N, H, W, C)`` view (an NCHW array is passed
transposed, without a copy) and compute in the dtype of ``x``.

Determinism: the forward writes each output once. The backward runs one task
per output row when windows of different rows do not share input rows, and
one task per batch sample otherwise, so every input gradient is accumulated by
one thread in the fixed order (row, column, rank) whatever the thread count.
Weight-gradient partial sums are float64, one slot per output row, reduced in
a fixed order afterwards.

No ``fastmath``: the NaN ranking and IEEE propagation of inf/NaN depend on
exact comparisons.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import Problem, softmax_table, weight_grad_from_partials


@njit(inline="always")
def _ranks_above(a, b):
    """Whether value a takes a higher rank than b (NaN above numbers)."""
    return a > b or (a != a and b == b)


@njit(inline="always")
def _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr,
                has_pad, pad_value, top, top_pos):
    """Top-k of one window by insertion in scan order (stable for ties).

    Fills top[:m] with the ranked values and top_pos[:m] with their scan
    index (kernel row * kernel_w + kernel column); returns m = min(k, n_o).
    """
    height = x.shape[1]
    width = x.shape[2]
    h0 = oh * sh - pt
    w0 = ow * sw - pl
    kept = 0
    for i in range(kh):
        h = h0 + i * dh
        h_real = h >= 0 and h < height
        h_pad = h >= -pt and h < height + pb
        for j in range(kw):
            col = w0 + j * dw
            if h_real and col >= 0 and col < width:
                v = x[n, h, col, c]
            elif has_pad and h_pad and col >= -pl and col < width + pr:
                v = pad_value
            else:
                continue
            pos = kept
            while pos > 0 and _ranks_above(v, top[pos - 1]):
                pos -= 1
            if pos < k:
                q = kept if kept < k else k - 1
                while q > pos:
                    top[q] = top[q - 1]
                    top_pos[q] = top_pos[q - 1]
                    q -= 1
                top[pos] = v
                top_pos[pos] = i * kw + j
                if kept < k:
                    kept += 1
    return kept


@njit(parallel=True, cache=True)
def _forward_kernel(x, table, per_channel, k, kh, kw, sh, sw, dh, dw,
                    pt, pb, pl, pr, has_pad, pad_value, y):
    batch = x.shape[0]
    channels = x.shape[3]
    out_h = y.shape[1]
    out_w = y.shape[2]
    for t in prange(batch * out_h):
        n = t // out_h
        oh = t - n * out_h
        top = np.empty(k, dtype=x.dtype)
        top_pos = np.empty(k, dtype=np.int64)
        for ow in range(out_w):
            for c in range(channels):
                m = _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw,
                                pt, pb, pl, pr, has_pad, pad_value, top,
                                top_pos)
                cw = c if per_channel else 0
                acc = table[cw, m, 0] * top[0]
                for r in range(1, m):
                    acc += table[cw, m, r] * top[r]
                y[n, oh, ow, c] = acc


@njit(parallel=True, cache=True)
def _backward_kernel(x, gy, table, per_channel, k, kh, kw, sh, sw, dh, dw,
                     pt, pb, pl, pr, has_pad, pad_value, rows_per_task,
                     gx, partials):
    height = x.shape[1]
    width = x.shape[2]
    channels = x.shape[3]
    out_h = gy.shape[1]
    out_w = gy.shape[2]
    n_tasks = (x.shape[0] * out_h) // rows_per_task
    for t in prange(n_tasks):
        top = np.empty(k, dtype=x.dtype)
        top_pos = np.empty(k, dtype=np.int64)
        for u in range(rows_per_task):
            row = t * rows_per_task + u
            n = row // out_h
            oh = row - n * out_h
            for ow in range(out_w):
                for c in range(channels):
                    m = _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh,
                                    dw, pt, pb, pl, pr, has_pad, pad_value,
                                    top, top_pos)
                    g = gy[n, oh, ow, c]
                    cw = c if per_channel else 0
                    for r in range(m):
                        s = top_pos[r]
                        i = s // kw
                        h = oh * sh - pt + i * dh
                        col = ow * sw - pl + (s - i * kw) * dw
                        if h >= 0 and h < height and col >= 0 and col < width:
                            gx[n, h, col, c] += g * table[cw, m, r]
                        partials[row, cw, m, r] += (np.float64(g)
                                                    * np.float64(top[r]))


def _nhwc_view(a: np.ndarray, layout: str) -> np.ndarray:
    return a if layout == "NHWC" else a.transpose(0, 2, 3, 1)


def _geometry_args(p: Problem):
    g = p.geometry
    pad = 0.0 if p.pad_value is None else p.pad_value
    return (p.per_channel, p.pool_range, g.kernel_h, g.kernel_w, g.stride_h,
            g.stride_w, g.dilation_h, g.dilation_w, g.pad_top, g.pad_bottom,
            g.pad_left, g.pad_right, p.pad_value is not None,
            p.dtype.type(pad))


def forward(x: np.ndarray, w: np.ndarray, p: Problem) -> np.ndarray:
    """y for checked arrays: x (float32/float64, p.layout), w (k,) or (C, k)."""
    table = softmax_table(w, p.weighting).astype(p.dtype)
    y = np.empty(p.out_shape, dtype=p.dtype)
    if y.size:
        _forward_kernel(_nhwc_view(x, p.layout), table, *_geometry_args(p),
                        _nhwc_view(y, p.layout))
    return y


def backward(grad_y: np.ndarray, x: np.ndarray, w: np.ndarray,
             p: Problem):
    """(grad_x, grad_w) for checked arrays; grad_y has the output's shape."""
    table64 = softmax_table(w, p.weighting)
    table = table64.astype(p.dtype)
    g = p.geometry
    grad_x = np.zeros(x.shape, dtype=p.dtype)
    rows = p.batch * g.out_h
    cw = p.channels if p.per_channel else 1
    partials = np.zeros((rows, cw, p.pool_range + 1, p.pool_range))
    if grad_x.size and rows:
        rows_per_task = g.out_h if g.overlapping_rows else 1
        gy = np.asarray(grad_y, dtype=p.dtype)
        _backward_kernel(_nhwc_view(x, p.layout), _nhwc_view(gy, p.layout),
                         table, *_geometry_args(p), rows_per_task,
                         _nhwc_view(grad_x, p.layout), partials)
    with np.errstate(invalid="ignore", over="ignore"):
        grad_w = weight_grad_from_partials(table64, partials.sum(axis=0),
                                           p.weighting)
    return grad_x, grad_w.reshape(w.shape).astype(p.weight_dtype)
