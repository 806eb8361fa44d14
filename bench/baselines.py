"""What sorted weighted pooling is compared with, besides the floor.

* ``torch.nn.functional.max_pool2d`` (forward, forward + backward): the
  library max pooling, on the channels_last twin for NHWC cases and on a
  contiguous NCHW tensor for NCHW cases.
* A naive PyTorch sorted pooling as it is usually written: ``F.unfold``,
  ``torch.sort`` over the window axis, softmax-weighted sum of the first k,
  autograd backward (unfold pads with zeros, i.e. ``pad_value=0``).
* A naive NumPy one: ``np.sort`` of a ``sliding_window_view``.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

try:  # torch is optional
    import torch
    import torch.nn.functional as F
except Exception:  # pragma: no cover - depends on the environment
    torch = None
    F = None


def torch_available() -> bool:
    return torch is not None


def _torch_input(x: np.ndarray, layout: str, requires_grad: bool):
    """x as an NCHW-indexed tensor; channels_last memory for NHWC data."""
    t = torch.from_numpy(x)
    if layout == "NHWC":
        t = t.permute(0, 3, 1, 2)  # channels_last strides, no copy
    return t.detach().requires_grad_(requires_grad)


def torch_maxpool(x: np.ndarray, layout: str, kernel: int, stride: int,
                  padding: int, backward: bool) -> Callable[[], object]:
    t = _torch_input(x, layout, backward)
    if not backward:
        def run():
            with torch.no_grad():
                return F.max_pool2d(t, kernel, stride, padding)
        return run
    out = F.max_pool2d(t.detach(), kernel, stride, padding)
    g = torch.ones_like(out)

    def run():
        t.grad = None
        y = F.max_pool2d(t, kernel, stride, padding)
        y.backward(g)
        return t.grad
    return run


def _torch_sorted(t, w, kernel: int, stride: int, padding: int):
    n, c, h, wd = t.shape
    k = w.shape[-1]
    cols = F.unfold(t, kernel, padding=padding, stride=stride)
    cols = cols.view(n, c, kernel * kernel, -1)
    ranked, _ = torch.sort(cols, dim=2, descending=True)
    p = torch.softmax(w, dim=-1).view(1, 1, k, 1)
    y = (ranked[:, :, :k] * p).sum(dim=2)
    out_h = (h + 2 * padding - kernel) // stride + 1
    return y.view(n, c, out_h, -1)


def torch_naive_sorted(x: np.ndarray, w: np.ndarray, layout: str,
                       kernel: int, stride: int, padding: int,
                       backward: bool) -> Callable[[], object]:
    t = _torch_input(x, layout, backward)
    tw = torch.from_numpy(np.asarray(w, dtype=x.dtype)).requires_grad_(
        backward)
    if not backward:
        def run():
            with torch.no_grad():
                return _torch_sorted(t, tw, kernel, stride, padding)
        return run

    def run():
        t.grad = None
        tw.grad = None
        y = _torch_sorted(t, tw, kernel, stride, padding)
        y.backward(torch.ones_like(y))
        return t.grad
    return run


def numpy_naive_sorted(x: np.ndarray, w: np.ndarray, layout: str,
                       kernel: int, stride: int, padding: int
                       ) -> Optional[Callable[[], object]]:
    k = w.shape[-1]
    e = np.exp(w - w.max())
    p = (e / e.sum()).astype(x.dtype)
    spatial = (1, 2) if layout == "NHWC" else (2, 3)

    def run():
        xp = x
        if padding:
            pads = [(0, 0)] * 4
            for a in spatial:
                pads[a] = (padding, padding)
            xp = np.pad(x, pads, constant_values=0)
        win = np.lib.stride_tricks.sliding_window_view(
            xp, (kernel, kernel), axis=spatial)
        sl = [slice(None)] * 4
        for a in spatial:
            sl[a] = slice(None, None, stride)
        win = win[tuple(sl)]
        flat = win.reshape(win.shape[:4] + (kernel * kernel,))
        ranked = -np.sort(-flat, axis=-1)[..., :k]
        return ranked @ p
    return run
