"""The Numba CPU engine.

Entry points ``forward(x, w, problem)`` and ``backward(grad_y, x, w, problem)``
receive arrays already checked and normalised by :mod:`sortpool_ref._checks`.
They compute in the dtype of ``x``.

Pooling is memory-bound, so the kernels are organised around memory order:
the innermost loop always runs along the contiguous axis of the tensor (the
channels in NHWC, the output columns in NCHW) so that LLVM vectorises it,
and each window's values are ranked with branch-free compare-exchanges on
whole vectors of channels/columns.

Kernels and where they run (docs/performance.md has the measurements):

* ``2x2`` register path, NHWC (forward and backward) and NCHW (forward):
  windows of a 2x2 kernel (any stride
  and dilation) that lie entirely inside the input. The four values of a
  window are sorted by a 5-comparator network; the backward ranks each
  position by its 6 pairwise comparisons (stable by construction).
* channel tile path, NHWC: every other window, any geometry, padding and
  ``pad_value``. Which positions of a window are real, padded or absent is
  the same for every channel, so the window's top-k is built by insertion
  into a small (pool_range, C) scratch tile with whole-channel-vector
  compare-exchanges.
* scalar path: the per-window, per-channel insertion used for the border
  windows of the NCHW 2x2 forward.
* NCHW geometries other than 2x2, and every backward of NCHW data, run
  the NHWC kernels on a channels-last copy (the backward so that grad_w is
  summed in one order, bit-identical whatever the layout).

Ranking predicate: ``a`` ranks strictly above ``b`` when ``a > b`` or ``a`` is
NaN and ``b`` is not. A compare-exchange of an earlier position ``a`` with a
later one ``b`` swaps only when ``b`` ranks strictly above ``a``, i.e. when
``(a == a) & ~(a >= b)``: ties (NaN with NaN, -0.0 with +0.0) keep scan
order. No ``fastmath``: these comparisons must be IEEE comparisons.

Determinism: every output and input-gradient element is written by one task
in a fixed order. The backward splits the output rows into a fixed number of
chunks that depends only on the problem's shape; when windows of neighbouring
rows overlap, even chunks run first and odd chunks second, so no two tasks
running at the same time touch the same input row. Weight-gradient partial
sums are float64, one slot per chunk (and channel), reduced in a fixed order
afterwards. Results are therefore bit-identical whatever the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import Problem, softmax_table, weight_grad_from_partials


# --------------------------------------------------------------------------
# Ranking primitives
# --------------------------------------------------------------------------

@njit(inline="always")
def _ranks_above(a, b):
    """Whether value a takes a strictly higher rank than b (NaN on top)."""
    return a > b or (a != a and b == b)


@njit(inline="always")
def _later_wins(a, b):
    """For a earlier than b in scan order: whether b ranks above a.

    Branch-free form of ``_ranks_above(b, a)``: false when a is NaN, else
    true unless a >= b (which is false when b is NaN).
    """
    return (a == a) & ~(a >= b)


@njit(inline="always")
def _sort4(a0, a1, a2, a3):
    """The 4 values in decreasing rank order (values only)."""
    s = _later_wins(a0, a1)
    a0, a1 = (a1 if s else a0), (a0 if s else a1)
    s = _later_wins(a2, a3)
    a2, a3 = (a3 if s else a2), (a2 if s else a3)
    s = _later_wins(a0, a2)
    a0, a2 = (a2 if s else a0), (a0 if s else a2)
    s = _later_wins(a1, a3)
    a1, a3 = (a3 if s else a1), (a1 if s else a3)
    s = _later_wins(a1, a2)
    a1, a2 = (a2 if s else a1), (a1 if s else a2)
    return a0, a1, a2, a3


@njit(inline="always")
def _weighted4(v0, v1, v2, v3, p0, p1, p2, p3, k):
    """sum_{r < k} p_r v_r for the ranked values (k a literal after
    inlining, so the unused terms vanish)."""
    acc = p0 * v0
    if k >= 2:
        acc += p1 * v1
    if k >= 3:
        acc += p2 * v2
    if k >= 4:
        acc += p3 * v3
    return acc


@njit(inline="always")
def _rank_weight(rank, p0, p1, p2, p3, k, zero):
    """p_rank if rank < k else 0, as selects."""
    w = zero
    w = p0 if rank == 0 else w
    if k >= 2:
        w = p1 if rank == 1 else w
    if k >= 3:
        w = p2 if rank == 2 else w
    if k >= 4:
        w = p3 if rank == 3 else w
    return w


@njit(inline="always")
def _ranks4(a0, a1, a2, a3, one, zero):
    """Rank (0 = highest) of each of 4 positions in scan order, stable, as
    floats of the input's dtype: integer ranks next to float data keep LLVM
    from vectorising the loop (checked with inspect_asm), float ranks do
    not."""
    # bST: position S (earlier) ranks above position T (later).
    b01 = one if (a0 != a0) | (a0 >= a1) else zero
    b02 = one if (a0 != a0) | (a0 >= a2) else zero
    b03 = one if (a0 != a0) | (a0 >= a3) else zero
    b12 = one if (a1 != a1) | (a1 >= a2) else zero
    b13 = one if (a1 != a1) | (a1 >= a3) else zero
    b23 = one if (a2 != a2) | (a2 >= a3) else zero
    r0 = 3 - b01 - b02 - b03
    r1 = b01 + 2 - b12 - b13
    r2 = b02 + b12 + 1 - b23
    r3 = b03 + b13 + b23
    return r0, r1, r2, r3


# --------------------------------------------------------------------------
# 2x2 register path, NHWC: one window, all channels
# --------------------------------------------------------------------------

@njit(inline="always")
def _fwd_2x2_nhwc(x0, x1, x2, x3, tb, y, k):
    for c in range(y.shape[0]):
        v0, v1, v2, v3 = _sort4(x0[c], x1[c], x2[c], x3[c])
        y[c] = _weighted4(v0, v1, v2, v3, tb[0, c], tb[min(1, k - 1), c],
                          tb[min(2, k - 1), c], tb[min(3, k - 1), c], k)


@njit(inline="always")
def _bwd_2x2_nhwc(x0, x1, x2, x3, g, tb, gx0, gx1, gx2, gx3, acc, scr,
                  overwrite, k):
    """One window, all channels. The ranking loop writes only the scratch
    tile ``scr`` (rows 0-3: g * weight of each position, rows 4-7: the
    ranked values); short copy loops then add them into grad_x and the
    partial sums. With every output of the ranking loop in one array, LLVM
    needs few runtime alias checks and vectorises it."""
    zero = x0.dtype.type(0.0)
    one = x0.dtype.type(1.0)
    channels = g.shape[0]
    for c in range(channels):
        a0 = x0[c]
        a1 = x1[c]
        a2 = x2[c]
        a3 = x3[c]
        gc = g[c]
        p0 = tb[0, c]
        p1 = tb[min(1, k - 1), c]
        p2 = tb[min(2, k - 1), c]
        p3 = tb[min(3, k - 1), c]
        r0, r1, r2, r3 = _ranks4(a0, a1, a2, a3, one, zero)
        scr[0, c] = gc * _rank_weight(r0, p0, p1, p2, p3, k, zero)
        scr[1, c] = gc * _rank_weight(r1, p0, p1, p2, p3, k, zero)
        scr[2, c] = gc * _rank_weight(r2, p0, p1, p2, p3, k, zero)
        scr[3, c] = gc * _rank_weight(r3, p0, p1, p2, p3, k, zero)
        v0, v1, v2, v3 = _sort4(a0, a1, a2, a3)
        scr[4, c] = v0
        scr[5, c] = v1
        scr[6, c] = v2
        scr[7, c] = v3
    if overwrite:
        # Windows do not overlap: each position is written once, and a
        # plain store spares reading the freshly zeroed pages.
        for c in range(channels):
            gx0[c] = scr[0, c]
        for c in range(channels):
            gx1[c] = scr[1, c]
        for c in range(channels):
            gx2[c] = scr[2, c]
        for c in range(channels):
            gx3[c] = scr[3, c]
    else:
        for c in range(channels):
            gx0[c] += scr[0, c]
        for c in range(channels):
            gx1[c] += scr[1, c]
        for c in range(channels):
            gx2[c] += scr[2, c]
        for c in range(channels):
            gx3[c] += scr[3, c]
    for r in range(k):
        a = acc[r]
        v = scr[4 + r]
        for c in range(channels):
            a[c] += np.float64(g[c]) * np.float64(v[c])


# --------------------------------------------------------------------------
# Channel tile path, NHWC: one window of any geometry, all channels
# --------------------------------------------------------------------------

@njit(inline="always")
def _window_positions(oh, ow, height, width, kh, kw, sh, sw, dh, dw, pt, pb,
                      pl, pr, has_pad, pos_h, pos_w, pos_s):
    """Positions of window (oh, ow) in scan order: fills pos_h/pos_w (row
    and column, -1 row for a padded position holding pad_value) and pos_s
    (scan index); returns their number n_o."""
    h0 = oh * sh - pt
    w0 = ow * sw - pl
    n_o = 0
    for i in range(kh):
        h = h0 + i * dh
        h_real = h >= 0 and h < height
        h_pad = h >= -pt and h < height + pb
        for j in range(kw):
            col = w0 + j * dw
            if h_real and col >= 0 and col < width:
                pos_h[n_o] = h
                pos_w[n_o] = col
            elif has_pad and h_pad and col >= -pl and col < width + pr:
                pos_h[n_o] = -1
                pos_w[n_o] = -1
            else:
                continue
            pos_s[n_o] = i * kw + j
            n_o += 1
    return n_o


@njit(inline="always")
def _tile_top(x, n, n_o, k, pos_h, pos_w, pad_value, top, top_s, carry,
              carry_s, with_pos):
    """Top-k of one window for all channels by stable insertion into the
    (k, C) tile ``top`` (and the scan indices into ``top_s`` when
    ``with_pos``); returns m = min(k, n_o)."""
    channels = top.shape[1]
    kept = 0
    for q in range(n_o):
        h = pos_h[q]
        if h >= 0:
            src = x[n, h, pos_w[q]]
            for c in range(channels):
                carry[c] = src[c]
        else:
            for c in range(channels):
                carry[c] = pad_value
        if with_pos:
            # Scan indices as floats of the data's dtype (exact below
            # 2**24): same-width lanes keep the loops vectorised.
            qf = top.dtype.type(q)
            for c in range(channels):
                carry_s[c] = qf
        for r in range(kept):
            t = top[r]
            if with_pos:
                ts = top_s[r]
                for c in range(channels):
                    a = t[c]
                    b = carry[c]
                    sa = ts[c]
                    sb = carry_s[c]
                    # Once displaced, the carried entry ranks above every
                    # entry below it; when it is also earlier in scan
                    # order, a tie must not stop it.
                    s = ((a == a) & ~(a >= b)) | (sb < sa)
                    t[c] = b if s else a
                    carry[c] = a if s else b
                    ts[c] = sb if s else sa
                    carry_s[c] = sa if s else sb
            else:
                for c in range(channels):
                    a = t[c]
                    b = carry[c]
                    s = (a == a) & ~(a >= b)
                    t[c] = b if s else a
                    carry[c] = a if s else b
        if kept < k:
            t = top[kept]
            for c in range(channels):
                t[c] = carry[c]
            if with_pos:
                ts = top_s[kept]
                for c in range(channels):
                    ts[c] = carry_s[c]
            kept += 1
    return kept


@njit
def _fwd_tile_nhwc(x, n, oh, ow, tblT, k, kh, kw, sh, sw, dh, dw, pt, pb,
                   pl, pr, has_pad, pad_value, pos_h, pos_w, pos_s, top,
                   top_s, carry, carry_s, yo):
    n_o = _window_positions(oh, ow, x.shape[1], x.shape[2], kh, kw, sh, sw,
                            dh, dw, pt, pb, pl, pr, has_pad, pos_h, pos_w,
                            pos_s)
    m = _tile_top(x, n, n_o, k, pos_h, pos_w, pad_value, top, top_s, carry,
                  carry_s, False)
    channels = yo.shape[0]
    tb = tblT[m]
    for c in range(channels):
        yo[c] = tb[0, c] * top[0, c]
    for r in range(1, m):
        t = top[r]
        p = tb[r]
        for c in range(channels):
            yo[c] += p[c] * t[c]


@njit
def _bwd_tile_nhwc(x, n, oh, ow, go, tblT, k, kh, kw, sh, sw, dh, dw, pt,
                   pb, pl, pr, has_pad, pad_value, pos_h, pos_w, pos_s, top,
                   top_s, carry, carry_s, wsel, gx, acc):
    n_o = _window_positions(oh, ow, x.shape[1], x.shape[2], kh, kw, sh, sw,
                            dh, dw, pt, pb, pl, pr, has_pad, pos_h, pos_w,
                            pos_s)
    m = _tile_top(x, n, n_o, k, pos_h, pos_w, pad_value, top, top_s, carry,
                  carry_s, True)
    channels = go.shape[0]
    tb = tblT[m]
    zero = x.dtype.type(0.0)
    for q in range(n_o):
        h = pos_h[q]
        if h < 0:
            continue
        for c in range(channels):
            wsel[c] = zero
        qf = x.dtype.type(q)
        for r in range(m):
            ts = top_s[r]
            p = tb[r]
            for c in range(channels):
                wsel[c] = p[c] if ts[c] == qf else wsel[c]
        dst = gx[n, h, pos_w[q]]
        for c in range(channels):
            dst[c] += go[c] * wsel[c]
    am = acc[m]
    for r in range(m):
        t = top[r]
        a = am[r]
        for c in range(channels):
            a[c] += np.float64(go[c]) * np.float64(t[c])


# --------------------------------------------------------------------------
# NHWC kernels
# --------------------------------------------------------------------------

@njit(inline="always")
def _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, pos_h, pos_w, pos_s, top,
                  top_s, carry, carry_s, y, kk):
    """One output row; kk is the literal pool_range for the 2x2 path."""
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    out_w = y.shape[2]
    interior_row = kind == 1 and oh >= oh_lo and oh < oh_hi
    h0 = oh * sh - pt
    for ow in range(out_w):
        if interior_row and ow >= ow_lo and ow < ow_hi:
            c0 = ow * sw - pl
            _fwd_2x2_nhwc(x[n, h0, c0], x[n, h0, c0 + dw],
                          x[n, h0 + dh, c0], x[n, h0 + dh, c0 + dw],
                          tblT[kk], y[n, oh, ow], kk)
        else:
            _fwd_tile_nhwc(x, n, oh, ow, tblT, k, kh, kw, sh, sw, dh, dw,
                           pt, pb, pl, pr, has_pad, pad_value, pos_h, pos_w,
                           pos_s, top, top_s, carry, carry_s, y[n, oh, ow])


@njit(parallel=True, cache=True)
def _forward_nhwc(x, tblT, k, kind, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr,
                  has_pad, pad_value, oh_lo, oh_hi, ow_lo, ow_hi, y):
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
    out_h = y.shape[1]
    channels = x.shape[3]
    window = kh * kw
    for t in prange(x.shape[0] * out_h):
        n = t // out_h
        oh = t - n * out_h
        pos_h = np.empty(window, dtype=np.int64)
        pos_w = np.empty(window, dtype=np.int64)
        pos_s = np.empty(window, dtype=np.int64)
        top = np.empty((k, channels), dtype=x.dtype)
        top_s = np.empty((k, channels), dtype=x.dtype)
        carry = np.empty(channels, dtype=x.dtype)
        carry_s = np.empty(channels, dtype=x.dtype)
        if kind == 1 and k == 1:
            _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, pos_h, pos_w,
                          pos_s, top, top_s, carry, carry_s, y, 1)
        elif kind == 1 and k == 2:
            _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, pos_h, pos_w,
                          pos_s, top, top_s, carry, carry_s, y, 2)
        elif kind == 1 and k == 3:
            _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, pos_h, pos_w,
                          pos_s, top, top_s, carry, carry_s, y, 3)
        elif kind == 1:
            _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, pos_h, pos_w,
                          pos_s, top, top_s, carry, carry_s, y, 4)
        else:
            _fwd_row_nhwc(x, n, oh, tblT, k, 0, geo, bnd, pos_h, pos_w, pos_s,
                          top, top_s, carry, carry_s, y, 1)


@njit(inline="always")
def _bwd_rows_nhwc(x, gy, tblT, k, kind, geo, bnd, row_lo, row_hi, gx, acc,
                   kk):
    """Output rows [row_lo, row_hi) (global index n * out_h + oh)."""
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    out_h = gy.shape[1]
    out_w = gy.shape[2]
    channels = x.shape[3]
    window = kh * kw
    pos_h = np.empty(window, dtype=np.int64)
    pos_w = np.empty(window, dtype=np.int64)
    pos_s = np.empty(window, dtype=np.int64)
    top = np.empty((k, channels), dtype=x.dtype)
    top_s = np.empty((k, channels), dtype=x.dtype)
    carry = np.empty(channels, dtype=x.dtype)
    carry_s = np.empty(channels, dtype=x.dtype)
    wsel = np.empty(channels, dtype=x.dtype)
    scr = np.empty((8, channels), dtype=x.dtype)
    for row in range(row_lo, row_hi):
        n = row // out_h
        oh = row - n * out_h
        interior_row = kind >= 1 and oh >= oh_lo and oh < oh_hi
        h0 = oh * sh - pt
        for ow in range(out_w):
            if interior_row and ow >= ow_lo and ow < ow_hi:
                c0 = ow * sw - pl
                _bwd_2x2_nhwc(x[n, h0, c0], x[n, h0, c0 + dw],
                              x[n, h0 + dh, c0], x[n, h0 + dh, c0 + dw],
                              gy[n, oh, ow], tblT[kk],
                              gx[n, h0, c0], gx[n, h0, c0 + dw],
                              gx[n, h0 + dh, c0], gx[n, h0 + dh, c0 + dw],
                              acc[kk], scr, kind == 2, kk)
            else:
                _bwd_tile_nhwc(x, n, oh, ow, gy[n, oh, ow], tblT, k, kh, kw,
                               sh, sw, dh, dw, pt, pb, pl, pr, has_pad,
                               pad_value, pos_h, pos_w, pos_s, top, top_s,
                               carry, carry_s, wsel, gx, acc)


@njit(parallel=True, cache=True)
def _backward_nhwc(x, gy, tblT, k, kind, kh, kw, sh, sw, dh, dw, pt, pb, pl,
                   pr, has_pad, pad_value, oh_lo, oh_hi, ow_lo, ow_hi,
                   rows_per_chunk, parity_passes, gx, acc):
    """acc[chunk, m, r, c]: float64 partial sums of g * a(r), per chunk."""
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
    n_rows = x.shape[0] * gy.shape[1]
    n_chunks = acc.shape[0]
    step = parity_passes
    for phase in range(parity_passes):
        n_here = (n_chunks - phase + step - 1) // step
        for u in prange(n_here):
            chunk = phase + u * step
            row_lo = chunk * rows_per_chunk
            row_hi = min(row_lo + rows_per_chunk, n_rows)
            a = acc[chunk]
            if kind >= 1 and k == 1:
                _bwd_rows_nhwc(x, gy, tblT, k, kind, geo, bnd, row_lo, row_hi,
                               gx, a, 1)
            elif kind >= 1 and k == 2:
                _bwd_rows_nhwc(x, gy, tblT, k, kind, geo, bnd, row_lo, row_hi,
                               gx, a, 2)
            elif kind >= 1 and k == 3:
                _bwd_rows_nhwc(x, gy, tblT, k, kind, geo, bnd, row_lo, row_hi,
                               gx, a, 3)
            elif kind >= 1:
                _bwd_rows_nhwc(x, gy, tblT, k, kind, geo, bnd, row_lo, row_hi,
                               gx, a, 4)
            else:
                _bwd_rows_nhwc(x, gy, tblT, k, 0, geo, bnd, row_lo, row_hi, gx,
                               a, 1)


# --------------------------------------------------------------------------
# NCHW 2x2 kernels: one (sample, channel) plane per task, innermost loop
# along the output columns
# --------------------------------------------------------------------------

@njit(inline="always")
def _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr,
                has_pad, pad_value, top, top_pos):
    """Top-k of one window of one channel of an NCHW array by insertion in
    scan order (stable); fills top[:m], top_pos[:m] (scan index), returns m.
    """
    height = x.shape[2]
    width = x.shape[3]
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
                v = x[n, c, h, col]
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


@njit(inline="always")
def _gather_2x2_nchw(x0, x1, lo, hi, sw, pl, dw, scr):
    """Deinterleave the 4 positions of windows lo..hi-1 of one output row
    into scr[0:4] (contiguous along the output columns)."""
    for ow in range(lo, hi):
        col = ow * sw - pl
        scr[0, ow] = x0[col]
        scr[1, ow] = x0[col + dw]
        scr[2, ow] = x1[col]
        scr[3, ow] = x1[col + dw]


@njit(inline="always")
def _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, top, top_pos, scr, y, kk):
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    out_h = y.shape[2]
    out_w = y.shape[3]
    p0 = tb[kk, 0]
    p1 = tb[kk, 1] if kk >= 2 else p0
    p2 = tb[kk, 2] if kk >= 3 else p0
    p3 = tb[kk, 3] if kk >= 4 else p0
    for oh in range(out_h):
        yr = y[n, c, oh]
        lo = ow_lo
        hi = ow_hi
        if oh < oh_lo or oh >= oh_hi:
            lo = out_w
            hi = out_w
        else:
            h0 = oh * sh - pt
            # Literal strides for the common case: LLVM vectorises the
            # strided loads only when it knows the stride.
            if sw == 2 and dw == 1:
                _gather_2x2_nchw(x[n, c, h0], x[n, c, h0 + dh], lo, hi, 2,
                                 pl, 1, scr)
            else:
                _gather_2x2_nchw(x[n, c, h0], x[n, c, h0 + dh], lo, hi, sw,
                                 pl, dw, scr)
            s0 = scr[0]
            s1 = scr[1]
            s2 = scr[2]
            s3 = scr[3]
            for ow in range(lo, hi):
                v0, v1, v2, v3 = _sort4(s0[ow], s1[ow], s2[ow], s3[ow])
                yr[ow] = _weighted4(v0, v1, v2, v3, p0, p1, p2, p3, kk)
        for ow in range(out_w):
            if ow >= lo and ow < hi:
                continue
            m = _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw, pt,
                            pb, pl, pr, has_pad, pad_value, top, top_pos)
            acc = tb[m, 0] * top[0]
            for r in range(1, m):
                acc += tb[m, r] * top[r]
            yr[ow] = acc


@njit(parallel=True, cache=True)
def _forward_nchw_2x2(x, table, per_channel, k, kh, kw, sh, sw, dh, dw, pt,
                      pb, pl, pr, has_pad, pad_value, oh_lo, oh_hi, ow_lo,
                      ow_hi, y):
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
    channels = x.shape[1]
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        tb = table[c if per_channel else 0]
        top = np.empty(k, dtype=x.dtype)
        top_pos = np.empty(k, dtype=np.int64)
        scr = np.empty((4, y.shape[3]), dtype=x.dtype)
        if k == 1:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, top, top_pos, scr, y, 1)
        elif k == 2:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, top, top_pos, scr, y, 2)
        elif k == 3:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, top, top_pos, scr, y, 3)
        else:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, top, top_pos, scr, y, 4)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------

def _interior(size: int, lead: int, kernel: int, stride: int,
              dilation: int, out: int):
    """[lo, hi) of the windows along one axis lying inside the input."""
    span = (kernel - 1) * dilation
    lo = -(-lead // stride)
    hi = (size - 1 - span + lead) // stride + 1
    lo = min(max(lo, 0), out)
    hi = min(max(hi, lo), out)
    return lo, hi


def _plan(p: Problem):
    g = p.geometry
    oh_lo, oh_hi = _interior(g.height, g.pad_top, g.kernel_h, g.stride_h,
                             g.dilation_h, g.out_h)
    ow_lo, ow_hi = _interior(g.width, g.pad_left, g.kernel_w, g.stride_w,
                             g.dilation_w, g.out_w)
    kind = 1 if (g.kernel_h, g.kernel_w) == (2, 2) else 0
    return kind, oh_lo, oh_hi, ow_lo, ow_hi


def _geometry_args(p: Problem):
    g = p.geometry
    pad = 0.0 if p.pad_value is None else p.pad_value
    return (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dilation_h,
            g.dilation_w, g.pad_top, g.pad_bottom, g.pad_left, g.pad_right,
            p.pad_value is not None, p.dtype.type(pad))


def _memory_layout(a: np.ndarray, layout: str) -> str:
    """'NHWC' or 'NCHW': the order in which ``a`` (given in ``layout``) is
    C-contiguous, or '' when neither."""
    nhwc = a if layout == "NHWC" else a.transpose(0, 2, 3, 1)
    if nhwc.flags.c_contiguous:
        return "NHWC"
    if nhwc.transpose(0, 3, 1, 2).flags.c_contiguous:
        return "NCHW"
    return ""


def _to(a: np.ndarray, layout: str, memory: str, dtype) -> np.ndarray:
    """``a`` (in ``layout``) as a C-contiguous array in ``memory`` order."""
    if layout != memory:
        a = a.transpose(0, 2, 3, 1) if layout == "NCHW" else \
            a.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(a, dtype=dtype)


def _from(a: np.ndarray, memory: str, layout: str) -> np.ndarray:
    if layout == memory:
        return a
    return a.transpose(0, 2, 3, 1) if memory == "NCHW" else \
        a.transpose(0, 3, 1, 2)


def _result(a: np.ndarray, kernel_memory: str, x: np.ndarray,
            layout: str) -> np.ndarray:
    """A kernel's result (C-contiguous in ``kernel_memory`` order) in the
    declared layout, stored in the memory order of ``x``: a C-contiguous
    NCHW input gives a C-contiguous NCHW result even when the kernels ran
    on a channels-last copy, and a channels-last input keeps channels-last
    results (as PyTorch does)."""
    memory = _memory_layout(x, layout) or layout
    view = _from(a, kernel_memory, layout)
    if memory == kernel_memory:
        return view
    return _from(_to(view, layout, memory, a.dtype), memory, layout)


def _kernel_memory(x: np.ndarray, p: Problem) -> str:
    """Which kernels run: NCHW ones only for 2x2 on NCHW-ordered memory."""
    memory = _memory_layout(x, p.layout) or p.layout
    if memory == "NCHW" and (p.geometry.kernel_h,
                             p.geometry.kernel_w) != (2, 2):
        return "NHWC"
    return memory


def _nhwc_table(table: np.ndarray, channels: int) -> np.ndarray:
    """table (Cw, k+1, k) as (k+1, k, C): the channel axis contiguous."""
    t = np.transpose(table, (1, 2, 0))
    return np.ascontiguousarray(np.broadcast_to(
        t, t.shape[:2] + (channels,)))


def forward(x: np.ndarray, w: np.ndarray, p: Problem) -> np.ndarray:
    """y for checked arrays: x (float32/float64, p.layout), w (k,) or (C,
                                k)."""
    table = softmax_table(w, p.weighting).astype(p.dtype)
    kind, oh_lo, oh_hi, ow_lo, ow_hi = _plan(p)
    memory = _kernel_memory(x, p)
    xm = _to(x, p.layout, memory, p.dtype)
    g = p.geometry
    if memory == "NHWC":
        y = np.empty((p.batch, g.out_h, g.out_w, p.channels), p.dtype)
        if y.size:
            _forward_nhwc(xm, _nhwc_table(table, p.channels), p.pool_range,
                          kind, *_geometry_args(p), oh_lo, oh_hi, ow_lo,
                          ow_hi, y)
    else:
        y = np.empty((p.batch, p.channels, g.out_h, g.out_w), p.dtype)
        if y.size:
            _forward_nchw_2x2(xm, table, p.per_channel, p.pool_range,
                              *_geometry_args(p), oh_lo, oh_hi, ow_lo,
                              ow_hi, y)
    return _result(y, memory, x, p.layout)


_CHUNKS = 256  # weight-gradient slots; fixed, so results do not depend on
# the number of threads


def backward(grad_y: np.ndarray, x: np.ndarray, w: np.ndarray,
             p: Problem):
    """(grad_x, grad_w) for checked arrays; grad_y has the output's shape."""
    table64 = softmax_table(w, p.weighting)
    table = table64.astype(p.dtype)
    kind, oh_lo, oh_hi, ow_lo, ow_hi = _plan(p)
    # The backward always runs the NHWC kernels (on a channels-last copy of
    # NCHW data), so that grad_w is summed in the same order, and is
    # bit-identical, whatever the layout.
    memory = "NHWC"
    xm = _to(x, p.layout, memory, p.dtype)
    gym = _to(np.asarray(grad_y), p.layout, memory, p.dtype)
    g = p.geometry
    k = p.pool_range
    gx = np.zeros(xm.shape, dtype=p.dtype)
    overlapping = (g.overlapping_rows or g.stride_w
                   < (g.kernel_w - 1) * g.dilation_w + 1)
    if kind == 1 and not overlapping:
        kind = 2
    rows = p.batch * g.out_h
    rows_per_chunk = max(1, -(-rows // _CHUNKS))
    passes = 1
    if g.overlapping_rows:
        # Chunks two apart must not share input rows.
        need = -(-((g.kernel_h - 1) * g.dilation_h + 1) // g.stride_h)
        rows_per_chunk = max(rows_per_chunk, need)
        passes = 2
    n_chunks = -(-rows // rows_per_chunk) if rows else 0
    acc = np.zeros((n_chunks, k + 1, k, p.channels))
    if gx.size and rows:
        _backward_nhwc(xm, gym, _nhwc_table(table, p.channels), k, kind,
                       *_geometry_args(p), oh_lo, oh_hi, ow_lo, ow_hi,
                       rows_per_chunk, passes, gx, acc)
    with np.errstate(invalid="ignore", over="ignore"):
        per_channel = acc.sum(axis=0)            # (k+1, k, C)
        if not p.per_channel:
            per_channel = per_channel.sum(axis=2, keepdims=True)
    partials = np.transpose(per_channel, (2, 0, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        grad_w = weight_grad_from_partials(table64, partials, p.weighting)
    return (_result(gx, memory, x, p.layout),
            grad_w.reshape(w.shape).astype(p.weight_dtype))
