"""What the CUDA engine launches, in pure Python (no CuPy).

Everything between a checked :class:`~sortpool_ref._checks.Problem` and the
kernels of ``sortpool_kernels.cu`` lives here: which template instantiation
ranks a window, the exact C type of every kernel argument, launch geometry,
and the sequence of launches of a forward and a backward pass. The sequence is
written once against an array module ``xp`` and a ``launch`` callable, so the
same code drives the kernels on a GPU (``xp = cupy``, ``launch`` calls a
``RawKernel``) and, in the tests, the same kernels compiled as host C++
(``xp = numpy``, ``launch`` calls them through ctypes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, List, Optional, Sequence,
                    Tuple)

import numpy as np

from sortpool_ref._checks import Geometry, Problem

SOURCE_PATH = Path(__file__).with_name("sortpool_kernels.cu")
HOST_SHIM_PATH = Path(__file__).with_name("host_shim.h")

#: Options the engine gives NVRTC through ``cupy.RawModule``. CuPy adds its
#: include paths and ``-arch`` for the current device and, after these,
#: always ``-ftz=true``: NVRTC honours the last occurrence, so float32
#: subnormals are flushed to zero (inputs of comparisons included) whatever
#: is given here (cupy/cupy#9576, #8382).
COMPILE_OPTIONS = ("-std=c++17",)

#: C++ template argument for each compute dtype.
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

#: (WIN, KMAX) template arguments of the window ranking (see the .cu file):
#: comparator networks for 2x2 and 3x3 windows, register insertion keeping
#: at most KMAX ranks, and (0, 0) counting ranks without storage.
NETWORK_WINDOWS = (4, 9)
INSERTION_CAPACITIES = (1, 2, 4, 8, 16)
VARIANTS = tuple([(w, w) for w in NETWORK_WINDOWS]
                 + [(0, c) for c in INSERTION_CAPACITIES] + [(0, 0)])

#: (kernel size, stride) of the square windows, with dilation 1, whose
#: kernels are also instantiated with the geometry fixed at compile time
#: (template arguments KS, ST): every tap of a window loaded once, loops
#: unrolled, no division by a runtime stride.
FIXED_GEOMETRIES = ((2, 2), (3, 2))

#: Channels per vector load and store (16 bytes) in the fixed-geometry
#: kernels, where the channels are contiguous and aligned; 1 elsewhere.
VECTOR_WIDTHS = {np.dtype(np.float32): 4, np.dtype(np.float64): 2}

#: Ranked values a thread may hold at once (ranking capacity times channel
#: vector width) in the kernels that rank windows: channel vectors are
#: narrowed to one channel beyond it. On an H200, 3x3 windows ranked by
#: the 9-key network ran their forward 16% slower with 4 channels per step
#: than with one (register pressure).
LANE_BUDGET = 16

_GEOMETRY = [(name, "int") for name in (
    "N", "C", "H", "W", "out_h", "out_w", "kh", "kw", "sh", "sw", "dh", "dw",
    "pt", "pb", "pl", "pr", "has_pad", "k")]


def _strides(prefix: str):
    return [(f"{prefix}_{axis}", "i64") for axis in "nhwc"]


#: Kernel parameters in declaration order: (name, kind) with kind "ptr",
#: "int" (C int), "i64" (long long) or "T" (the compute dtype).
SIGNATURES: Dict[str, List[Tuple[str, str]]] = {
    "sortpool_rank_weights": [
        ("w", "ptr"), ("cw_count", "int"), ("k", "int"), ("raw", "int"),
        ("table", "ptr"), ("table64", "ptr")],
    "sortpool_forward": [
        ("x", "ptr"), *_strides("xs"), ("table", "ptr"),
        ("per_channel", "int"), *_GEOMETRY, ("pad_value", "T"),
        ("channels_inner", "int"), ("y", "ptr"), *_strides("ys")],
    "sortpool_backward_x_owned": [
        ("x", "ptr"), *_strides("xs"), ("gy", "ptr"), *_strides("gs"),
        ("table", "ptr"), ("per_channel", "int"), *_GEOMETRY,
        ("pad_value", "T"), ("channels_inner", "int"), ("gx", "ptr"),
        *_strides("gxs")],
    "sortpool_grad_w_partials": [
        ("x", "ptr"), *_strides("xs"), ("gy", "ptr"), *_strides("gs"),
        ("per_channel", "int"), *_GEOMETRY, ("pad_value", "T"),
        ("channels_inner", "int"), ("columns_per_channel", "i64"),
        ("partials", "ptr"), ("first_row", "i64"), ("table", "ptr"),
        ("write_gx", "int"), ("gx", "ptr"), *_strides("gxs")],
    "sortpool_sum_columns": [
        ("src", "ptr"), ("rows", "i64"), ("cols", "i64"), ("group", "i64"),
        ("dst", "ptr")],
    "sortpool_grad_w_finish": [
        ("sums", "ptr"), ("first_row", "i64"), ("table64", "ptr"),
        ("cw_count", "int"), ("k", "int"), ("raw", "int"),
        ("grad_w", "ptr")],
}
SIGNATURES["sortpool_backward_x_gather"] = \
    SIGNATURES["sortpool_backward_x_owned"]
SIGNATURES["sortpool_backward_x_cells"] = \
    SIGNATURES["sortpool_backward_x_owned"]

#: Kernels templated on (T, WIN, KMAX), on T only, and not templated.
VARIANT_KERNELS = ("sortpool_forward", "sortpool_backward_x_owned",
                   "sortpool_grad_w_partials")
DTYPE_KERNELS = ("sortpool_rank_weights", "sortpool_backward_x_gather")
PLAIN_KERNELS = ("sortpool_sum_columns", "sortpool_grad_w_finish")
#: Templated on (T, KS, ST, V) only: fixed geometries only.
FIXED_KERNELS = ("sortpool_backward_x_cells",)

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class LaunchConfig:
    """Launch geometry; tests shrink it so that small problems still cross
    block and grid boundaries.

    ``grad_w_columns`` is the target number of independent partial sums of
    the weight gradient (it sets Q, the number of columns per channel; the
    result depends on it, bit for bit, but not on ``block``/``max_grid``).
    ``grad_w_budget`` caps the float64 partial-sum buffer, in elements.
    ``reduce_group`` is how many columns one step of the second pass adds.
    """

    block: int = 256
    max_grid: int = 1 << 20
    grad_w_columns: int = 1 << 18
    grad_w_budget: int = 1 << 22
    reduce_group: int = 64


DEFAULT_CONFIG = LaunchConfig()


def c_type(dtype: Any) -> str:
    """The C++ type that instantiates the kernels for ``dtype``."""
    return C_TYPES[np.dtype(dtype)]


def variant_for(window_size: int, pool_range: int) -> Tuple[int, int]:
    """(WIN, KMAX) of the ranking that suits a window and pool_range.

    pool_range 1 is a running maximum (insertion with one slot); 2x2 windows
    and 3x3 windows keeping 5 or more ranks use a comparator network; other
    pool_ranges up to 16 a register insertion list; larger ones count ranks.
    (On an H200, 3x3 stride-2 forwards keeping 3 or 4 ranks took 0.17-0.24
    ms with the list of 4 against 0.29-0.30 ms with the 9-key network; for
    5 to 8 ranks the list of 8 was slower than the network.)
    """
    if pool_range == 1:
        return (0, 1)
    if window_size == 4 or (window_size == 9 and pool_range >= 5):
        return (window_size, window_size)
    for capacity in INSERTION_CAPACITIES:
        if pool_range <= capacity:
            return (0, capacity)
    return (0, 0)


def name_expression(kernel: str, dtype: Any = None,
                    variant: Optional[Tuple[int, int]] = None,
                    fixed: Optional[Tuple[int, int]] = None,
                    width: int = 1) -> str:
    """The C++ name of one instantiation, as given to ``name_expressions``
    and to ``RawModule.get_function`` (the two must match exactly).

    ``fixed`` is a (kernel size, stride) of :data:`FIXED_GEOMETRIES` and
    ``width`` the channels per vector, for the kernels that take them.
    """
    if kernel in PLAIN_KERNELS:
        return kernel
    if fixed is None and width != 1:
        raise ValueError("channel vectors need a fixed geometry")
    tail = "" if fixed is None else f", {fixed[0]}, {fixed[1]}, {width}"
    if kernel in FIXED_KERNELS and fixed is None:
        raise ValueError(f"{kernel} needs a fixed geometry")
    if kernel in FIXED_KERNELS:
        return f"{kernel}<{c_type(dtype)}{tail}>"
    if kernel in DTYPE_KERNELS:
        if fixed is not None:
            raise ValueError(f"{kernel} has no fixed-geometry form")
        return f"{kernel}<{c_type(dtype)}>"
    if kernel in VARIANT_KERNELS:
        win, kmax = variant
        return f"{kernel}<{c_type(dtype)}, {win}, {kmax}{tail}>"
    raise ValueError(f"unknown kernel {kernel!r}")


@functools.lru_cache(maxsize=256)
def fixed_variants(kernel_size: int) -> Tuple[Tuple[int, int], ...]:
    """The variants :func:`variant_for` picks for a square window of this
    size: those instantiated with the geometry fixed."""
    window = kernel_size * kernel_size
    found: List[Tuple[int, int]] = []
    for k in range(1, window + 1):
        if variant_for(window, k) not in found:
            found.append(variant_for(window, k))
    return tuple(found)


def _fixed_name_expressions(dtype: Any,
                            variant: Tuple[int, int]) -> List[str]:
    names = []
    for fixed in FIXED_GEOMETRIES:
        if variant not in fixed_variants(fixed[0]):
            continue
        for width in (1, VECTOR_WIDTHS[np.dtype(dtype)]):
            names += [name_expression(k, dtype, variant, fixed, width)
                      for k in VARIANT_KERNELS]
            names += [name_expression(k, dtype, None, fixed, width)
                      for k in FIXED_KERNELS]
    return names


def module_name_expressions(dtype: Any,
                            variant: Tuple[int, int]) -> List[str]:
    """Every instantiation a problem of this dtype and variant may launch."""
    names = ([name_expression(k, dtype, variant) for k in VARIANT_KERNELS]
             + [name_expression(k, dtype) for k in DTYPE_KERNELS]
             + [name_expression(k) for k in PLAIN_KERNELS])
    for name in _fixed_name_expressions(dtype, variant):
        if name not in names:
            names.append(name)
    return names


def all_name_expressions() -> List[str]:
    """Every instantiation of the source, each once."""
    names: List[str] = []
    for dtype in C_TYPES:
        for variant in VARIANTS:
            for name in module_name_expressions(dtype, variant):
                if name not in names:
                    names.append(name)
    return names


def pack_args(kernel: str, dtype: Any, values: Dict[str, Any]) -> tuple:
    """Kernel arguments in declaration order, each scalar as exactly the C
    type declared (np.int32, np.int64 or the compute dtype); arrays for
    pointers are passed through."""
    scalar = np.dtype(dtype).type
    args = []
    append = args.append
    for name, kind in SIGNATURES[kernel]:
        value = values[name]
        if kind == "ptr":
            append(value)
        elif kind == "int":
            if not -2**31 <= value <= _INT32_MAX:
                raise OverflowError(f"{kernel}: {name} = {value} does not "
                                    f"fit a C int")
            append(np.int32(value))
        elif kind == "i64":
            append(np.int64(value))
        else:
            append(scalar(value))
    return tuple(args)


@functools.lru_cache(maxsize=256)
def fixed_geometry(g: Geometry) -> Optional[Tuple[int, int]]:
    """(kernel size, stride) where the geometry is one of
    :data:`FIXED_GEOMETRIES`, else None."""
    for size, stride in FIXED_GEOMETRIES:
        if (g.kernel_h == g.kernel_w == size
                and g.stride_h == g.stride_w == stride
                and g.dilation_h == g.dilation_w == 1):
            return size, stride
    return None


def _address(a: Any) -> int:
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


def vector_width(dtype: Any, channels: int,
                 arrays: Sequence[Tuple[Any, Dict[str, int]]]) -> int:
    """Channels per vector access that every array allows: the widest of
    (:data:`VECTOR_WIDTHS`, 1) such that the channels are contiguous,
    their count and the other strides are multiples of it and each array
    starts on a vector boundary. ``arrays`` holds (array, its strides in
    elements along n, h, w, c)."""
    dtype = np.dtype(dtype)
    width = VECTOR_WIDTHS[dtype]
    ok = channels % width == 0 and all(
        strides["c"] == 1
        and all(strides[axis] % width == 0 for axis in "nhw")
        and _address(a) % (width * dtype.itemsize) == 0
        for a, strides in arrays)
    return width if ok else 1


def ranking_width(variant: Tuple[int, int], width: int) -> int:
    """The channel vector width of a kernel that ranks windows with
    ``variant``: ``width`` unless the values it holds (capacity x width)
    would exceed :data:`LANE_BUDGET`, then 1."""
    win, kmax = variant
    capacity = win if win > 0 else max(kmax, 1)
    return width if capacity * width <= LANE_BUDGET else 1


def grid_for(total: int, config: LaunchConfig) -> int:
    """Blocks for a grid-stride loop over ``total`` steps."""
    return max(1, min(-(-total // config.block), config.max_grid))


def element_strides(a: Any, layout: str) -> Dict[str, int]:
    """Strides in elements of a 4-D array along logical (n, h, w, c)."""
    itemsize = a.itemsize
    if any(s % itemsize for s in a.strides):
        raise ValueError("array strides must be multiples of the item size")
    s = [st // itemsize for st in a.strides]
    if layout == "NHWC":
        n, h, w, c = s
    else:
        n, c, h, w = s
    return {"n": n, "h": h, "w": w, "c": c}


def _prefixed(prefix: str, strides: Dict[str, int]) -> Dict[str, int]:
    return {f"{prefix}_{axis}": v for axis, v in strides.items()}


def channels_inner(strides: Dict[str, int], channels: int) -> bool:
    """Whether neighbouring threads should take neighbouring channels
    (coalesced for NHWC-like memory) rather than neighbouring columns."""
    return channels > 1 and abs(strides["c"]) <= abs(strides["w"])


def _axis_taps(lead: int, kernel: int, stride: int, dilation: int,
               out: int) -> np.ndarray:
    """taps[o, i]: the input index of tap i of window o along one axis."""
    return (np.arange(out)[:, None] * stride - lead
            + np.arange(kernel)[None, :] * dilation)


def _axis_cover(size: int, lead: int, kernel: int, stride: int,
                dilation: int, out: int) -> np.ndarray:
    taps = _axis_taps(lead, kernel, stride, dilation, out).ravel()
    taps = taps[(taps >= 0) & (taps < size)]
    return np.bincount(taps, minlength=size)


@functools.lru_cache(maxsize=256)
def windows_own_inputs(g: Geometry) -> bool:
    """Whether every input position lies in exactly one window, so that the
    backward can let each window write its own inputs."""
    rows = _axis_cover(g.height, g.pad_top, g.kernel_h, g.stride_h,
                       g.dilation_h, g.out_h)
    cols = _axis_cover(g.width, g.pad_left, g.kernel_w, g.stride_w,
                       g.dilation_w, g.out_w)
    return bool((rows == 1).all() and (cols == 1).all())


def geometry_values(p: Problem) -> Dict[str, Any]:
    g = p.geometry
    return dict(
        N=p.batch, C=p.channels, H=g.height, W=g.width, out_h=g.out_h,
        out_w=g.out_w, kh=g.kernel_h, kw=g.kernel_w, sh=g.stride_h,
        sw=g.stride_w, dh=g.dilation_h, dw=g.dilation_w, pt=g.pad_top,
        pb=g.pad_bottom, pl=g.pad_left, pr=g.pad_right,
        has_pad=int(p.pad_value is not None), k=p.pool_range,
        pad_value=0.0 if p.pad_value is None else p.pad_value,
        per_channel=int(p.per_channel))


def _axis_positions(size: int, lead: int, trail: int, kernel: int,
                    stride: int, dilation: int, out: int,
                    padded: bool) -> np.ndarray:
    taps = _axis_taps(lead, kernel, stride, dilation, out)
    lo, hi = (-lead, size + trail) if padded else (0, size)
    return ((taps >= lo) & (taps < hi)).sum(axis=1)


@functools.lru_cache(maxsize=256)
def fewest_window_positions(p: Problem) -> int:
    """The smallest number of positions (n_o) any window of the problem
    has: where it is at least pool_range, every window keeps all k
    ranks."""
    g, padded = p.geometry, p.pad_value is not None
    rows = _axis_positions(g.height, g.pad_top, g.pad_bottom, g.kernel_h,
                           g.stride_h, g.dilation_h, g.out_h, padded)
    cols = _axis_positions(g.width, g.pad_left, g.pad_right, g.kernel_w,
                           g.stride_w, g.dilation_w, g.out_w, padded)
    return int(rows.min()) * int(cols.min())


@functools.lru_cache(maxsize=256)
def grad_w_first_row(p: Problem) -> int:
    """The first row (m * k + r) of the weight-gradient partial sums that
    is stored: 0, or k * k where every window keeps all k ranks (only the
    rows of m = k can then be non-zero)."""
    k = p.pool_range
    return k * k if fewest_window_positions(p) >= k else 0


@functools.lru_cache(maxsize=256)
def grad_w_columns_per_channel(p: Problem, config: LaunchConfig) -> int:
    """Q: how many partial sums each channel's windows are split into."""
    windows = p.batch * p.geometry.out_h * p.geometry.out_w
    slots = (p.pool_range + 1) * p.pool_range - grad_w_first_row(p)
    q = -(-config.grad_w_columns // max(p.channels, 1))
    q = min(q, config.grad_w_budget // max(p.channels * slots, 1))
    return max(1, min(q, windows))


Launch = Callable[[str, int, int, tuple], None]


class Plan:
    """The launches of one problem, against array module ``xp``.

    ``launch(name_expression, grid, block, args)`` runs one kernel;
    arguments come from :func:`pack_args`.
    """

    def __init__(self, xp: Any, launch: Launch, p: Problem,
                 config: LaunchConfig = DEFAULT_CONFIG):
        self.xp = xp
        self.launch = launch
        self.p = p
        self.config = config
        self.dtype = np.dtype(p.dtype)
        self.variant = variant_for(p.geometry.window_size, p.pool_range)
        self.values = geometry_values(p)
        self.cw_count = p.channels if p.per_channel else 1

    def _run(self, kernel: str, total: int, values: Dict[str, Any],
             variant: Optional[Tuple[int, int]] = None,
             fixed: Optional[Tuple[int, int]] = None,
             width: int = 1) -> None:
        if kernel in PLAIN_KERNELS:
            name = name_expression(kernel)
        else:
            name = name_expression(kernel, self.dtype, variant, fixed, width)
        args = pack_args(kernel, self.dtype, values)
        self.launch(name, grid_for(total, self.config), self.config.block,
                    args)

    def fixed(self) -> Optional[Tuple[int, int]]:
        """(kernel size, stride) of the fixed-geometry kernels that serve
        this problem with its ranking variant, or None."""
        fixed = fixed_geometry(self.p.geometry)
        if fixed is None or self.variant not in fixed_variants(fixed[0]):
            return None
        return fixed

    def _width(self, fixed: Optional[Tuple[int, int]],
               arrays: Sequence[Tuple[Any, Dict[str, int]]]) -> int:
        if fixed is None:
            return 1
        return vector_width(self.dtype, self.p.channels, arrays)

    def rank_weights(self, w: Any) -> Tuple[Any, Any]:
        """(table in the compute dtype, table in float64), each of shape
        (cw_count, k + 1, k)."""
        xp, k = self.xp, self.p.pool_range
        w64 = xp.ascontiguousarray(
            xp.asarray(w, dtype=xp.float64).reshape(self.cw_count, k))
        table = xp.empty((self.cw_count, k + 1, k), dtype=self.dtype)
        table64 = xp.empty((self.cw_count, k + 1, k), dtype=xp.float64)
        self._run("sortpool_rank_weights", self.cw_count * (k + 1), dict(
            w=w64, cw_count=self.cw_count, k=k,
            raw=int(self.p.weighting == "raw"), table=table,
            table64=table64))
        return table, table64

    def _inner(self, strides: Dict[str, int]) -> int:
        return int(channels_inner(strides, self.p.channels))

    def forward(self, x: Any, w: Any) -> Any:
        p, xp = self.p, self.xp
        y = xp.empty(p.out_shape, dtype=self.dtype)
        if y.size == 0:
            return y
        table, _ = self.rank_weights(w)
        xs = element_strides(x, p.layout)
        ys = element_strides(y, p.layout)
        values = dict(self.values, x=x, table=table, y=y,
                      channels_inner=self._inner(xs),
                      **_prefixed("xs", xs), **_prefixed("ys", ys))
        fixed = self.fixed()
        width = ranking_width(self.variant,
                              self._width(fixed, [(x, xs), (y, ys)]))
        self._run("sortpool_forward", y.size // width, values, self.variant,
                  fixed, width)
        return y

    def backward(self, grad_y: Any, x: Any, w: Any) -> Tuple[Any, Any]:
        p, xp = self.p, self.xp
        g, k = p.geometry, p.pool_range
        gy = grad_y.astype(self.dtype, copy=False)
        grad_x = xp.empty(x.shape, dtype=self.dtype)
        if grad_x.size == 0:
            grad_w = xp.zeros((self.cw_count, k), dtype=xp.float64)
            return grad_x, grad_w.reshape(w.shape).astype(p.weight_dtype,
                                                      copy=False)
        grad_w = xp.empty((self.cw_count, k), dtype=xp.float64)
        table, table64 = self.rank_weights(w)
        xs = element_strides(x, p.layout)
        gs = element_strides(gy, p.layout)
        gxs = element_strides(grad_x, p.layout)
        values = dict(self.values, x=x, gy=gy, table=table, gx=grad_x,
                      channels_inner=self._inner(xs),
                      **_prefixed("xs", xs), **_prefixed("gs", gs),
                      **_prefixed("gxs", gxs))
        fixed = self.fixed()
        width = self._width(fixed, [(x, xs), (gy, gs), (grad_x, gxs)])
        owned = windows_own_inputs(g)
        # fixed geometries write the owned dL/dx in the weight-gradient
        # pass, which ranks the same windows
        fused = owned and fixed is not None
        if fused:
            pass  # written by the weight-gradient pass below
        elif owned:
            owned_width = ranking_width(self.variant, width)
            self._run("sortpool_backward_x_owned", gy.size // owned_width,
                      values, self.variant, fixed, owned_width)
        elif fixed is not None:
            stride = fixed[1]
            cells = (p.batch * p.channels * -(-(g.height + g.pad_top)
                                             // stride)
                     * -(-(g.width + g.pad_left) // stride))
            self._run("sortpool_backward_x_cells", cells // width, values,
                      None, fixed, width)
        else:
            self._run("sortpool_backward_x_gather", grad_x.size, values)

        # dL/dw: per-column partials, then sums over columns in fixed
        # order, then the softmax formula.
        q = grad_w_columns_per_channel(p, self.config)
        first_row = grad_w_first_row(p)
        slots = (k + 1) * k
        stored = slots - first_row
        cols = q if p.per_channel else p.channels * q
        rows = self.cw_count * stored
        # every stored sum is written once where all windows keep k ranks
        # (and a ranking holds them), otherwise added to
        written = first_row > 0 and self.variant != (0, 0)
        partials = (xp.empty if written else xp.zeros)((rows, cols),
                                                       dtype=xp.float64)
        values = dict(values, columns_per_channel=q, partials=partials,
                      first_row=first_row, write_gx=int(fused))
        # the same columns, summed in the same order, whatever the width;
        # one channel per step for overlapping windows (H200, 3x3 s2:
        # 0.21-0.34 ms against 0.26-0.48 with 4 float32 channels)
        overlap = fixed is not None and fixed[0] > fixed[1]
        gw_width = 1 if overlap else ranking_width(self.variant, width)
        self._run("sortpool_grad_w_partials", p.channels * q // gw_width,
                  values, self.variant, fixed, gw_width)
        sums = partials
        while cols > 1:
            group = min(self.config.reduce_group, cols)
            dst_cols = -(-cols // group)
            dst = xp.empty((rows, dst_cols), dtype=xp.float64)
            self._run("sortpool_sum_columns", rows * dst_cols, dict(
                src=sums, rows=rows, cols=cols, group=group, dst=dst))
            sums, cols = dst, dst_cols
        self._run("sortpool_grad_w_finish", self.cw_count, dict(
            sums=sums, first_row=first_row, table64=table64,
            cw_count=self.cw_count, k=k, raw=int(p.weighting == "raw"),
            grad_w=grad_w))
        return grad_x, grad_w.reshape(w.shape).astype(p.weight_dtype,
                                                      copy=False)
