"""Independent implementations written with plain Python loops over windows.

They are slow and obvious on purpose: they check the reference itself on
small inputs (the reference is vectorised and could hide an indexing bug),
and give the max/average pooling the identity tests compare with.
"""

from __future__ import annotations

import math

import numpy as np

from sortpool_ref._checks import make_geometry


def _windows(h, w, kwargs):
    """Yield (oh, ow, [(kind, row, col) in scan order]) for every window.

    kind is 'real', 'pad' (explicit padding) or 'outside' (ceil overhang).
    """
    g = make_geometry(h, w, kwargs.get("kernel_size", 2),
                      kwargs.get("stride"), kwargs.get("padding", 0),
                      kwargs.get("dilation", 1), kwargs.get("ceil_mode", False))
    for oh in range(g.out_h):
        for ow in range(g.out_w):
            taps = []
            for i in range(g.kernel_h):
                r = oh * g.stride_h - g.pad_top + i * g.dilation_h
                for j in range(g.kernel_w):
                    c = ow * g.stride_w - g.pad_left + j * g.dilation_w
                    if 0 <= r < h and 0 <= c < w:
                        kind = "real"
                    elif (-g.pad_top <= r < h + g.pad_bottom
                          and -g.pad_left <= c < w + g.pad_right):
                        kind = "pad"
                    else:
                        kind = "outside"
                    taps.append((kind, r, c))
            yield oh, ow, taps
    return g


def _to_nchw(x, layout):
    x = np.asarray(x, dtype=np.float64)
    return x if layout == "NCHW" else x.transpose(0, 3, 1, 2)


def _from_nchw(y, layout):
    return y if layout == "NCHW" else y.transpose(0, 2, 3, 1)


def _window_values(plane, taps, pad_value):
    values = []
    for s, (kind, r, c) in enumerate(taps):
        if kind == "real":
            values.append((plane[r, c], s, (r, c)))
        elif kind == "pad" and pad_value is not None:
            values.append((pad_value, s, None))
    return values


def _rank_key(item):
    v, s, _ = item
    return (0, 0.0, s) if math.isnan(v) else (1, -v, s)


def naive_sortpool2d(x, w, **kwargs):
    """The contract, one window at a time, in float64."""
    layout = kwargs.get("layout", "NHWC")
    weighting = kwargs.get("weighting", "softmax")
    pad_value = kwargs.get("pad_value")
    x = _to_nchw(x, layout)
    n, ch, h, wd = x.shape
    w = np.asarray(w, dtype=np.float64)
    k = w.shape[-1]
    windows = list(_windows(h, wd, kwargs))
    out_h = max(o[0] for o in windows) + 1
    out_w = max(o[1] for o in windows) + 1
    y = np.zeros((n, ch, out_h, out_w))
    for b in range(n):
        for c in range(ch):
            logits = w[c] if w.ndim == 2 else w
            for oh, ow, taps in windows:
                ranked = sorted(_window_values(x[b, c], taps, pad_value),
                                key=_rank_key)
                m = min(k, len(ranked))
                if weighting == "raw":
                    p = list(logits[:m])
                else:
                    e = [math.exp(v - max(logits[:m])) for v in logits[:m]]
                    p = [v / sum(e) for v in e]
                total = 0.0
                for r in range(m):
                    total += p[r] * ranked[r][0]
                y[b, c, oh, ow] = total
    return _from_nchw(y, layout)


def naive_max_pool2d(x, **kwargs):
    """Max pooling with PyTorch's index rule (first maximum in scan order,
    a NaN wins): returns (y, grad_x for grad_y = 1)."""
    layout = kwargs.get("layout", "NHWC")
    pad_value = kwargs.get("pad_value")
    x = _to_nchw(x, layout)
    n, ch, h, wd = x.shape
    windows = list(_windows(h, wd, kwargs))
    out_h = max(o[0] for o in windows) + 1
    out_w = max(o[1] for o in windows) + 1
    y = np.zeros((n, ch, out_h, out_w))
    gx = np.zeros_like(x)
    for b in range(n):
        for c in range(ch):
            for oh, ow, taps in windows:
                best = None
                for v, s, where in _window_values(x[b, c], taps, pad_value):
                    if best is None or (math.isnan(v) and not math.isnan(
                            best[0])) or v > best[0]:
                        best = (v, where)
                y[b, c, oh, ow] = best[0]
                if best[1] is not None:
                    gx[b, c][best[1]] += 1.0
    return _from_nchw(y, layout), _from_nchw(gx, layout)


def naive_avg_pool2d(x, **kwargs):
    """Average over the window's positions: real ones only, or real and
    padded (holding pad_value) when pad_value is a number."""
    layout = kwargs.get("layout", "NHWC")
    pad_value = kwargs.get("pad_value")
    x = _to_nchw(x, layout)
    n, ch, h, wd = x.shape
    windows = list(_windows(h, wd, kwargs))
    out_h = max(o[0] for o in windows) + 1
    out_w = max(o[1] for o in windows) + 1
    y = np.zeros((n, ch, out_h, out_w))
    for b in range(n):
        for c in range(ch):
            for oh, ow, taps in windows:
                vals = [v for v, _, _ in _window_values(x[b, c], taps,
                                                        pad_value)]
                y[b, c, oh, ow] = sum(vals) / len(vals)
    return _from_nchw(y, layout)
