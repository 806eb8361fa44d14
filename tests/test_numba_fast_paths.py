"""Every specialised path of the Numba engine against the float64 reference.

The engine (sortpool_ref/_numba_engine.py) runs different loops for
different windows: the 2x2 and 3x3 register paths (NHWC) for windows
inside the input, the channel-tile path for every other NHWC window (any
geometry, padding, pad_value), the NCHW 2x2 forward (register path inside,
scalar path on the borders), the NCHW 3x3 forward (padded rows, windows that
keep fewer ranks than pool_range redone one by one; by blocks of channels,
as the backward below, for pool_range 7-9), the NCHW 2x2 stride-2
backward where every window lies inside the input ("2x2"), the 3x3
backward in explicit vectors where the channels fill whole vectors, the
other NCHW backwards by blocks of channels (NHWC rows on transposed
tiles) where the channels fill whole vectors, and NHWC kernels on a
channels-last copy for the rest. Each geometry below is chosen to hit some
of them; every one is compared with the reference on values with NaN,
infinities, signed zeros and ties, for every pool_range, both layouts,
both dtypes and both weight shapes, and checked for bit-identical results
across calls and thread counts.
"""

import itertools

import numba
import numpy as np
import pytest

from sortpool_ref import _numba_engine as engine
from sortpool_ref import reference
from sortpool_ref._checks import make_problem
from sortpool_ref._simd import VECTOR_BYTES
from sortpool_ref.testing import assert_close, tolerance_scale
from sortpool_ref.testing.strategies import array_of

# name: (geometry keywords, (H, W)); the comment says which paths it hits.
GEOMETRIES = {
    # 2x2 register path only (every window inside the input).
    "2x2": (dict(kernel_size=2), (6, 8)),
    # Register path inside, border paths on the first/last row and column.
    "2x2 p1": (dict(kernel_size=2, padding=1), (5, 7)),
    "2x2 p1 pad=-0.5": (dict(kernel_size=2, padding=1, pad_value=-0.5),
                        (5, 6)),
    # Overlapping windows in both directions (accumulating grad_x).
    "2x2 s1": (dict(kernel_size=2, stride=1), (5, 6)),
    # Dilated register path, plus a ceil_mode border.
    "2x2 s1 d2 ceil": (dict(kernel_size=2, stride=(1, 2), dilation=2,
                            ceil_mode=True), (6, 7)),
    # 3x3 register path inside, tile path on the padded border: overlapping
    # windows with absent / valued padding.
    "3x3 s2 p1": (dict(kernel_size=3, stride=2, padding=1), (7, 9)),
    "3x3 s2 p1 pad=0": (dict(kernel_size=3, stride=2, padding=1,
                             pad_value=0.0), (6, 7)),
    # 3x3 register path only: dilated and overlapping in both directions;
    # and non-overlapping (grad_x stored, not accumulated).
    "3x3 s1 d2": (dict(kernel_size=3, stride=1, dilation=2), (7, 8)),
    "3x3 s3": (dict(kernel_size=3, stride=3), (6, 9)),
    # Stride 2 without padding on an even width: the first window starts
    # at column 0 and the last column belongs to no window (the columns
    # the backward zeroes around its first-write stores).
    "3x3 s2": (dict(kernel_size=3, stride=2), (7, 8)),
    # Windows that reach past the padding (ceil_mode): absent positions
    # next to valued padding.
    "3x3 s2 p1 ceil pad=-0.5": (dict(kernel_size=3, stride=2, padding=1,
                                     ceil_mode=True, pad_value=-0.5),
                                (6, 8)),
    # Tile path, generic: non-square kernel, dilation, 'same' padding.
    "2x3 same": (dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1),
                      padding="same"), (5, 8)),
}

VALUES = ("distinct", "ties", "special")


def _problem(x, w, layout, geo):
    return make_problem(x.shape, x.dtype, w.shape, w.dtype, layout=layout,
                        **geo)


def _weights(rng, channels, k, per_channel):
    return rng.normal(size=(channels, k) if per_channel else (k,))


def _compare(x, w, p, gy, what=""):
    dtype = p.dtype
    y = engine.forward(x, w, p)
    assert_close(y, reference.forward(x, w, p), dtype,
                 tolerance_scale("y", x, w, weighting=p.weighting),
                 f"y {what}")
    gx, gw = engine.backward(gy, x, w, p)
    gx_ref, gw_ref = reference.backward(gy, x, w, p)
    assert gx.shape == x.shape and gw.shape == w.shape
    assert_close(gx, gx_ref, dtype,
                 tolerance_scale("grad_x", x, w, gy, p.weighting,
                                 p.geometry.window_size), f"grad_x {what}")
    assert_close(gw, gw_ref, dtype,
                 tolerance_scale("grad_w", x, w, gy, p.weighting),
                 f"grad_w {what}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_paths_match_reference(name, layout, dtype):
    # 5 channels: not a multiple of any vector width (the loop forms).
    _check_geometry(name, layout, dtype, channels=5, seed=0)


def _check_geometry(name, layout, dtype, channels, seed):
    """GEOMETRIES[name] with every kind of values, every pool_range, both
    weight shapes and both weightings, against the reference."""
    geo, (height, width) = GEOMETRIES[name]
    shape = ((2, height, width, channels) if layout == "NHWC"
             else (2, channels, height, width))
    window = np.prod(np.broadcast_to(geo["kernel_size"], 2))
    for values, k, per_channel in itertools.product(
            VALUES, range(1, window + 1), (False, True)):
        seed += 1
        rng = np.random.default_rng(seed)
        x = array_of(values, shape, dtype, seed)
        w = _weights(rng, channels, k, per_channel)
        for weighting in ("softmax", "raw"):
            p = _problem(x, w, layout, dict(geo, weighting=weighting))
            gy = array_of("normal", p.out_shape, dtype, seed + 1)
            _compare(x, w, p, gy, f"{name} {values} k={k} "
                     f"per_channel={per_channel} {weighting}")


def _all_windows_2x2():
    """Every 2x2 window over a pool of special values, one window per
    output position: ranks of NaN, +-inf, -0.0 vs +0.0 and ties."""
    pool = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0])
    combos = np.array(list(itertools.product(range(len(pool)), repeat=4)))
    vals = pool[combos]  # (1296, 4) in scan order
    return vals


