"""The front door: check everything once, then hand over to an engine."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._checks import Problem, check_grad_y, make_problem
from ._engines import ENGINES, get_engine


def _on_gpu(a: Any) -> bool:
    try:
        return hasattr(a, "__cuda_array_interface__")
    except RuntimeError:
        # PyTorch raises this (not AttributeError) for a CUDA tensor that
        # requires grad: it is on the GPU all the same.
        return True


def _where(a: Any) -> str:
    return "a CUDA array" if _on_gpu(a) else "a host (NumPy) array"


def _resolve_engine(engine: Any, arrays) -> str:
    if engine not in ENGINES:
        raise ValueError(
            f"engine must be one of {', '.join(repr(e) for e in ENGINES)}, "
            f"got {engine!r}"
        )
    names = [name for name, _ in arrays]
    on_gpu = [_on_gpu(a) for _, a in arrays]
    if any(on_gpu) and not all(on_gpu):
        i = next(i for i, g in enumerate(on_gpu) if g != on_gpu[0])
        raise ValueError(
            f"x and {names[i]} must be on the same device: x is "
            f"{_where(arrays[0][1])}, {names[i]} is {_where(arrays[i][1])}"
        )
    if engine == "auto":
        return "cuda" if on_gpu[0] else "numba"
    if engine in ("reference", "numba") and on_gpu[0]:
        raise ValueError(
            f"engine {engine!r} runs on the host but the arrays are CUDA "
            f"arrays; use engine='cuda' or 'auto', or copy them to the host"
        )
    if engine == "cuda" and not on_gpu[0]:
        raise ValueError(
            "engine 'cuda' needs CUDA arrays (e.g. CuPy) but x is a host "
            "(NumPy) array; use engine='numba' or 'auto', or copy it to the "
            "GPU"
        )
    return engine


def _as_host_array(name: str, a: Any) -> np.ndarray:
    try:
        return np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be an array-like, got {type(a)!r}") \
            from exc


def _check_out(name: str, out: Any, shape: Tuple[int, ...], dtype: Any,
               inputs, module: Any, on_gpu: bool) -> Any:
    """The array an ``out=`` argument names, checked: on the device of x,
    writeable, of the result's shape and dtype, and apart from every input
    (the result is written while the inputs are read)."""
    if on_gpu:
        if not _on_gpu(out):
            raise ValueError(
                f"{name} must be on the same device as x: x is a CUDA array, "
                f"{name} is {_where(out)}")
        arr = module.as_cupy(out)
        may_share = module.cupy.may_share_memory
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(
                f"{name} must be a NumPy array (the result is written into "
                f"it), got {type(out).__name__}")
        arr = out
        may_share = np.may_share_memory
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the result's shape {tuple(shape)}, got "
            f"{tuple(arr.shape)}")
    if np.dtype(arr.dtype) != np.dtype(dtype):
        raise TypeError(
            f"{name} must have the result's dtype {np.dtype(dtype)}, got "
            f"{np.dtype(arr.dtype)}")
    if not on_gpu and not arr.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if on_gpu and arr.device.id != inputs[0][1].device.id:
        raise ValueError(
            f"x and {name} must be on the same device: x is on CUDA device "
            f"{inputs[0][1].device.id}, {name} is on CUDA device "
            f"{arr.device.id}")
    for other, a in inputs:
        if a is not None and may_share(arr, a):
            raise ValueError(f"{name} must not overlap {other}")
    return arr


def _store(result: Any, arr: Any) -> None:
    """Copy an engine's result into a checked ``out`` array, unless the
    engine wrote it there."""
    if result is not arr:
        arr[...] = result


def _in_place(module: Any) -> bool:
    """Whether the engine takes ``out=`` and writes into it (the Numba
    engine); the others' results are copied in."""
    return getattr(module, "WRITES_INTO_OUT", False)


def prepare(x: Any, w: Any, grad_y: Any = None, *, engine: Any = "auto",
            **geometry: Any) -> Tuple[Any, Any, Any, Any, Problem]:
    """Check arguments; return (engine module, x, w, grad_y, problem)."""
    arrays = [("x", x), ("w", w)]
    if grad_y is not None:
        arrays.append(("grad_y", grad_y))
    name = _resolve_engine(engine, arrays)
    if name == "cuda":
        # CuPy views (no copy) of any CUDA array: CuPy's own, PyTorch's
        # through DLPack, anything with __cuda_array_interface__.
        module = get_engine(name)
        x, w, grad_y = (module.as_cupy(a) for a in (x, w, grad_y))
    else:
        x = _as_host_array("x", x)
        w = _as_host_array("w", w)
        if grad_y is not None:
            grad_y = _as_host_array("grad_y", grad_y)
    problem = make_problem(x.shape, x.dtype, w.shape, w.dtype, **geometry)
    if grad_y is not None:
        check_grad_y(problem, grad_y.shape, grad_y.dtype)
    if name == "cuda":
        module.check_same_device(x, w, grad_y)
    else:
        module = get_engine(name)
    return module, x, w, grad_y, problem


