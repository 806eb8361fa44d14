"""The explicit vectors of the Numba engine (sortpool_ref/_simd.py) against
NumPy, lane by lane, with NaN, infinities and signed zeros: each operation
must be the IEEE operation Python floats do, since the kernels' NaN and
tie rules rest on them."""

import numpy as np
import pytest
from numba import njit

from sortpool_ref._simd import (VECTOR_BYTES, any_lane, full, lanes, load,
                                load_pairs, prefetch, prefetch_write, select,
                                store, store_pairs, transpose, zeros)

POOL = np.array([np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0, -0.0, 2.5, 1e-30])


@njit
def _lanes_ops(a, b, i, out):
    """out rows: a + b, a * b, select(a < b), select(a == b),
    select(a != b), select(a < b | a == b, a, b), zeros, select(a >= b),
    full(-2.5); returns any_lane of a < b and of a != a, for the vectors
    at flat index i."""
    va = load(a, i)
    vb = load(b, i)
    zero = zeros(a)
    lanes = VECTOR_BYTES // a.itemsize
    store(out, 0 * lanes, va + vb)
    store(out, 1 * lanes, va * vb)
    store(out, 2 * lanes, select(va < vb, va, zero))
    store(out, 3 * lanes, select(va == vb, va, zero))
    store(out, 4 * lanes, select(va != vb, va, zero))
    m = va < vb
    m |= va == vb
    store(out, 5 * lanes, select(m, va, vb))
    store(out, 6 * lanes, zero)
    store(out, 7 * lanes, select(va >= vb, va, zero))
    store(out, 8 * lanes, full(a, -2.5))
    return any_lane(va < vb), any_lane(va != va)