def test_unsort9_moves_ranks_back():
    """_unsort9 replays the network's swaps in reverse: given the swaps of
    distinct values and the ranks 0-8 in sorted order, it gives each
    position its own rank (every order of 9 values is a permutation, so a
    sample of 2000 of them and the 9 rotations of one)."""
    rng = np.random.default_rng(7)
    orders = [rng.permutation(9) for _ in range(2000)]
    orders += [np.roll(np.arange(9), r) for r in range(9)]
    for order in orders:
        values = order.astype(np.float64)
        sorted_values, swaps = engine._sort9_swaps.py_func(*values)
        assert list(sorted_values) == sorted(values, reverse=True)
        ranks = engine._unsort9.py_func(swaps, *map(float, range(9)))
        want = (8 - order).astype(np.float64)  # value 8 ranks 0
        np.testing.assert_array_equal(ranks, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("across", ["channels", "columns"])
def test_2x2_register_path_every_special_window(across, layout, dtype):
    """All 6**4 windows of special values, laid out along the vectorised
    axis of either layout (channels or output columns)."""
    vals = _all_windows_2x2().astype(dtype)
    nw = vals.shape[0]
    if across == "channels":
        nhwc = vals.T.reshape(1, 2, 2, nw)
    else:
        nhwc = vals.reshape(1, nw, 2, 2).transpose(0, 2, 1, 3).reshape(
            1, 2, 2 * nw, 1)
    x = np.ascontiguousarray(nhwc if layout == "NHWC"
                             else nhwc.transpose(0, 3, 1, 2))
    channels = x.shape[3] if layout == "NHWC" else x.shape[1]
    rng = np.random.default_rng(1)
    for k in range(1, 5):
        w = rng.normal(size=(k,))
        p = _problem(x, w, layout, dict(kernel_size=2))
        gy = array_of("normal", p.out_shape, dtype, k)
        _compare(x, w, p, gy, f"k={k}")
        wc = _weights(rng, channels, k, True)
        p = _problem(x, wc, layout, dict(kernel_size=2))
        _compare(x, wc, p, gy, f"k={k} per-channel")


def test_sort9_networks_sort():
    """The three written-out copies of the 25-comparator network
    (NaN-free, NaN-free with its swap masks, NaN-aware) and the network
    of merges that the forwards keeping 1-3 ranks use sort every input:
    by the 0-1 principle it is enough that they sort all 512 sequences of
    0s and 1s. The NaN-aware one also puts NaN on top."""
    for bits in itertools.product((0.0, 1.0), repeat=9):
        want = sorted(bits, reverse=True)
        assert list(engine._sort9_nan_free.py_func(*bits)) == want, bits
        assert list(engine._merge9_nan_free.py_func(*bits)) == want, bits
        assert list(engine._sort9_swaps.py_func(*bits)[0]) == want, bits
        assert list(engine._sort9.py_func(*bits)) == want, bits
    rng = np.random.default_rng(4)
    pool = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0, 2.0, -3.0])
    for _ in range(300):
        b = pool[rng.integers(0, len(pool), size=9)]
        got = np.array(engine._sort9.py_func(*b))
        want = np.concatenate([b[np.isnan(b)], np.sort(b[~np.isnan(b)])[::-1]])
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_3x3_register_path_special_windows(layout, dtype):
    """3000 3x3 windows of NaN, +-inf, signed zeros and ties along the
    channels, every pool_range: the network forward with NaN written back
    and the pairwise-rank backward against the reference."""
    rng = np.random.default_rng(6)
    pool = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0, 0.0, 1.0])
    vals = pool[rng.integers(0, len(pool), size=(3000, 9))]
    vals[:8] = pool[:8, None]  # windows of one repeated value
    nhwc = vals.T.reshape(1, 3, 3, -1).astype(dtype)
    x = np.ascontiguousarray(nhwc if layout == "NHWC"
                             else nhwc.transpose(0, 3, 1, 2))
    for k in range(1, 10):
        w = rng.normal(size=(k,))
        for weighting in ("softmax", "raw"):
            p = _problem(x, w, layout, dict(kernel_size=3,
                                             weighting=weighting))
            gy = array_of("normal", p.out_shape, dtype, k)
            _compare(x, w, p, gy, f"k={k} {weighting}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("padding", [0, 1])
def test_3x3_special_windows_along_columns(padding, layout, dtype):
    """3x3 stride-2 windows of NaN, +-inf, signed zeros and ties laid out
    along the columns, the vectorised axis of the NCHW forward, with and
    without padded borders, every pool_range."""
    rng = np.random.default_rng(7)
    pool = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0, 0.0, 1.0])
    nhwc = pool[rng.integers(0, len(pool), size=(2, 3, 301, 2))]
    nhwc[0, :, :40] = 1.0  # runs of ties
    nhwc = nhwc.astype(dtype)
    x = np.ascontiguousarray(nhwc if layout == "NHWC"
                             else nhwc.transpose(0, 3, 1, 2))
    for k in range(1, 10):
        w = rng.normal(size=(k,))
        p = _problem(x, w, layout, dict(kernel_size=3, stride=2,
                                         padding=padding))
        gy = array_of("normal", p.out_shape, dtype, k)
        _compare(x, w, p, gy, f"k={k}")


