"""Sorted weighted pooling for PyTorch, on the project's engines.

``import sortpool_ref.torch`` needs PyTorch (the ``torch`` extra);
``import sortpool_ref`` never imports this module.

CPU tensors run on the Numba engine through zero-copy NumPy views; CUDA
tensors run on the CUDA engine through DLPack (``cupy.from_dlpack``), which
needs CuPy for the CUDA version PyTorch was built with. The backward pass is
the engines' own (:func:`sortpool_ref.sortpool2d_backward`), wrapped in a
``torch.autograd.Function``; the sort is recomputed there rather than saved.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import numpy as np
import torch

from . import _api
from ._checks import check_layout, check_weighting
from ._engines import EngineUnavailableError, engine_problem

__all__ = ["SortPool2d", "sortpool2d"]

_DTYPES = (torch.float32, torch.float64)


def _check_tensors(x: Any, w: Any) -> None:
    """PyTorch-side checks; everything else is the shared validator's."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.device != w.device:
        raise ValueError(
            f"x and w must be on the same device, got x on {x.device} and "
            f"w on {w.device}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"x must be a CPU or CUDA tensor, got a tensor on {x.device}")
    for name, t in (("x", x), ("w", w)):
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"{name} must have dtype torch.float32 or torch.float64, got "
                f"{t.dtype}")


def _cuda_problem() -> Optional[str]:
    return engine_problem("cuda")


class _Bridge:
    """Moves tensors to the engines' arrays and back, without copies.

    CPU: ``Tensor.numpy()`` views. CUDA: ``cupy.from_dlpack`` on PyTorch's
    current stream of the tensor's device, so that the engine's kernels are
    ordered after the work that produced the inputs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = None
        self._device_ctx = None
        if self.cuda:
            reason = _cuda_problem()
            if reason is not None:
                raise EngineUnavailableError(
                    f"CUDA tensors run on the CUDA engine, which is not "
                    f"available: {reason}")

    def __enter__(self) -> "_Bridge":
        if self.cuda:
            import cupy
            index = self.device.index
            if index is None:
                index = torch.cuda.current_device()
            self._device_ctx = cupy.cuda.Device(index)
            self._device_ctx.__enter__()
            stream = torch.cuda.current_stream(index)
            self._stream = cupy.cuda.ExternalStream(stream.cuda_stream,
                                                    index)
            self._stream.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._stream.__exit__(*exc)
            self._device_ctx.__exit__(*exc)

    def to_array(self, t: torch.Tensor) -> Any:
        t = t.detach()
        if self.cuda:
            import cupy
            return cupy.from_dlpack(t)
        return t.numpy()

    def to_tensor(self, a: Any) -> torch.Tensor:
        if self.cuda:
            return torch.from_dlpack(a)
        return torch.from_numpy(np.asarray(a))


def _to_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def _from_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _engine_layout(x: torch.Tensor, layout: str) -> str:
    """The layout in which to hand ``x`` to the engine.

    An NCHW tensor stored channels-last is passed as its NHWC view (the
    engine's natural order, and contiguous), so the result comes back
    channels-last too, as PyTorch's own pooling does. Everything else is
    passed as it is; the engines accept any strides.
    """
    if (layout == "NCHW" and x.dim() == 4 and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()):
        return "NHWC"
    return layout


class _SortPool2dFunction(torch.autograd.Function):
    """y = sortpool2d(x, w); backward from the engine's backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor,
                options: Tuple[Tuple[str, Any], ...]) -> torch.Tensor:
        opts = dict(options)
        layout = opts.pop("layout")
        engine_layout = _engine_layout(x, layout)
        permute = engine_layout != layout
        xe = _to_nhwc(x) if permute else x
        with _Bridge(x.device) as bridge:
            y = bridge.to_tensor(_api.sortpool2d(
                bridge.to_array(xe), bridge.to_array(w),
                layout=engine_layout, **opts))
        ctx.save_for_backward(x, w)
        ctx.options = options
        return _from_nhwc(y) if permute else y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                            None]:
        # Autograd runs backward with grad mode on only for create_graph:
        # refuse, rather than hand back gradients that silently act as
        # constants in a second derivative.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "sortpool_ref.torch.sortpool2d has no second derivative: "
                "its backward pass cannot be differentiated "
                "(create_graph=True)")
        x, w = ctx.saved_tensors
        opts = dict(ctx.options)
        layout = opts.pop("layout")
        engine_layout = _engine_layout(x, layout)
        permute = engine_layout != layout
        xe = _to_nhwc(x) if permute else x
        ge = _to_nhwc(grad_y) if permute else grad_y
        with _Bridge(x.device) as bridge:
            gx, gw = _api.sortpool2d_backward(
                bridge.to_array(ge), bridge.to_array(xe), bridge.to_array(w),
                layout=engine_layout, **opts)
            grad_x = bridge.to_tensor(gx)
            grad_w = bridge.to_tensor(gw)
        if permute:
            grad_x = _from_nhwc(grad_x)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None, None)