@njit
def _steps(a):
    """lanes(a), and the starts of a loop stepping by it over a."""
    return lanes(a), [i for i in range(0, a.size, lanes(a))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lanes_is_the_vector_width(dtype):
    a = np.zeros(100, dtype)
    per_vector = VECTOR_BYTES // np.dtype(dtype).itemsize
    n, starts = _steps(a)
    assert n == per_vector == {np.float32: 16, np.float64: 8}[dtype]
    assert starts == list(range(0, 100, per_vector))


@njit
def _scalar_select(s, a, b):
    return select(s, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_operations_are_the_ieee_ones(dtype):
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    for trial in range(50):
        # Offsets 0..3: loads and stores need no alignment.
        i = trial % 4
        a = POOL[rng.integers(0, len(POOL), size=lanes + 4)].astype(dtype)
        b = POOL[rng.integers(0, len(POOL), size=lanes + 4)].astype(dtype)
        if trial % 5 == 0:
            b = a.copy()  # every lane a tie (NaN == NaN stays false)
        out = np.full(9 * lanes, 7.0, dtype)
        lt_any, nan_any = _lanes_ops(a, b, i, out)
        va, vb = a[i:i + lanes], b[i:i + lanes]
        rows = out.reshape(9, lanes)
        zero = np.zeros(lanes, dtype)
        with np.errstate(invalid="ignore", over="ignore"):
            want = [va + vb, va * vb, np.where(va < vb, va, zero),
                    np.where(va == vb, va, zero),
                    np.where(va != vb, va, zero),
                    np.where((va < vb) | (va == vb), va, vb), zero,
                    np.where(va >= vb, va, zero),
                    np.full(lanes, -2.5, dtype)]
        for got, exp in zip(rows, want):
            # Bit for bit: signed zeros and NaN included.
            np.testing.assert_array_equal(got.view(f"u{a.itemsize}"),
                                          exp.view(f"u{a.itemsize}"))
        assert lt_any == bool(np.any(va < vb))
        assert nan_any == bool(np.any(np.isnan(va)))


def test_select_of_scalars_is_the_conditional_expression():
    assert _scalar_select(True, 1.0, 2.0) == 1.0
    assert _scalar_select(False, 1.0, 2.0) == 2.0


@njit
def _transpose(src, i, src_step, dst, j, dst_step):
    transpose(src, i, src_step, dst, j, dst_step)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_moves_a_tile(dtype):
    """A lanes x lanes tile at any offset and row steps, transposed into
    another array bit for bit (NaN payloads and signed zeros included);
    everything outside the target tile is left alone."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(1)
    uint = f"u{np.dtype(dtype).itemsize}"
    for i, src_step, j, dst_step in ((0, lanes, 0, lanes),
                                     (3, lanes + 5, 7, 2 * lanes + 1),
                                     (11, 3 * lanes, 1, lanes + 2)):
        # Random bit patterns over the whole width, and in the tile a NaN
        # with a payload, -inf and -0.0.
        bits = rng.integers(0, np.iinfo(uint).max, endpoint=True,
                            size=i + lanes * src_step, dtype=uint)
        bits[i + 1] = 0x7FC00123 if uint == "u4" else 0x7FF8000000000123
        src = bits.view(dtype)
        src[i] = -0.0
        src[i + src_step + 2] = -np.inf
        dst = np.full(j + lanes * dst_step, 7.0, dtype)
        _transpose(src, i, src_step, dst, j, dst_step)
        tile = np.lib.stride_tricks.as_strided(
            src[i:], (lanes, lanes), (src_step * src.itemsize, src.itemsize))
        want = np.full_like(dst, 7.0)
        np.lib.stride_tricks.as_strided(
            want[j:], (lanes, lanes),
            (dst_step * dst.itemsize, dst.itemsize))[...] = tile.T
        np.testing.assert_array_equal(dst.view(uint), want.view(uint))


@njit
def _pairs(src, i, dst, j):
    """load_pairs at src.flat[i], the two vectors stored at dst.flat[j]
    and dst.flat[j + lanes], then stored back interleaved by store_pairs
    at dst.flat[j + 2 lanes]."""
    even, odd = load_pairs(src, i)
    store(dst, j, even)
    store(dst, j + lanes(dst), odd)
    store_pairs(dst, j + 2 * lanes(dst), even, odd)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairs_split_and_interleave(dtype):
    """load_pairs splits 2 lanes elements at any offset into the even and
    the odd ones, store_pairs interleaves them back, bit for bit (NaN
    payloads, signed zeros); nothing else is written."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    uint = f"u{np.dtype(dtype).itemsize}"
    rng = np.random.default_rng(2)
    for i, j in ((0, 0), (3, 5), (1, 2 * lanes + 1)):
        bits = rng.integers(0, np.iinfo(uint).max, endpoint=True,
                            size=i + 2 * lanes + 3, dtype=uint)
        bits[i + 1] = 0x7FC00123 if uint == "u4" else 0x7FF8000000000123
        src = bits.view(dtype)
        src[i + 2] = -0.0
        dst = np.full(j + 4 * lanes + 2, 7.0, dtype)
        _pairs(src, i, dst, j)
        run = src[i:i + 2 * lanes]
        want = np.full_like(dst, 7.0)
        want[j:j + lanes] = run[0::2]
        want[j + lanes:j + 2 * lanes] = run[1::2]
        want[j + 2 * lanes:j + 4 * lanes] = run
        np.testing.assert_array_equal(dst.view(uint), want.view(uint))


@njit
def _mask_logic(a, b, out):
    """out rows: a where (a < b) & (a == a), where ~(a >= b), where
    ~(a == a) | (a < b); 0 elsewhere."""
    va = load(a, 0)
    vb = load(b, 0)
    zero = zeros(a)
    store(out, 0, select((va < vb) & (va == va), va, zero))
    store(out, lanes(a), select(~(va >= vb), va, zero))
    store(out, 2 * lanes(a), select(~(va == va) | (va < vb), va, zero))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_logic(dtype):
    """&, ~ and | of masks, lane by lane, as NumPy's on the comparisons
    (NaN compares false, so ~(a >= b) holds where either is NaN)."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = POOL[rng.integers(0, len(POOL), size=lanes)].astype(dtype)
        b = POOL[rng.integers(0, len(POOL), size=lanes)].astype(dtype)
        out = np.full(3 * lanes, 7.0, dtype)
        _mask_logic(a, b, out)
        zero = np.zeros(lanes, dtype)
        with np.errstate(invalid="ignore"):
            want = [np.where((a < b) & (a == a), a, zero),
                    np.where(~(a >= b), a, zero),
                    np.where(~(a == a) | (a < b), a, zero)]
        uint = f"u{a.itemsize}"
        for got, exp in zip(out.reshape(3, lanes), want):
            np.testing.assert_array_equal(got.view(uint), exp.view(uint))


@njit
def _prefetched_sum(a, ahead):
    """The sum of a, asking ahead elements on for each one, past the end
    as well, in both prefetch forms."""
    s = 0.0
    for i in range(a.size):
        prefetch(a, i + ahead)
        prefetch_write(a, i - ahead)
        s += a[i]
    return s


def test_prefetch_is_only_a_hint():
    """Prefetches change nothing and never fault, even far outside the
    array (the 3x3 backward asks for windows past a row's last one); the
    compiled code holds the prefetch instructions, so the hint is not
    dropped on the way."""
    a = np.arange(1000, dtype=np.float32)
    before = a.copy()
    for ahead in (0, 16, 1 << 30):
        assert _prefetched_sum(a, ahead) == before.sum(dtype=np.float64)
    np.testing.assert_array_equal(a, before)
    asm = _prefetched_sum.inspect_asm(_prefetched_sum.signatures[0])
    assert "prefetch" in asm or "prfm" in asm  # x86 or Arm