def sortpool2d(x: Any, w: Any, kernel_size: Any = 2, stride: Any = None,
               padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
               layout: str = "NHWC", weighting: str = "softmax",
               pad_value: Optional[float] = None,
               engine: str = "auto", out: Any = None) -> Any:
    """Sorted weighted pooling over 2-D windows.

    Each window is sorted in decreasing order, the first ``pool_range``
    values are kept and their weighted sum is returned. ``pool_range`` is
    ``w.shape[-1]``; ``pool_range = 1`` is max pooling.

    Parameters
    ----------
    x : array_like, shape (N, H, W, C) or (N, C, H, W)
        float32 or float64 input, any strides; never modified.
    w : array_like, shape (pool_range,) or (C, pool_range)
        Rank weights shared by all channels or one row per channel: logits
        for ``weighting="softmax"``, the weights themselves for ``"raw"``.
        Rank 1 (the largest value) comes first.
    kernel_size : int or (int, int), default 2
        Window height and width.
    stride : int or (int, int), optional
        Step between windows; defaults to ``kernel_size``.
    padding : int, (int, int), ((int, int), (int, int)), 'valid' or 'same'
        Implicit padding: the same on both sides of each axis (PyTorch's
        words, at most half the kernel), per side as ``((top, bottom),
        (left, right))``, none (``'valid'``) or TensorFlow's ``'same'``
        (output ``ceil(size / stride)``, the extra row/column at the
        bottom/right).
    dilation : int or (int, int), default 1
        Spacing between kernel taps.
    ceil_mode : bool, default False
        Round the output size up, as PyTorch does: a last partial window is
        kept when it starts inside the input or its leading padding.
    layout : {'NHWC', 'NCHW'}, default 'NHWC'
        Memory-independent meaning of the four axes of ``x`` and of the
        result.
    weighting : {'softmax', 'raw'}, default 'softmax'
        ``'softmax'``: rank weights are ``softmax(w)`` renormalised over the
        ranks a window has. ``'raw'``: ``w`` is used as it is.
    pad_value : float, optional
        ``None``: padded positions are not part of any window. A number:
        padded positions hold it and are ranked like input values.
    engine : {'auto', 'reference', 'numba', 'cuda'}, default 'auto'
        ``'auto'`` picks ``'numba'`` for host arrays and ``'cuda'`` for CUDA
        arrays. An engine that cannot run raises; nothing falls back.
    out : ndarray, optional
        An array to write the result into, as NumPy's ``out=``: the
        result's shape and dtype, writeable, on the device of ``x``, any
        strides, overlapping no input. It is returned. A loop that pools
        arrays of one shape saves the allocation (for large arrays, the
        operating system's zeroing of fresh pages).

    Returns
    -------
    y : ndarray, shape (N, Ho, Wo, C) or (N, C, Ho, Wo)
        Same layout and dtype as ``x`` (``out`` when given).

    Raises
    ------
    TypeError, ValueError
        For bad arguments, before any work is done; the message names the
        argument.
    sortpool_ref.EngineUnavailableError
        When the engine asked for cannot run on this machine.

    Notes
    -----
    For a window with values ``V`` (real positions only unless
    ``pad_value`` is set) sorted so that ``a(1) >= a(2) >= ...``, with NaN
    above every number and ties kept in scan order (kernel row, then kernel
    column), and ``m = min(pool_range, len(V))``::

        y = sum_{r <= m} p_r * a(r),   p = softmax(w[:m])  (or w[:m] if raw)

    Cost: one pass over the input; per window a partial insertion sort of
    ``kernel_h * kernel_w`` values keeping ``pool_range`` of them.

    Examples
    --------
    >>> import numpy as np
    >>> from sortpool_ref import sortpool2d
    >>> x = np.arange(16.0).reshape(1, 4, 4, 1)
    >>> sortpool2d(x, np.zeros(1))[..., 0]   # pool_range 1: max pooling
    array([[[ 5.,  7.],
            [13., 15.]]])
    >>> sortpool2d(x, np.zeros(4))[..., 0]   # equal logits over 2x2: mean
    array([[[ 2.5,  4.5],
            [10.5, 12.5]]])
    """
    module, x, w, _, problem = prepare(
        x, w, engine=engine, kernel_size=kernel_size, stride=stride,
        padding=padding, dilation=dilation, ceil_mode=ceil_mode,
        layout=layout, weighting=weighting, pad_value=pad_value)
    if out is None:
        return module.forward(x, w, problem)
    arr = _check_out("out", out, problem.out_shape, problem.dtype,
                     [("x", x), ("w", w)], module, _on_gpu(x))
    if _in_place(module):
        _store(module.forward(x, w, problem, out=arr), arr)
    else:
        _store(module.forward(x, w, problem), arr)
    return out