# The geometries of GEOMETRIES whose interior windows take the
# explicit-vector backward when the channels fill whole vectors.
VECTOR_PATHS = ["2x2", "2x2 p1", "2x2 s1", "2x2 s1 d2 ceil", "3x3 s2 p1",
                "3x3 s2 p1 pad=0", "3x3 s1 d2", "3x3 s3", "3x3 s2",
                "3x3 s2 p1 ceil pad=-0.5"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("name", VECTOR_PATHS)
def test_vector_paths_match_reference(name, layout, dtype):
    """test_paths_match_reference for 32 channels, whole vectors of either
    dtype, which the 2x2 and 3x3 register paths run in explicit vectors
    (engine._windows_3x3_simd, engine._windows_2x2_simd, the forwards)."""
    assert 32 % (VECTOR_BYTES // np.dtype(dtype).itemsize) == 0
    _check_geometry(name, layout, dtype, channels=32, seed=100)


def _forward_forms(x, w, p, monkeypatch, what):
    """engine.forward with the explicit vectors off, then on
    (engine._FORWARD_VECTORS, left on): the reference's y and the same
    bits from both. Returns y."""
    ys = []
    for vectors in (False, True):
        monkeypatch.setattr(engine, "_FORWARD_VECTORS", vectors)
        ys.append(engine.forward(x, w, p))
    assert_close(ys[1], reference.forward(x, w, p), p.dtype,
                 tolerance_scale("y", x, w), what)
    assert _bits(ys[0]) == _bits(ys[1]), what
    return ys[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("name", VECTOR_PATHS)
def test_forward_forms_give_the_same_bits(name, layout, dtype, monkeypatch):
    """The forward's register paths in explicit vectors and in loops over
    channels (engine._forward_vectors picks the vectors,
    engine._FORWARD_VECTORS forces one): on whole vectors of channels,
    every kind of values and every pool_range, both give the reference's
    y and the same bits. NCHW reaches them for 3x3 windows keeping 6 ranks
    or more in float32, any number in float64 (the forward by blocks of
    channels, one vector each here)."""
    geo, (height, width) = GEOMETRIES[name]
    channels = 2 * (VECTOR_BYTES // np.dtype(dtype).itemsize)
    shape = ((2, height, width, channels) if layout == "NHWC"
             else (2, channels, height, width))
    monkeypatch.setattr(engine, "_SCRATCH_BYTES", 1)
    window = np.prod(np.broadcast_to(geo["kernel_size"], 2))
    for seed, (values, k) in enumerate(itertools.product(
            VALUES, range(1, window + 1))):
        x = array_of(values, shape, dtype, 200 + seed)
        w = _weights(np.random.default_rng(seed), channels, k, seed % 2 == 1)
        p = _problem(x, w, layout, geo)
        _forward_forms(x, w, p, monkeypatch, f"{name} {values} k={k}")


def _backward_settings(gy, x, w, p, monkeypatch, name, settings, what):
    """engine.backward with the engine's attribute name set to each of
    settings in turn (left at the last): the reference's gradients from
    the last, the same bits from all. Returns the last (grad_x, grad_w).
    """
    grads = []
    for setting in settings:
        monkeypatch.setattr(engine, name, setting)
        grads.append(engine.backward(gy, x, w, p))
    gx, gw = grads[-1]
    gx_ref, gw_ref = reference.backward(gy, x, w, p)
    assert_close(gx, gx_ref, p.dtype,
                 tolerance_scale("grad_x", x, w, gy, p.weighting,
                                 p.geometry.window_size), what)
    assert_close(gw, gw_ref, p.dtype,
                 tolerance_scale("grad_w", x, w, gy, p.weighting), what)
    for other_gx, other_gw in grads[:-1]:
        assert _bits(other_gx) == _bits(gx), what
        assert _bits(other_gw) == _bits(gw), what
    return gx, gw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", VECTOR_PATHS)
def test_backward_prefetching_gives_the_same_bits(name, dtype, monkeypatch):
    """The NHWC backward prefetches only for data larger than
    engine._PREFETCH_FROM_BYTES, which these small tensors are not (the
    3x3 register path has a window loop of its own for it): forced on,
    it gives the reference's gradients and the same bits as without,
    for every kind of values and every pool_range."""
    geo, (height, width) = GEOMETRIES[name]
    channels = 2 * (VECTOR_BYTES // np.dtype(dtype).itemsize)
    assert 3 * 2 * height * width * channels * 8 < engine._PREFETCH_FROM_BYTES
    window = np.prod(np.broadcast_to(geo["kernel_size"], 2))
    for seed, (values, k) in enumerate(itertools.product(
            VALUES, range(1, window + 1))):
        x = array_of(values, (2, height, width, channels), dtype, 300 + seed)
        w = _weights(np.random.default_rng(seed), channels, k, seed % 2 == 1)
        p = _problem(x, w, "NHWC", geo)
        gy = array_of("normal", p.out_shape, dtype, 400 + seed)
        _backward_settings(gy, x, w, p, monkeypatch, "_PREFETCH_FROM_BYTES",
                           (1 << 62, 0), f"{name} {values} k={k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("special", ["tie", "nan", "signed zeros"])
def test_3x3_vector_path_mixed_blocks(special, dtype):
    """One window whose first vectors of channels are distinct (kept
    values found by comparing values) and whose last one holds a tie at
    the top, a NaN, or -0.0 next to +0.0 at the top (ranks from the
    pairwise comparisons): each block takes its own path, and the
    window's grad_x and grad_w are the reference's. Positive values and
    grad_y, so a block written twice or weighted by the wrong path moves
    grad_x far beyond the tolerance."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    channels = 4 * lanes
    x = array_of("distinct", (1, 9, 9, channels), dtype, 31)
    x = x - x.min() + dtype(1.0)
    c = channels - 1  # in the last vector
    # Window (2, 2) covers rows and columns 3-5 (stride 2, padding 1).
    top = x[0, 3:6, 3:6, c].max()
    if special == "tie":
        x[0, 3, 3, c] = x[0, 5, 5, c] = top + 1
    elif special == "nan":
        x[0, 4, 4, c] = np.nan
    else:
        x[0, 3:6, 3:6, c] = -1.0
        x[0, 3, 4, c] = -0.0
        x[0, 5, 3, c] = 0.0
    for k in (1, 2, 4, 9):
        w = np.random.default_rng(k).normal(size=(k,))
        p = _problem(x, w, "NHWC", dict(kernel_size=3, stride=2, padding=1))
        gy = np.abs(array_of("normal", p.out_shape, dtype, k)) + 0.5
        _compare(x, w, p, gy.astype(dtype), f"k={k}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("kernel", [2, 3])
def test_weight_gradient_blocks(kernel, layout, dtype):
    """The weight gradient's products are summed in blocks of at most
    engine._BLOCK windows before they go into float64 (consecutive windows
    of an output row in NHWC, consecutive output rows of a column in the
    NCHW 2x2 kernel). 75 x 75 output windows cross several block ends
    inside a row and a column. Positive values and grad_y make every
    product positive, so a block lost or added twice moves the weight
    gradient by far more than the tolerance."""
    assert engine._BLOCK < 75
    size = 2 * 75 + 1
    shape = ((2, size, size, 3) if layout == "NHWC"
             else (2, 3, size, size))
    x = array_of("distinct", shape, dtype, 21)
    x = x - x.min() + dtype(1.0)
    geo = (dict(kernel_size=2) if kernel == 2
           else dict(kernel_size=3, stride=2, padding=1))
    rng = np.random.default_rng(22)
    for k in ((1, 2, 4) if kernel == 2 else (1, 2, 4, 9)):
        w = rng.normal(size=(k,))
        for weighting in ("softmax", "raw"):
            p = _problem(x, w, layout, dict(geo, weighting=weighting))
            gy = np.abs(array_of("normal", p.out_shape, dtype, k)) + 0.5
            _compare(x, w, p, gy.astype(dtype), f"k={k} {weighting}")


def test_weight_tables_follow_the_weights():
    """The engine keeps the tables of the last few weights
    (engine._tables): weights changed in place, the same values in another
    dtype, shape or weighting, and another channel count or dtype of x
    each get their own, so no call sees another's tables."""
    rng = np.random.default_rng(23)
    x = array_of("distinct", (2, 6, 8, 4), np.float64, 23)

    def run(x, w, **kw):
        p = _problem(x, w, "NHWC", dict(kernel_size=2, **kw))
        gy = array_of("normal", p.out_shape, x.dtype, 24)
        y = engine.forward(x, w, p)
        gx, gw = engine.backward(gy, x, w, p)
        _compare(x, w, p, gy, str(kw))
        return y, gx, gw

    w = np.array([0.3, -1.2])
    first = run(x, w)
    w[:] = [-1.2, 0.3]  # same bytes in another order: another key
    second = run(x, w)
    assert not np.array_equal(first[0], second[0])
    w[:] = [0.3, -1.2]
    again = run(x, w)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    run(x, w.astype(np.float32))
    run(x, np.tile(w, (4, 1)))
    run(x, w, weighting="raw")
    run(x.astype(np.float32), w)
    run(array_of("distinct", (2, 6, 8, 3), np.float64, 25), w)
    run(x, rng.normal(size=(4, 2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pad_value", [None, 0.0])
def test_tile_path_special_windows(pad_value, dtype):
    """3x3 windows of NaN, +-inf, signed zeros and ties with zero padding
    that ties with real zeros: the tile path's stable insertion."""
    rng = np.random.default_rng(5)
    pool = np.array([np.nan, np.inf, -np.inf, 1.0, 0.0, -0.0, 0.0, 1.0])
    x = pool[rng.integers(0, len(pool), size=(3, 7, 7, 19))].astype(dtype)
    for k in (1, 2, 3, 5, 9):
        w = rng.normal(size=(k,))
        p = _problem(x, w, "NHWC", dict(kernel_size=3, stride=2, padding=1,
                                         pad_value=pad_value))
        gy = array_of("normal", p.out_shape, dtype, k)
        _compare(x, w, p, gy, f"k={k}")


@pytest.mark.parametrize("memory", ["NCHW", "NHWC", "strided"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_memory_orders(layout, memory):
    """The engine picks its kernels from the memory order of x; any order
    gives the reference's numbers, in the layout asked for."""
    base = array_of("ties", (2, 6, 10, 8), np.float32, 3)  # NHWC data
    if memory == "strided":
        data = base[:, :, ::2, :]
    elif memory == "NCHW":
        data = np.ascontiguousarray(base.transpose(0, 3, 1, 2)).transpose(
            0, 2, 3, 1)
    else:
        data = base
    x = data if layout == "NHWC" else data.transpose(0, 3, 1, 2)
    rng = np.random.default_rng(0)
    for geo in (dict(kernel_size=2), dict(kernel_size=3, stride=2,
                                          padding=1)):
        w = rng.normal(size=(3,))
        p = _problem(x, w, layout, geo)
        gy = array_of("normal", p.out_shape, np.float32, 2)
        gy_odd = np.asfortranarray(gy)  # grad_y in yet another order
        _compare(x, w, p, gy_odd, f"{geo}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 5, 16, 19, 37])
def test_layout_copies(channels, dtype):
    """The parallel copies between the two memory orders (16 channels at a
    time, then one at a time) move every element to its place."""
    src = np.random.default_rng(channels).normal(
        size=(2, channels, 5, 7)).astype(dtype)
    nhwc = np.empty((2, 5, 7, channels), dtype)
    engine._nchw_to_nhwc(src, nhwc)
    np.testing.assert_array_equal(nhwc, src.transpose(0, 2, 3, 1))
    back = np.empty_like(src)
    engine._nhwc_to_nchw(nhwc, back)
    np.testing.assert_array_equal(back, src)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("name", ["2x2", "2x2 p1", "3x3 s2 p1", "3x3 s1 d2"])
@pytest.mark.parametrize("channels", [6, 16])
def test_bit_identical_across_calls_and_threads(name, layout, dtype,
                                                channels):
    geo, _ = GEOMETRIES[name]
    # Enough rows for several weight-gradient chunks and parity passes; odd
    # and even sizes (2x2 windows tile the even one: the NCHW backward
    # kernel, and grad_x stored without zeroing). 16 channels: whole
    # vectors (the NCHW backward by blocks of channels).
    for height, width in ((21, 17), (22, 18)):
        shape = ((3, height, width, channels) if layout == "NHWC"
                 else (3, channels, height, width))
        x = array_of("ties", shape, dtype, 11)
        channels = shape[3] if layout == "NHWC" else shape[1]
        w = np.random.default_rng(2).normal(size=(channels, 3))
        p = _problem(x, w, layout, geo)
        gy = array_of("normal", p.out_shape, dtype, 12)
        threads = numba.get_num_threads()
        results = []
        try:
            for n_threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1,
                              numba.config.NUMBA_NUM_THREADS):
                numba.set_num_threads(n_threads)
                y = engine.forward(x, w, p)
                gx, gw = engine.backward(gy, x, w, p)
                results.append((_bits(y), _bits(gx), _bits(gw)))
        finally:
            numba.set_num_threads(threads)
        assert all(r == results[0] for r in results[1:])
        _compare(x, w, p, gy, f"{name} {shape}")


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nchw_2x2_backward_runs_without_copies(dtype, per_channel,
                                               monkeypatch):
    """2x2 stride-2 windows inside an NCHW input (even sizes, and odd ones
    whose last row and column no window covers) take the NCHW backward
    kernel (no channels-last copy), into a fresh array and into out=."""
    def no_copy(*args):
        raise AssertionError("copied to channels-last")

    monkeypatch.setattr(engine, "_nchw_to_nhwc", no_copy)
    monkeypatch.setattr(engine, "_nhwc_to_nchw", no_copy)
    rng = np.random.default_rng(3)
    for values, k, size in itertools.product(VALUES, range(1, 5),
                                             ((6, 10), (7, 11))):
        x = array_of(values, (2, 3) + size, dtype, k)
        w = _weights(rng, 3, k, per_channel)
        p = _problem(x, w, "NCHW", dict(kernel_size=2))
        gy = array_of("normal", p.out_shape, dtype, k)
        _compare(x, w, p, gy, f"{values} k={k}")
        gx = np.full_like(x, np.nan)
        got, _ = engine.backward(gy, x, w, p, out=(gx, None))
        assert got is gx
        np.testing.assert_array_equal(gx, engine.backward(gy, x, w, p)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_nchw_backward_by_channel_blocks(name, dtype, monkeypatch):
    """NCHW backwards other than the 2x2 stride-2 kernel's, with channels
    that fill whole vectors, run by blocks of channels without a
    channels-last copy of any tensor: scratch for one vector of channels
    at a time (three blocks), every kind of values and pool_range, a
    fresh grad_x and an out= one full of NaN, against the reference; bands
    of as few output rows as the windows allow. The widths put columns
    past the last whole transposed tile."""
    def no_copy(*args):
        raise AssertionError("copied to channels-last")

    monkeypatch.setattr(engine, "_SCRATCH_BYTES", 1)
    monkeypatch.setattr(engine, "_BAND_ROWS", 1)
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    channels = 3 * lanes
    geo, (height, width) = GEOMETRIES[name]
    shape = (2, channels, height + lanes, width + lanes + 3)
    window = np.prod(np.broadcast_to(geo["kernel_size"], 2))
    rng = np.random.default_rng(40)
    for seed, (values, k) in enumerate(itertools.product(
            VALUES, sorted({1, 2, window}))):
        x = array_of(values, shape, dtype, seed)
        w = _weights(rng, channels, k, seed % 2 == 1)
        p = _problem(x, w, "NCHW", geo)
        assert engine._channel_block(p) == lanes
        gy = array_of("normal", p.out_shape, dtype, seed + 50)
        # (The forwards of windows other than 2x2 and 3x3 run on a
        # channels-last copy.)
        _compare(x, w, p, gy, f"{values} k={k}")
        with monkeypatch.context() as m:
            m.setattr(engine, "_nchw_to_nhwc", no_copy)
            m.setattr(engine, "_nhwc_to_nchw", no_copy)
            gx = np.full_like(x, np.nan)
            got, gw = engine.backward(gy, x, w, p, out=(gx, None))
            assert got is gx
            fresh, gw_fresh = engine.backward(gy, x, w, p)
            # One block of all channels (more than _PLANE_STREAMS: the
            # moves prefetch rows ahead), one band (the NCHW 2x2 kernel for
            # "2x2"): the same numbers (each channel's sums run in the same
            # order).
            m.setattr(engine, "_SCRATCH_BYTES", 1 << 30)
            m.setattr(engine, "_BAND_ROWS", 1 << 30)
            assert channels > engine._PLANE_STREAMS
            whole, gw_whole = engine.backward(gy, x, w, p)
        for a, b in ((gx, fresh), (gw, gw_fresh), (whole, fresh),
                     (gw_whole, gw_fresh)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nchw_3x3_forward_by_channel_blocks(dtype, monkeypatch):
    """NCHW 3x3 forwards keeping 6 ranks or more (float32) or any number
    (float64), with channels that fill whole vectors, whose rows the
    plane kernel does not run in explicit vectors (a stride other than 2
    or a dilation; forced here for the others too), run by blocks of
    channels (one vector each here: three blocks) without a channels-last
    copy: every 3x3 geometry and kind of values against the reference,
    bit for bit the NHWC forward of the same data (the same row
    function) and the forward by one block of all channels."""
    def no_copy(*args):
        raise AssertionError("copied to channels-last")

    monkeypatch.setattr(engine, "_SCRATCH_BYTES", 1)
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    channels = 3 * lanes
    rng = np.random.default_rng(41)
    names = [name for name in GEOMETRIES if name.startswith("3x3")]
    first = engine._NCHW_BLOCKS_FROM[np.dtype(dtype).itemsize, False]
    # Rows of stride 2 run per plane in explicit vectors at every
    # pool_range (test_nchw_forward_rows_in_vectors); here by blocks too.
    monkeypatch.setitem(engine._NCHW_BLOCKS_FROM,
                        (np.dtype(dtype).itemsize, True), first)
    ks = sorted({k for k in (2, 7, 9) if k >= first} | {first})
    for seed, (name, values, k) in enumerate(itertools.product(
            names, VALUES, ks)):
        geo, (height, width) = GEOMETRIES[name]
        x = array_of(values, (2, channels, height + 2, width + lanes + 3),
                     dtype, seed)
        w = _weights(rng, channels, k, seed % 2 == 1)
        p = _problem(x, w, "NCHW", geo)
        with monkeypatch.context() as m:
            m.setattr(engine, "_nchw_to_nhwc", no_copy)
            m.setattr(engine, "_nhwc_to_nchw", no_copy)
            m.setattr(engine, "_forward_nchw_3x3", no_copy)
            y = engine.forward(x, w, p)
            # One block of all channels (more than _PLANE_STREAMS: the
            # moves prefetch rows ahead): the same numbers.
            m.setattr(engine, "_SCRATCH_BYTES", 1 << 30)
            assert engine._channel_block(p) == channels
            assert channels > engine._PLANE_STREAMS
            assert _bits(engine.forward(x, w, p)) == _bits(y)
        assert_close(y, reference.forward(x, w, p), dtype,
                     tolerance_scale("y", x, w), f"{name} {values} k={k}")
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        y_nhwc = engine.forward(x_nhwc, w, _problem(x_nhwc, w, "NHWC", geo))
        assert _bits(y) == _bits(y_nhwc.transpose(0, 3, 1, 2))


# Geometries whose NCHW forward rows run in explicit vectors (stride 2, no
# dilation), on planes wide enough for two vectors of output columns and a
# remainder: 2x2 inside the input and with padded borders, 3x3 with absent
# and valued padding, without padding, and reaching past it. With absent
# padding, from pool_range 7 the vector rows also take the border windows
# that keep fewer ranks (engine._row_3x3_nchw_edges_simd): on the left and
# top (p1), on the right and bottom ('same'), on both sides (ceil_mode).
ROW_VECTOR_GEOMETRIES = {
    "2x2": dict(kernel_size=2),
    "2x2 p1 pad=-0.5": dict(kernel_size=2, padding=1, pad_value=-0.5),
    "2x2 s(1,2) ceil": dict(kernel_size=2, stride=(1, 2), ceil_mode=True),
    "3x3 s2 p1": dict(kernel_size=3, stride=2, padding=1),
    "3x3 s2 p1 pad=0": dict(kernel_size=3, stride=2, padding=1,
                            pad_value=0.0),
    "3x3 s2": dict(kernel_size=3, stride=2),
    "3x3 s2 same": dict(kernel_size=3, stride=2, padding="same"),
    "3x3 s2 p1 ceil": dict(kernel_size=3, stride=2, padding=1,
                           ceil_mode=True),
    "3x3 s2 p1 ceil pad=-0.5": dict(kernel_size=3, stride=2, padding=1,
                                    ceil_mode=True, pad_value=-0.5),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ROW_VECTOR_GEOMETRIES)
def test_nchw_forward_rows_in_vectors(name, dtype, monkeypatch):
    """The NCHW plane kernels run rows of stride-2 windows in explicit
    vectors of output columns (engine._row_2x2_nchw_simd,
    engine._row_3x3_nchw_simd; the last vector of a row overlaps the one
    before it) and otherwise in loops (engine._FORWARD_VECTORS forces
    one form): for every kind of values and pool_range, on rows of about
    one vector, one and a bit, two, and four and a remainder, and on rows
    narrower than a vector, both forms give the reference's y and the
    same bits, and the NHWC forward's numbers; written into an out=
    array, nothing past its end is touched."""
    geo = ROW_VECTOR_GEOMETRIES[name]
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    window = np.prod(np.broadcast_to(geo["kernel_size"], 2))
    widths = (2 * lanes, 2 * lanes + 2, 4 * lanes + 1, 8 * lanes + 11,
              lanes - 3)
    cases = itertools.product(VALUES, range(1, window + 1), widths)
    for seed, (values, k, width) in enumerate(cases):
        # Three channels: never whole vectors, so never by blocks.
        x = array_of(values, (2, 3, 5, width), dtype, 500 + seed)
        w = _weights(np.random.default_rng(seed), 3, k, seed % 2 == 1)
        p = _problem(x, w, "NCHW", geo)
        what = f"{name} {values} k={k} width={width}"
        y = _forward_forms(x, w, p, monkeypatch, what)
        # Vectors on: nothing written past the end of an out= array.
        tail = np.full(2 * lanes, 7.0, dtype)
        buf = np.concatenate([np.zeros(y.size, dtype), tail])
        engine.forward(x, w, p, out=buf[:y.size].reshape(y.shape))
        assert _bits(buf[:y.size]) == _bits(y), what
        assert _bits(buf[y.size:]) == _bits(tail), what
        # The same numbers as the NHWC forward, whose border windows take
        # another path: a zero result's sign may differ (see
        # docs/numerics.md; the networks are not stable among ties).
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        y_nhwc = engine.forward(x_nhwc, w, _problem(x_nhwc, w, "NHWC", geo))
        np.testing.assert_array_equal(y, y_nhwc.transpose(0, 3, 1, 2), what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nchw_2x2_backward_rows_in_vectors(dtype, monkeypatch):
    """The NCHW 2x2 stride-2 backward runs its rows in explicit vectors of
    output columns (engine._bwd_row_2x2_nchw_simd; the last vector of a
    row overlaps the one before, whose columns' block sums it must not
    add twice) or in loops (engine._BACKWARD_NCHW_VECTORS): for every
    kind of values and pool_range, on rows of one vector, one and one
    column, two, and four and a remainder, with an odd last column and
    row (zeroed), and on rows narrower than a vector, both give the
    reference's gradients and the same bits; written into an out= array,
    nothing past its end is touched."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    widths = (2 * lanes, 2 * lanes + 2, 4 * lanes, 8 * lanes + 6,
              8 * lanes + 5, lanes - 2)
    cases = itertools.product(VALUES, range(1, 5), widths, (6, 7))
    for seed, (values, k, width, height) in enumerate(cases):
        x = array_of(values, (2, 3, height, width), dtype, 600 + seed)
        w = _weights(np.random.default_rng(seed), 3, k, seed % 2 == 1)
        p = _problem(x, w, "NCHW", dict(kernel_size=2))
        gy = array_of("normal", p.out_shape, dtype, 700 + seed)
        what = f"{values} k={k} {height}x{width}"
        gx, _ = _backward_settings(gy, x, w, p, monkeypatch,
                                   "_BACKWARD_NCHW_VECTORS", (False, True),
                                   what)
        # Vectors on: nothing written past the end of an out= array.
        tail = np.full(2 * lanes, 7.0, dtype)
        buf = np.concatenate([np.zeros(x.size, dtype), tail])
        engine.backward(gy, x, w, p,
                        out=(buf[:x.size].reshape(x.shape), None))
        assert _bits(buf[:x.size]) == _bits(gx), what
        assert _bits(buf[x.size:]) == _bits(tail), what



# 3x3 stride-2 geometries of the NCHW backward by planes: absent padding
# (windows that keep -inf from an absent position are redone one by one),
# valued padding, none, 'same' (padding on the right and bottom only) and
# ceil_mode windows past the padding that keep fewer ranks than k.
PLANE_BACKWARD_GEOMETRIES = {
    "3x3 s2 p1": dict(kernel_size=3, stride=2, padding=1),
    "3x3 s2 p1 pad=0": dict(kernel_size=3, stride=2, padding=1,
                            pad_value=0.0),
    "3x3 s2": dict(kernel_size=3, stride=2),
    "3x3 s2 same": dict(kernel_size=3, stride=2, padding="same"),
    "3x3 s2 p1 ceil": dict(kernel_size=3, stride=2, padding=1,
                           ceil_mode=True),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", PLANE_BACKWARD_GEOMETRIES)
def test_nchw_3x3_backward_by_planes(name, dtype, monkeypatch):
    """The NCHW 3x3 stride-2 backward for pool_range 1-4 runs one plane per
    task (engine._backward_nchw_3x3) where a row has a vector of output
    columns and of column pairs: for every kind of values (and inputs
    full of -inf, whose windows are redone one by one), every pool_range,
    shared and per-channel weights, rows of one vector, one and a bit and
    several with odd widths, it gives the reference's gradients and the
    NHWC kernels' numbers (to rounding: grad_x adds the overlapping
    windows' shares in another order), the same bits on a second call,
    and the same bits written into an out= array full of NaN, with
    nothing past its end touched, and with one thread."""
    geo = PLANE_BACKWARD_GEOMETRIES[name]
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    calls = []
    planes = engine._backward_nchw_3x3

    def counted(*args):
        calls.append(args)
        return planes(*args)

    monkeypatch.setattr(engine, "_backward_nchw_3x3", counted)
    widths = (2 * lanes, 2 * lanes + 1, 2 * lanes + 3, 4 * lanes + 5,
              8 * lanes + 2)
    cases = itertools.product(VALUES + ("-inf",), range(1, 5), widths)
    for seed, (values, k, width) in enumerate(cases):
        height = 5 + seed % 3
        shape = (2, 3, height, width)
        if values == "-inf":
            x = array_of("ties", shape, dtype, 800 + seed)
            x[np.random.default_rng(seed).random(shape) < 0.4] = -np.inf
        else:
            x = array_of(values, shape, dtype, 800 + seed)
        w = _weights(np.random.default_rng(seed), 3, k, seed % 2 == 1)
        p = _problem(x, w, "NCHW", geo)
        gy = array_of("normal", p.out_shape, dtype, 900 + seed)
        what = f"{name} {values} k={k} {height}x{width}"
        before = len(calls)
        gx, gw = engine.backward(gy, x, w, p)
        # (Without padding a row of 2 lanes columns has lanes - 1 windows.)
        by_planes = p.geometry.out_w >= lanes
        assert len(calls) == before + by_planes, what
        gx_ref, gw_ref = reference.backward(gy, x, w, p)
        scale_x = tolerance_scale("grad_x", x, w, gy, p.weighting,
                                  p.geometry.window_size)
        scale_w = tolerance_scale("grad_w", x, w, gy, p.weighting)
        assert_close(gx, gx_ref, dtype, scale_x, what)
        assert_close(gw, gw_ref, dtype, scale_w, what)
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        gx_nhwc, gw_nhwc = engine.backward(
            np.ascontiguousarray(gy.transpose(0, 2, 3, 1)), x_nhwc, w,
            _problem(x_nhwc, w, "NHWC", geo))
        assert_close(gx, gx_nhwc.transpose(0, 3, 1, 2), dtype, scale_x, what)
        assert_close(gw, gw_nhwc, dtype, scale_w, what)
        again, gw_again = engine.backward(gy, x, w, p)
        assert _bits(again) == _bits(gx) and _bits(gw_again) == _bits(gw)
        tail = np.full(2 * lanes, 7.0, dtype)
        buf = np.concatenate([np.full(x.size, np.nan, dtype), tail])
        engine.backward(gy, x, w, p,
                        out=(buf[:x.size].reshape(x.shape), None))
        assert _bits(buf[:x.size]) == _bits(gx), what
        assert _bits(buf[x.size:]) == _bits(tail), what
    assert len(calls) >= len(widths) * 4 * (len(VALUES) + 1) - 16
    # One thread: the same bits (one task per plane, each in a fixed
    # order).
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, gw_one = engine.backward(gy, x, w, p)
    finally:
        numba.set_num_threads(threads)
    assert _bits(one) == _bits(gx) and _bits(gw_one) == _bits(gw)
    # Narrow rows, pool_range 5-9 and the planes switched off go the other
    # ways.
    for width, k, on in ((2 * lanes - 2, 2, True), (2 * lanes, 5, True),
                         (2 * lanes, 2, False)):
        monkeypatch.setattr(engine, "_BACKWARD_NCHW_VECTORS", on)
        x = array_of("distinct", (1, 3, 5, width), dtype, 1)
        w = np.ones(k)
        p = _problem(x, w, "NCHW", geo)
        before = len(calls)
        engine.backward(np.ones(p.out_shape, dtype), x, w, p)
        assert len(calls) == before, (width, k, on)

def test_channel_block_sizes():
    """The most whole vectors that divide the channels and fit the
    scratch budget; at least one vector; 0 without whole vectors."""
    def block(channels, height, width, dtype=np.float32):
        x_shape = (1, channels, height, width)
        w = np.ones(2)
        p = make_problem(x_shape, dtype, w.shape, w.dtype, layout="NCHW",
                         kernel_size=3, stride=2, padding=1)
        return engine._channel_block(p)

    budget = engine._SCRATCH_BYTES
    lanes = VECTOR_BYTES // 4
    side = int((budget // (4 * 2 * lanes)) ** 0.5)  # two vectors fit
    assert block(8 * lanes, side, side) == 2 * lanes
    assert block(3 * lanes, side, side) == lanes  # 2 does not divide 3
    assert block(lanes, 4 * side, 4 * side) == lanes
    assert block(4 * lanes, 2, 2) == 4 * lanes
    assert block(lanes + 1, 2, 2) == 0
    assert block(0, 2, 2) == 0
    assert block(8 * (VECTOR_BYTES // 8), 2, 2, np.float64) == 64
