"""The memory-bandwidth floor: plain Numba max pooling.

Each kernel reads every input element once (overlapping windows re-read
neighbouring values from cache) and writes every output element once, with
the innermost loop along the contiguous axis, so it runs at the speed of
memory. No NaN rules, no sort, no weights: nothing that pooling could do
with less work. Sorted weighted pooling is judged by its ratio to this
kernel on the same geometry, layout and dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _floor_nhwc(x, kh, kw, sh, sw, pt, pl, y):
    height = x.shape[1]
    width = x.shape[2]
    channels = x.shape[3]
    out_h = y.shape[1]
    out_w = y.shape[2]
    for t in prange(x.shape[0] * out_h):
        n = t // out_h
        oh = t - n * out_h
        h0 = oh * sh - pt
        for ow in range(out_w):
            w0 = ow * sw - pl
            yo = y[n, oh, ow]
            inside = (h0 >= 0 and h0 + kh <= height and w0 >= 0
                      and w0 + kw <= width)
            if inside and kh == 2 and kw == 2:
                a = x[n, h0, w0]
                b = x[n, h0, w0 + 1]
                c_ = x[n, h0 + 1, w0]
                d = x[n, h0 + 1, w0 + 1]
                for c in range(channels):
                    yo[c] = max(max(a[c], b[c]), max(c_[c], d[c]))
            elif inside and kh == 3 and kw == 3:
                r0 = x[n, h0]
                r1 = x[n, h0 + 1]
                r2 = x[n, h0 + 2]
                for c in range(channels):
                    m0 = max(max(r0[w0, c], r0[w0 + 1, c]), r0[w0 + 2, c])
                    m1 = max(max(r1[w0, c], r1[w0 + 1, c]), r1[w0 + 2, c])
                    m2 = max(max(r2[w0, c], r2[w0 + 1, c]), r2[w0 + 2, c])
                    yo[c] = max(max(m0, m1), m2)
            else:
                for c in range(channels):
                    yo[c] = -np.inf
                for i in range(kh):
                    h = h0 + i
                    if h < 0 or h >= height:
                        continue
                    for j in range(kw):
                        col = w0 + j
                        if col < 0 or col >= width:
                            continue
                        src = x[n, h, col]
                        for c in range(channels):
                            yo[c] = max(yo[c], src[c])


@njit(inline="always")
def _row_max_2x2(a, b, yr, lo, hi, sw, pl):
    # Slices first, so that every index in the loop counts up from 0:
    # with an index that may be negative (ow * sw - pl for a run-time lo
    # and pl) Numba wraps it around per element, and the loop ran 3x
    # slower.
    base = lo * sw - pl
    a = a[base:]
    b = b[base:]
    yr = yr[lo:hi]
    for i in range(hi - lo):
        w0 = i * sw
        yr[i] = max(max(a[w0], a[w0 + 1]), max(b[w0], b[w0 + 1]))


@njit(inline="always")
def _row_max_3x3(a, b, d, yr, lo, hi, sw, pl):
    base = lo * sw - pl
    a = a[base:]
    b = b[base:]
    d = d[base:]
    yr = yr[lo:hi]
    for i in range(hi - lo):
        w0 = i * sw
        m0 = max(max(a[w0], a[w0 + 1]), a[w0 + 2])
        m1 = max(max(b[w0], b[w0 + 1]), b[w0 + 2])
        m2 = max(max(d[w0], d[w0 + 1]), d[w0 + 2])
        yr[i] = max(max(m0, m1), m2)


@njit(inline="always")
def _border_max(xp, h0, w0, kh, kw, height, width):
    acc = -np.inf
    for i in range(kh):
        h = h0 + i
        if h < 0 or h >= height:
            continue
        for j in range(kw):
            col = w0 + j
            if col >= 0 and col < width:
                acc = max(acc, xp[h, col])
    return acc


@njit(parallel=True, cache=True)
def _floor_nchw(x, kh, kw, sh, sw, pt, pl, y):
    height = x.shape[2]
    width = x.shape[3]
    channels = x.shape[1]
    out_h = y.shape[2]
    out_w = y.shape[3]
    # Interior columns: windows fully inside along W.
    lo = min(out_w, -(-pl // sw))
    hi = max(lo, min(out_w, (width - kw + pl) // sw + 1))
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        xp = x[n, c]
        yp = y[n, c]
        for oh in range(out_h):
            h0 = oh * sh - pt
            yr = yp[oh]
            first = out_w
            last = out_w
            if h0 >= 0 and h0 + kh <= height and kh == 2 and kw == 2:
                # A literal stride lets LLVM vectorise the strided loads.
                if sw == 2:
                    _row_max_2x2(xp[h0], xp[h0 + 1], yr, lo, hi, 2, pl)
                else:
                    _row_max_2x2(xp[h0], xp[h0 + 1], yr, lo, hi, sw, pl)
                first = lo
                last = hi
            elif h0 >= 0 and h0 + kh <= height and kh == 3 and kw == 3:
                if sw == 2:
                    _row_max_3x3(xp[h0], xp[h0 + 1], xp[h0 + 2], yr, lo, hi,
                                 2, pl)
                else:
                    _row_max_3x3(xp[h0], xp[h0 + 1], xp[h0 + 2], yr, lo, hi,
                                 sw, pl)
                first = lo
                last = hi
            # Border windows: only the columns outside [first, last) (a
            # loop over every column that skipped the interior ones cost
            # as much as the interior itself).
            for ow in range(first):
                yr[ow] = _border_max(xp, h0, ow * sw - pl, kh, kw, height,
                                     width)
            for ow in range(last, out_w):
                yr[ow] = _border_max(xp, h0, ow * sw - pl, kh, kw, height,
                                     width)


def floor_maxpool(x: np.ndarray, kernel: int, stride: int, padding: int,
                  layout: str) -> np.ndarray:
    """Max pooling of a C-contiguous x (layout 'NHWC' or 'NCHW')."""
    if layout == "NHWC":
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    out_h = (h + 2 * padding - kernel) // stride + 1
    out_w = (w + 2 * padding - kernel) // stride + 1
    if layout == "NHWC":
        y = np.empty((n, out_h, out_w, c), x.dtype)
        _floor_nhwc(x, kernel, kernel, stride, stride, padding, padding, y)
    else:
        y = np.empty((n, c, out_h, out_w), x.dtype)
        _floor_nchw(x, kernel, kernel, stride, stride, padding, padding, y)
    return y


@njit(parallel=True, cache=True)
def _grad_floor_nhwc(x, gy, sh, sw, gx):
    out_h = gy.shape[1]
    out_w = gy.shape[2]
    for t in prange(x.shape[0] * x.shape[1]):
        n = t // x.shape[1]
        h = t - n * x.shape[1]
        gr = gy[n, min(h // sh, out_h - 1)]
        for col in range(x.shape[2]):
            src = x[n, h, col]
            g = gr[min(col // sw, out_w - 1)]
            dst = gx[n, h, col]
            for c in range(x.shape[3]):
                dst[c] = src[c] * g[c]


@njit(parallel=True, cache=True)
def _grad_floor_nchw(x, gy, sh, sw, gx):
    out_h = gy.shape[2]
    out_w = gy.shape[3]
    for t in prange(x.shape[0] * x.shape[1]):
        n = t // x.shape[1]
        c = t - n * x.shape[1]
        for h in range(x.shape[2]):
            src = x[n, c, h]
            gr = gy[n, c, min(h // sh, out_h - 1)]
            dst = gx[n, c, h]
            first = 0
            if sw == 2:  # written out so that LLVM vectorises it
                first = 2 * min(out_w, x.shape[3] // 2)
                for ow in range(first // 2):
                    g = gr[ow]
                    dst[2 * ow] = src[2 * ow] * g
                    dst[2 * ow + 1] = src[2 * ow + 1] * g
            for col in range(first, x.shape[3]):
                dst[col] = src[col] * gr[min(col // sw, out_w - 1)]


def grad_floor(x: np.ndarray, gy: np.ndarray, stride: int, layout: str,
               out: np.ndarray = None) -> np.ndarray:
    """The least any backward does: read x and grad_y once and write every
    element of grad_x once (here x times the grad_y of the window it falls
    in), into ``out`` or a fresh array. With a fresh array the operating
    system also zeroes every new page, which a reused one spares."""
    gx = np.empty_like(x) if out is None else out
    (_grad_floor_nhwc if layout == "NHWC" else _grad_floor_nchw)(
        x, gy, stride, stride, gx)
    return gx