def sortpool2d_backward(grad_y: Any, x: Any, w: Any, kernel_size: Any = 2,
                        stride: Any = None, padding: Any = 0,
                        dilation: Any = 1, ceil_mode: bool = False,
                        layout: str = "NHWC", weighting: str = "softmax",
                        pad_value: Optional[float] = None,
                        engine: str = "auto",
                        out: Any = None) -> Tuple[Any, Any]:
    """Gradients of :func:`sortpool2d` with respect to ``x`` and ``w``.

    Parameters
    ----------
    grad_y : array_like
        dL/dy, with the shape of ``sortpool2d(x, w, ...)``; float32 or
        float64 (computed in the dtype of ``x``).
    x, w, kernel_size, stride, padding, dilation, ceil_mode, layout, \
weighting, pad_value, engine
        As for :func:`sortpool2d`. The sort is recomputed; nothing is
        cached between the calls.
    out : (ndarray or None, ndarray or None), optional
        Arrays to write ``grad_x`` and ``grad_w`` into, as for
        :func:`sortpool2d` (either may be None: that result is allocated).
        Whatever ``grad_x`` holds before the call is overwritten, never
        added to.

    Returns
    -------
    grad_x : ndarray
        dL/dx, the shape, layout and dtype of ``x``.
    grad_w : ndarray
        dL/dw, the shape and dtype of ``w``.

    Notes
    -----
    Each kept rank ``r`` of window ``o`` sends ``g_o * p_r`` to the
    position its value came from; overlapping windows add up and padded
    positions receive nothing. Ties and NaN are routed by the same ranking
    as the forward, so the gradient at a tie goes to the earlier position.
    For raw weights ``dL/dw_r = sum_o g_o * a_o(r)``; for softmax logits,
    grouping windows by their number of kept ranks ``m``,
    ``dL/dw = sum_m p^(m) * (G^(m) - <p^(m), G^(m)>)`` with
    ``G^(m)_r = sum_{o: m_o = m} g_o * a_o(r)``. Weight gradients are summed
    in float64 in a fixed order, so results are bit-identical from run to
    run and for any thread count.
    """
    module, x, w, grad_y, problem = prepare(
        x, w, grad_y, engine=engine, kernel_size=kernel_size, stride=stride,
        padding=padding, dilation=dilation, ceil_mode=ceil_mode,
        layout=layout, weighting=weighting, pad_value=pad_value)
    if out is None:
        return module.backward(grad_y, x, w, problem)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            "out must be None or a pair (grad_x, grad_w), each an array or "
            f"None, got {type(out).__name__}")
    on_gpu = _on_gpu(x)
    inputs = [("x", x), ("w", w), ("grad_y", grad_y)]
    arrs = [None, None]
    if out[0] is not None:
        arrs[0] = _check_out("out[0] (grad_x)", out[0], x.shape,
                             problem.dtype, inputs, module, on_gpu)
    if out[1] is not None:
        arrs[1] = _check_out("out[1] (grad_w)", out[1], w.shape,
                             problem.weight_dtype,
                             inputs + [("out[0] (grad_x)", arrs[0])],
                             module, on_gpu)
    if _in_place(module):
        grad_x, grad_w = module.backward(grad_y, x, w, problem,
                                         out=tuple(arrs))
    else:
        grad_x, grad_w = module.backward(grad_y, x, w, problem)
    results = [grad_x, grad_w]
    for i in range(2):
        if arrs[i] is not None:
            _store(results[i], arrs[i])
            results[i] = out[i]
    return results[0], results[1]
