"""A layer object for NumPy pipelines."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from ._api import sortpool2d, sortpool2d_backward
from ._checks import check_weighting

INITS = ("normal", "uniform")


class SortPool2d:
    """Sorted weighted pooling with learnable rank weights.

    Parameters
    ----------
    pool_range : int
        Number of ranks kept per window (1 is max pooling).
    kernel_size, stride, padding, dilation, ceil_mode, layout, pad_value, \
engine
        As for :func:`sortpool_ref.sortpool2d`.
    channels : int, optional
        ``None`` (default): one weight vector shared by all channels, shape
        ``(pool_range,)``. An int ``C``: one vector per channel, shape
        ``(C, pool_range)``.
    weighting : {'softmax', 'raw'}, default 'softmax'
        How ``weights`` become rank weights.
    init : {'normal', 'uniform'} or array_like, default 'normal'
        ``'normal'``: logits drawn from N(0, 0.1^2), as in the seed code.
        ``'uniform'``: every rank weighted equally (zero logits for softmax,
        ``1 / pool_range`` for raw). An array: used as the initial weights
        (copied; its shape must match).
    seed : int or numpy.random.Generator, optional
        Randomness for ``init='normal'``.

    Attributes
    ----------
    weights : ndarray of float64
        The learnable parameters (logits or raw weights), a host array
        whatever the input's device (a CUDA input gets a device copy per
        call). Update them in place or assign a new array of the same shape.
    grad : ndarray of float64
        dL/dweights from the last :meth:`backward` call (overwritten, not
        accumulated), zero before the first.

    Notes
    -----
    :meth:`forward` keeps a reference to its input for :meth:`backward`;
    the sort is recomputed in the backward pass, so no extra activation
    memory is held.

    Examples
    --------
    >>> import numpy as np
    >>> from sortpool_ref import SortPool2d
    >>> pool = SortPool2d(pool_range=2, init="uniform")
    >>> x = np.arange(16.0).reshape(1, 4, 4, 1)
    >>> y = pool.forward(x)
    >>> grad_x = pool.backward(np.ones_like(y))
    >>> pool.weights -= 0.1 * pool.grad   # one SGD step
    """

    def __init__(self, pool_range: int, kernel_size: Any = 2,
                 stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False, *, channels: Optional[int] = None,
                 weighting: str = "softmax",
                 init: Union[str, Any] = "normal", layout: str = "NHWC",
                 pad_value: Optional[float] = None, engine: str = "auto",
                 seed: Any = None) -> None:
        if isinstance(pool_range, (bool, np.bool_)) or not isinstance(
                pool_range, (int, np.integer)) or pool_range < 1:
            raise ValueError(
                f"pool_range must be a positive int, got {pool_range!r}")
        if channels is not None and (
                isinstance(channels, (bool, np.bool_))
                or not isinstance(channels, (int, np.integer))
                or channels < 1):
            raise ValueError(
                f"channels must be None or a positive int, got {channels!r}")
        self.weighting = check_weighting(weighting)
        shape = (int(pool_range),) if channels is None else (
            int(channels), int(pool_range))
        if isinstance(init, str):
            if init == "normal":
                rng = np.random.default_rng(seed)
                weights = rng.normal(0.0, 0.1, size=shape)
            elif init == "uniform":
                fill = 0.0 if weighting == "softmax" else 1.0 / pool_range
                weights = np.full(shape, fill)
            else:
                raise ValueError(
                    f"init must be 'normal', 'uniform' or an array, got "
                    f"{init!r}")
        else:
            weights = np.array(init, dtype=np.float64)
            if weights.shape != shape:
                raise ValueError(
                    f"init has shape {weights.shape} but pool_range="
                    f"{pool_range} and channels={channels} need {shape}")
        self.weights = weights.astype(np.float64)
        self.grad = np.zeros_like(self.weights)
        self.options = dict(kernel_size=kernel_size, stride=stride,
                            padding=padding, dilation=dilation,
                            ceil_mode=ceil_mode, layout=layout,
                            weighting=weighting, pad_value=pad_value,
                            engine=engine)
        self._x = None

    @property
    def pool_range(self) -> int:
        return self.weights.shape[-1]

    def _weights_like(self, x: Any) -> Any:
        """The weights on x's device: a CuPy copy for CUDA inputs."""
        if hasattr(x, "__cuda_array_interface__"):
            import cupy

            return cupy.asarray(self.weights)
        return self.weights

    def forward(self, x: Any) -> Any:
        """Pool ``x``; remembers it for :meth:`backward`."""
        y = sortpool2d(x, self._weights_like(x), **self.options)
        self._x = x
        return y

    __call__ = forward

    def backward(self, grad_y: Any) -> Any:
        """Return dL/dx for the last forward input; store dL/dw in ``grad``."""
        if self._x is None:
            raise RuntimeError("backward() called before forward()")
        grad_x, grad_w = sortpool2d_backward(
            grad_y, self._x, self._weights_like(self._x), **self.options)
        if hasattr(grad_w, "__cuda_array_interface__"):
            import cupy

            grad_w = cupy.asnumpy(grad_w)
        self.grad = grad_w
        return grad_x

    def rank_weights(self) -> np.ndarray:
        """The weights of the ranks in a full window (softmax of the logits
        for ``weighting='softmax'``, the weights themselves for 'raw')."""
        if self.weighting == "raw":
            return self.weights.copy()
        z = self.weights - self.weights.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"SortPool2d(pool_range={self.pool_range}, "
                f"weights_shape={self.weights.shape}, {opts})")