def sortpool2d(x: torch.Tensor, w: torch.Tensor, kernel_size: Any = 2,
               stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, layout: str = "NCHW",
               weighting: str = "softmax", pad_value: Optional[float] = None,
               engine: str = "auto") -> torch.Tensor:
    """Sorted weighted pooling of a tensor, differentiable in ``x`` and ``w``.

    Parameters
    ----------
    x : torch.Tensor, shape (N, C, H, W) or (N, H, W, C)
        float32 or float64, on the CPU or a CUDA device; any strides.
    w : torch.Tensor, shape (pool_range,) or (C, pool_range)
        Rank weights (logits for ``weighting='softmax'``), on the device of
        ``x``; rank 1, the largest value, first.
    kernel_size, stride, padding, dilation, ceil_mode, weighting, \
pad_value, engine
        As for :func:`sortpool_ref.sortpool2d`.
    layout : {'NCHW', 'NHWC'}, default 'NCHW'
        The meaning of the axes of ``x``; NCHW as in PyTorch (note that the
        NumPy API's default is NHWC).

    Returns
    -------
    y : torch.Tensor
        Shape (N, C, Ho, Wo) (or (N, Ho, Wo, C)), the dtype and device of
        ``x``.

    Notes
    -----
    CPU tensors are handed to the Numba engine as NumPy views, without a
    copy; the result is a new tensor sharing memory with the engine's
    output. An NCHW tensor stored channels-last is pooled through its NHWC
    view and gives a channels-last result. CUDA tensors go to the CUDA
    engine through DLPack on PyTorch's current stream; that needs CuPy.

    The backward pass recomputes the sort and calls the engine's backward;
    it is not itself differentiable: a backward pass with
    ``create_graph=True`` raises ``RuntimeError``. Gradients at ties
    go to the earlier position in scan order, as in
    ``torch.nn.functional.max_pool2d``.
    """
    _check_tensors(x, w)
    layout = check_layout(layout)
    options = (("kernel_size", kernel_size), ("stride", stride),
               ("padding", padding), ("dilation", dilation),
               ("ceil_mode", ceil_mode), ("layout", layout),
               ("weighting", weighting), ("pad_value", pad_value),
               ("engine", engine))
    return _SortPool2dFunction.apply(x, w, options)


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if (isinstance(value, (bool, np.bool_))
            or not isinstance(value, numbers.Integral) or value < 1):
        what = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{name} must be {what}, got {value!r}")


class SortPool2d(torch.nn.Module):
    """Sorted weighted pooling with learnable rank weights.

    Parameters
    ----------
    pool_range : int
        Number of ranks kept per window (1 is max pooling).
    kernel_size, stride, padding, dilation, ceil_mode, pad_value, engine
        As for :func:`sortpool_ref.sortpool2d`.
    channels : int, optional
        ``None`` (default): one weight vector shared by all channels, shape
        ``(pool_range,)``. An int ``C``: one vector per channel, shape
        ``(C, pool_range)``.
    weighting : {'softmax', 'raw'}, default 'softmax'
        How ``weights`` become rank weights.
    init : {'normal', 'uniform'}, default 'normal'
        ``'normal'``: logits drawn from N(0, 0.1^2) with PyTorch's random
        generator (as in the seed code); ``'uniform'``: every rank weighted
        equally (zero logits for softmax, ``1 / pool_range`` for raw).
    layout : {'NCHW', 'NHWC'}, default 'NCHW'
        The meaning of the input's axes.
    device, dtype : optional
        Where and in which dtype the weights are made (PyTorch's factory
        arguments).

    Attributes
    ----------
    weights : torch.nn.Parameter
        The rank weights (logits for softmax), shape ``(pool_range,)`` or
        ``(C, pool_range)``.

    Notes
    -----
    The input and the weights must be on the same device; their dtypes may
    differ (each gradient comes back in the dtype of its tensor). See
    :func:`sortpool2d` for how tensors reach the engines.

    Examples
    --------
    >>> import torch
    >>> from sortpool_ref.torch import SortPool2d
    >>> pool = SortPool2d(pool_range=2, init="uniform")
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> pool(x)
    tensor([[[[ 4.5000,  6.5000],
              [12.5000, 14.5000]]]], grad_fn=<_SortPool2dFunctionBackward>)
    """

    def __init__(self, pool_range: int, kernel_size: Any = 2,
                 stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False, *, channels: Optional[int] = None,
                 weighting: str = "softmax", init: str = "normal",
                 layout: str = "NCHW", pad_value: Optional[float] = None,
                 engine: str = "auto", device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        _positive_int("pool_range", pool_range)
        _positive_int("channels", channels, optional=True)
        if init not in ("normal", "uniform"):
            raise ValueError(
                f"init must be 'normal' or 'uniform', got {init!r}")
        self.weighting = check_weighting(weighting)
        self.layout = check_layout(layout)
        self.init = init
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.pad_value = pad_value
        self.engine = engine
        shape = ((int(pool_range),) if channels is None
                 else (int(channels), int(pool_range)))
        self.weights = torch.nn.Parameter(
            torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def pool_range(self) -> int:
        return int(self.weights.shape[-1])

    def reset_parameters(self) -> None:
        """Draw the weights again as ``init`` says."""
        with torch.no_grad():
            if self.init == "normal":
                torch.nn.init.normal_(self.weights, 0.0, 0.1)
            elif self.weighting == "softmax":
                self.weights.zero_()
            else:
                self.weights.fill_(1.0 / self.pool_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sortpool2d(x, self.weights, self.kernel_size, self.stride,
                          self.padding, self.dilation, self.ceil_mode,
                          self.layout, self.weighting, self.pad_value,
                          self.engine)

    def rank_weights(self) -> torch.Tensor:
        """The weights of the ranks in a full window (softmax of the logits,
        or the raw weights), detached."""
        w = self.weights.detach()
        return torch.softmax(w, dim=-1) if self.weighting == "softmax" \
            else w.clone()

    def extra_repr(self) -> str:
        return (f"pool_range={self.pool_range}, "
                f"weights_shape={tuple(self.weights.shape)}, "
                f"kernel_size={self.kernel_size!r}, stride={self.stride!r}, "
                f"padding={self.padding!r}, dilation={self.dilation!r}, "
                f"ceil_mode={self.ceil_mode!r}, layout={self.layout!r}, "
                f"weighting={self.weighting!r}, "
                f"pad_value={self.pad_value!r}, engine={self.engine!r}")
