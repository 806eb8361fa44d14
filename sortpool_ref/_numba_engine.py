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

* register paths, NHWC: windows of a 2x2 or a 3x3 kernel (any stride and
  dilation) that lie entirely inside the input, innermost loop over the
  channels. The forward sorts the 4 or 9 values with a compare-exchange
  network (5 or 25 comparators) and writes NaN where a window holds one;
  the backward ranks each position by its pairwise comparisons (stable by
  construction) and picks its weight from a zero-padded table.
* explicit vectors (sortpool_ref/_simd.py), NHWC forward and backward: the same
  windows when the channels fill whole 64-byte vectors (a multiple of 16
  float32 or 8 float64), one window per block of channels in registers,
  indexed flat into whole arrays. Bit-identical to the loop forms; the
  point is that no array view is made per window (each view costs an
  atomic reference-count increment and decrement).
* NCHW forward, 2x2 and 3x3: one (sample, channel) plane per task,
  innermost loop over the output columns. The 2x2 kernel reads the
  windows inside the input with a literal stride; the 3x3 kernel copies
  each input row into a padded scratch row (pad_value in the padding, -inf
  for absent positions) so that every window of a row is one vectorised
  loop, and redoes one by one, from the padded rows and with the same
  network, the windows that keep fewer ranks than pool_range. Rows of
  stride 2 without dilation run in explicit vectors of output columns
  (_simd.load_pairs splits two vectors of a row into the windows' even
  and odd columns), from pool_range 7 those windows included (each
  column's weights for its window's rank count). Other 3x3 rows (other
  strides, dilation, fewer windows than a vector), with channels that
  fill whole vectors, run by
  blocks of channels instead, as the backward below, for float32
  pool_range 6-9 and float64 every pool_range (_NCHW_BLOCKS_FROM).
* channel tile path, NHWC: every other window, any geometry, padding and
  ``pad_value``. Which positions of a window are real, padded or absent is
  the same for every channel, so the window's top-k is built by insertion
  into a small (pool_range, C) scratch tile with whole-channel-vector
  compare-exchanges.
* scalar path: the per-window, per-channel insertion used for the border
  windows of the NCHW 2x2 kernel (and NCHW 3x3 windows with no position
  present, should a geometry have them).
* NCHW backward, 2x2 stride 2 with every window inside the input: one
  (sample, channel) plane per task, innermost loop over the output columns,
  in explicit vectors of them (_simd.load_pairs and store_pairs) where a row
  fills at least one. Its grad_w is summed in another order than the NHWC
  kernel's (equal to rounding); y and grad_x are bit-identical across
  layouts.
* The NCHW plane kernels above (forwards, backwards) prefetch the rows of
  the output row _NCHW_ROWS_AHEAD rows ahead.
* NCHW backward, 3x3 stride 2 without dilation, pool_range 1-4, rows of at
  least a vector of windows and of column pairs: one plane per task
  (_backward_nchw_3x3), each output row's windows in explicit vectors from
  the forward's padded rows into scratch rows of per-window shares, from
  which grad_x's rows are stored (nothing is added into grad_x); windows
  that keep an absent position (or tie with one) are redone one by one.
  grad_x and grad_w add their shares in another order than the NHWC
  kernels (equal to rounding).
* NCHW backward, every other geometry, where the channels fill whole
  64-byte vectors: one task per sample and block of channels moves the
  block's planes of x and grad_y into channels-last scratch (tiles
  transposed in registers, _simd.transpose), runs the NHWC backward's row
  function on it and moves grad_x back; the scratch stays in cache.
* NCHW forwards of geometries other than 2x2 and 3x3, and NCHW backwards
  whose channels do not fill whole vectors, run the NHWC kernels on a
  channels-last copy.

Indices in the hot loops count up from 0 (rows are sliced first): Numba
wraps an index it cannot prove non-negative around per element, as Python
does for negative indices, and that select kept the NCHW loops at about
3x their present time.

Compile time: helpers are plain ``@njit`` functions that LLVM inlines, not
``inline="always"`` (Numba-level inlining made each kernel several times
slower to compile), except in the backward bodies, where LLVM left some of
them as calls. The forward row functions are compiled once per literal
pool_range (``numba.literally``), so that the sorting network's unused
outputs are removed; each specialisation is a separate function. Each
kind of window (2x2, 3x3, tile path only) has an NHWC backward kernel of
its own, and each kind and pool_range an NHWC forward kernel
(_nhwc_backward, _nhwc_forward), so that a first call compiles little
more than the code it runs.

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
sums are float64, one slot per chunk (and channel), or per plane for the
NCHW backwards, reduced in a fixed order afterwards. The register paths
and the NCHW 2x2 backward first sum the products in the input's dtype
over blocks of at most _BLOCK windows (consecutive windows of one output
row in NHWC, consecutive output rows of one column in NCHW) and add each
block's sum into the float64 slot: a float64 add per window cost the 2x2
backward 5-15% of its time. Results are therefore bit-identical whatever
the thread count.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
from numba import get_num_threads, literally, njit, prange
from numba.core import types
from numba.extending import overload

from ._checks import Problem, softmax_table, weight_grad_from_partials
from ._simd import (VECTOR_BYTES, any_lane, full, lanes, load, load_pairs,
                    prefetch, prefetch_write, select, store, store_pairs,
                    transpose, zeros)


# --------------------------------------------------------------------------
# Ranking primitives
# --------------------------------------------------------------------------

@njit
def _ranks_above(a, b):
    """Whether value a takes a strictly higher rank than b (NaN on top)."""
    return a > b or (a != a and b == b)


@njit(inline="always")
def _sort4(a0, a1, a2, a3):
    """The 4 values in decreasing rank order (values only, NaN on top): the
    compare-exchanges of _sort4_nan_free, each swapping a (earlier) and b
    when b ranks above a, ``(a == a) & ~(a >= b)``: false when a is NaN,
    else true unless a >= b (false when b is NaN): the branch-free form of
    ``_ranks_above(b, a)``, written out in every compare-exchange.
    Scalars or _simd vectors."""
    s = (a0 == a0) & ~(a0 >= a1)
    a0, a1 = _swap(s, a0, a1)
    s = (a2 == a2) & ~(a2 >= a3)
    a2, a3 = _swap(s, a2, a3)
    s = (a0 == a0) & ~(a0 >= a2)
    a0, a2 = _swap(s, a0, a2)
    s = (a1 == a1) & ~(a1 >= a3)
    a1, a3 = _swap(s, a1, a3)
    s = (a1 == a1) & ~(a1 >= a2)
    a1, a2 = _swap(s, a1, a2)
    return a0, a1, a2, a3


@njit
def _swap(s, a, b):
    """(b, a) where s, else (a, b): lane by lane for a _simd Mask."""
    return select(s, b, a), select(s, a, b)


@njit
def _cx(a, b):
    """Compare-exchange for NaN-free values: (higher, lower), ties kept in
    place. ``b if a < b else a`` is one vmaxps and ``a if a < b else b`` one
    vminps, against five instructions for the NaN-aware form; callers
    replace the result of every window holding a NaN. Scalars or
    _simd vectors (then the networks below sort whole vectors)."""
    s = a < b
    return select(s, b, a), select(s, a, b)


@njit
def _sort4_nan_free(a0, a1, a2, a3):
    """The 4 values in decreasing order, exact when none is NaN."""
    a0, a1 = _cx(a0, a1)
    a2, a3 = _cx(a2, a3)
    a0, a2 = _cx(a0, a2)
    a1, a3 = _cx(a1, a3)
    a1, a2 = _cx(a1, a2)
    return a0, a1, a2, a3


@njit
def _sort9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """The 9 values in decreasing order, exact when none is NaN: a
    25-comparator sorting network (checked by the 0-1 principle in
    tests/test_numba_fast_paths.py). With a literal pool_range only the
    comparators that reach the kept outputs survive LLVM's dead-code
    elimination (13 for k = 1, 20 for k = 2)."""
    a0, a3 = _cx(a0, a3)
    a1, a7 = _cx(a1, a7)
    a2, a5 = _cx(a2, a5)
    a4, a8 = _cx(a4, a8)
    a0, a7 = _cx(a0, a7)
    a2, a4 = _cx(a2, a4)
    a3, a8 = _cx(a3, a8)
    a5, a6 = _cx(a5, a6)
    a0, a2 = _cx(a0, a2)
    a1, a3 = _cx(a1, a3)
    a4, a5 = _cx(a4, a5)
    a7, a8 = _cx(a7, a8)
    a1, a4 = _cx(a1, a4)
    a3, a6 = _cx(a3, a6)
    a5, a7 = _cx(a5, a7)
    a0, a1 = _cx(a0, a1)
    a2, a4 = _cx(a2, a4)
    a3, a5 = _cx(a3, a5)
    a6, a8 = _cx(a6, a8)
    a2, a3 = _cx(a2, a3)
    a4, a5 = _cx(a4, a5)
    a6, a7 = _cx(a6, a7)
    a1, a2 = _cx(a1, a2)
    a3, a4 = _cx(a3, a4)
    a5, a6 = _cx(a5, a6)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@njit
def _merge9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """The 9 values in decreasing order, exact when none is NaN, by a
    network of merges: sorted pairs, merged into sorted fours (Batcher),
    the fours merged (Batcher's odd-even merge), a8 put in place from the
    top. 28 comparators against _sort9_nan_free's 25, but its largest
    values need fewer of them: after dead-code elimination 8 / 27 / 30
    min and max operations for the 1 / 2 / 3 largest, against 18 / 33 /
    34 (counted in the compiled loop over channels). Checked by the 0-1
    principle as _sort9_nan_free."""
    a0, a1 = _cx(a0, a1)
    a2, a3 = _cx(a2, a3)
    a4, a5 = _cx(a4, a5)
    a6, a7 = _cx(a6, a7)
    a0, a2 = _cx(a0, a2)
    a1, a3 = _cx(a1, a3)
    a1, a2 = _cx(a1, a2)
    a4, a6 = _cx(a4, a6)
    a5, a7 = _cx(a5, a7)
    a5, a6 = _cx(a5, a6)
    a0, a4 = _cx(a0, a4)
    a1, a5 = _cx(a1, a5)
    a2, a6 = _cx(a2, a6)
    a3, a7 = _cx(a3, a7)
    a2, a4 = _cx(a2, a4)
    a3, a5 = _cx(a3, a5)
    a1, a2 = _cx(a1, a2)
    a3, a4 = _cx(a3, a4)
    a5, a6 = _cx(a5, a6)
    a0, a8 = _cx(a0, a8)
    a1, a8 = _cx(a1, a8)
    a2, a8 = _cx(a2, a8)
    a3, a8 = _cx(a3, a8)
    a4, a8 = _cx(a4, a8)
    a5, a8 = _cx(a5, a8)
    a6, a8 = _cx(a6, a8)
    a7, a8 = _cx(a7, a8)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@njit(inline="always")
def _top9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8, kk):
    """The 9 values in decreasing order, exact when none is NaN, for a
    forward that keeps kk of them (a literal; 0: known at run time): the
    network with the fewest operations for the kk largest."""
    if kk >= 1 and kk <= 3:
        return _merge9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8)
    return _sort9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8)


# The same networks inlined by Numba: LLVM inlines a function called from
# one loop of a caller, but from a second one (_row_3x3_nchw_simd's edge
# vectors) it called it, nine vectors passed through the stack.
_merge9_inline = njit(inline="always")(_merge9_nan_free.py_func)
_sort9_inline = njit(inline="always")(_sort9_nan_free.py_func)


@njit(inline="always")
def _top9_inline(a0, a1, a2, a3, a4, a5, a6, a7, a8, kk):
    """_top9_nan_free with the network inlined by Numba."""
    if kk >= 1 and kk <= 3:
        return _merge9_inline(a0, a1, a2, a3, a4, a5, a6, a7, a8)
    return _sort9_inline(a0, a1, a2, a3, a4, a5, a6, a7, a8)


@njit
def _sort9_swaps(a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """_sort9_nan_free's network, returning the swap mask of each of its
    compare-exchanges too (for _unsort9). Written out a second time: with
    _sort9_nan_free returning this function's values, the forwards' loops
    over channels ran 8 times slower (3x3 float32 forward 4 -> 34 ms).
    Unused masks and comparators vanish as in _sort9_nan_free."""
    s0 = a0 < a3
    a0, a3 = _swap(s0, a0, a3)
    s1 = a1 < a7
    a1, a7 = _swap(s1, a1, a7)
    s2 = a2 < a5
    a2, a5 = _swap(s2, a2, a5)
    s3 = a4 < a8
    a4, a8 = _swap(s3, a4, a8)
    s4 = a0 < a7
    a0, a7 = _swap(s4, a0, a7)
    s5 = a2 < a4
    a2, a4 = _swap(s5, a2, a4)
    s6 = a3 < a8
    a3, a8 = _swap(s6, a3, a8)
    s7 = a5 < a6
    a5, a6 = _swap(s7, a5, a6)
    s8 = a0 < a2
    a0, a2 = _swap(s8, a0, a2)
    s9 = a1 < a3
    a1, a3 = _swap(s9, a1, a3)
    s10 = a4 < a5
    a4, a5 = _swap(s10, a4, a5)
    s11 = a7 < a8
    a7, a8 = _swap(s11, a7, a8)
    s12 = a1 < a4
    a1, a4 = _swap(s12, a1, a4)
    s13 = a3 < a6
    a3, a6 = _swap(s13, a3, a6)
    s14 = a5 < a7
    a5, a7 = _swap(s14, a5, a7)
    s15 = a0 < a1
    a0, a1 = _swap(s15, a0, a1)
    s16 = a2 < a4
    a2, a4 = _swap(s16, a2, a4)
    s17 = a3 < a5
    a3, a5 = _swap(s17, a3, a5)
    s18 = a6 < a8
    a6, a8 = _swap(s18, a6, a8)
    s19 = a2 < a3
    a2, a3 = _swap(s19, a2, a3)
    s20 = a4 < a5
    a4, a5 = _swap(s20, a4, a5)
    s21 = a6 < a7
    a6, a7 = _swap(s21, a6, a7)
    s22 = a1 < a2
    a1, a2 = _swap(s22, a1, a2)
    s23 = a3 < a4
    a3, a4 = _swap(s23, a3, a4)
    s24 = a5 < a6
    a5, a6 = _swap(s24, a5, a6)
    return ((a0, a1, a2, a3, a4, a5, a6, a7, a8),
            (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14,
             s15, s16, s17, s18, s19, s20, s21, s22, s23, s24))


@njit
def _unsort9(s, t0, t1, t2, t3, t4, t5, t6, t7, t8):
    """t_r (r: a rank of _sort9_swaps' output) moved back to the position
    that holds rank r: the network's swaps s replayed in reverse. Exact
    for distinct values, where the network's order is the stable one."""
    (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16,
     s17, s18, s19, s20, s21, s22, s23, s24) = s
    t5, t6 = _swap(s24, t5, t6)
    t3, t4 = _swap(s23, t3, t4)
    t1, t2 = _swap(s22, t1, t2)
    t6, t7 = _swap(s21, t6, t7)
    t4, t5 = _swap(s20, t4, t5)
    t2, t3 = _swap(s19, t2, t3)
    t6, t8 = _swap(s18, t6, t8)
    t3, t5 = _swap(s17, t3, t5)
    t2, t4 = _swap(s16, t2, t4)
    t0, t1 = _swap(s15, t0, t1)
    t5, t7 = _swap(s14, t5, t7)
    t3, t6 = _swap(s13, t3, t6)
    t1, t4 = _swap(s12, t1, t4)
    t7, t8 = _swap(s11, t7, t8)
    t4, t5 = _swap(s10, t4, t5)
    t1, t3 = _swap(s9, t1, t3)
    t0, t2 = _swap(s8, t0, t2)
    t5, t6 = _swap(s7, t5, t6)
    t3, t8 = _swap(s6, t3, t8)
    t2, t4 = _swap(s5, t2, t4)
    t0, t7 = _swap(s4, t0, t7)
    t4, t8 = _swap(s3, t4, t8)
    t2, t5 = _swap(s2, t2, t5)
    t1, t7 = _swap(s1, t1, t7)
    t0, t3 = _swap(s0, t0, t3)
    return t0, t1, t2, t3, t4, t5, t6, t7, t8


@njit(inline="always")
def _sort9(a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """_sort9_nan_free's network with the NaN-aware compare-exchanges of
    _sort4."""
    s = (a0 == a0) & ~(a0 >= a3)
    a0, a3 = (a3 if s else a0), (a0 if s else a3)
    s = (a1 == a1) & ~(a1 >= a7)
    a1, a7 = (a7 if s else a1), (a1 if s else a7)
    s = (a2 == a2) & ~(a2 >= a5)
    a2, a5 = (a5 if s else a2), (a2 if s else a5)
    s = (a4 == a4) & ~(a4 >= a8)
    a4, a8 = (a8 if s else a4), (a4 if s else a8)
    s = (a0 == a0) & ~(a0 >= a7)
    a0, a7 = (a7 if s else a0), (a0 if s else a7)
    s = (a2 == a2) & ~(a2 >= a4)
    a2, a4 = (a4 if s else a2), (a2 if s else a4)
    s = (a3 == a3) & ~(a3 >= a8)
    a3, a8 = (a8 if s else a3), (a3 if s else a8)
    s = (a5 == a5) & ~(a5 >= a6)
    a5, a6 = (a6 if s else a5), (a5 if s else a6)
    s = (a0 == a0) & ~(a0 >= a2)
    a0, a2 = (a2 if s else a0), (a0 if s else a2)
    s = (a1 == a1) & ~(a1 >= a3)
    a1, a3 = (a3 if s else a1), (a1 if s else a3)
    s = (a4 == a4) & ~(a4 >= a5)
    a4, a5 = (a5 if s else a4), (a4 if s else a5)
    s = (a7 == a7) & ~(a7 >= a8)
    a7, a8 = (a8 if s else a7), (a7 if s else a8)
    s = (a1 == a1) & ~(a1 >= a4)
    a1, a4 = (a4 if s else a1), (a1 if s else a4)
    s = (a3 == a3) & ~(a3 >= a6)
    a3, a6 = (a6 if s else a3), (a3 if s else a6)
    s = (a5 == a5) & ~(a5 >= a7)
    a5, a7 = (a7 if s else a5), (a5 if s else a7)
    s = (a0 == a0) & ~(a0 >= a1)
    a0, a1 = (a1 if s else a0), (a0 if s else a1)
    s = (a2 == a2) & ~(a2 >= a4)
    a2, a4 = (a4 if s else a2), (a2 if s else a4)
    s = (a3 == a3) & ~(a3 >= a5)
    a3, a5 = (a5 if s else a3), (a3 if s else a5)
    s = (a6 == a6) & ~(a6 >= a8)
    a6, a8 = (a8 if s else a6), (a6 if s else a8)
    s = (a2 == a2) & ~(a2 >= a3)
    a2, a3 = (a3 if s else a2), (a2 if s else a3)
    s = (a4 == a4) & ~(a4 >= a5)
    a4, a5 = (a5 if s else a4), (a4 if s else a5)
    s = (a6 == a6) & ~(a6 >= a7)
    a6, a7 = (a7 if s else a6), (a6 if s else a7)
    s = (a1 == a1) & ~(a1 >= a2)
    a1, a2 = (a2 if s else a1), (a1 if s else a2)
    s = (a3 == a3) & ~(a3 >= a4)
    a3, a4 = (a4 if s else a3), (a3 if s else a4)
    s = (a5 == a5) & ~(a5 >= a6)
    a5, a6 = (a6 if s else a5), (a5 if s else a6)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@njit
def _any_nan4(a0, a1, a2, a3):
    return (a0 != a0) | (a1 != a1) | (a2 != a2) | (a3 != a3)


@njit
def _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8):
    return ((a0 != a0) | (a1 != a1) | (a2 != a2) | (a3 != a3) | (a4 != a4)
            | (a5 != a5) | (a6 != a6) | (a7 != a7) | (a8 != a8))


@njit
def _weighted(v0, v1, v2, v3, v4, v5, v6, v7, v8, tb, c, kk):
    """sum_{r < kk} tb[r, c] v_r; kk is the pool_range as a literal, so the
    unused terms vanish at compile time, or a run-time rank count
    (_edge_3x3_nchw)."""
    acc = tb[0, c] * v0
    if kk > 1:
        acc += tb[1, c] * v1
    if kk > 2:
        acc += tb[2, c] * v2
    if kk > 3:
        acc += tb[3, c] * v3
    if kk > 4:
        acc += tb[4, c] * v4
    if kk > 5:
        acc += tb[5, c] * v5
    if kk > 6:
        acc += tb[6, c] * v6
    if kk > 7:
        acc += tb[7, c] * v7
    if kk > 8:
        acc += tb[8, c] * v8
    return acc


@njit(inline="always")
def _ranks4(a0, a1, a2, a3, one, zero, nan_aware):
    """Rank (0 = highest) of each of 4 positions in scan order, stable, as
    floats of the input's dtype: integer ranks next to float data keep LLVM
    from vectorising the loop (checked with inspect_asm), float ranks do
    not. nan_aware is a constant at every call: False (for values known to
    hold no NaN) folds the NaN tests away."""
    n0 = nan_aware & (a0 != a0)
    n1 = nan_aware & (a1 != a1)
    n2 = nan_aware & (a2 != a2)
    # bST: position S (earlier) ranks above position T (later).
    b01 = one if n0 | (a0 >= a1) else zero
    b02 = one if n0 | (a0 >= a2) else zero
    b03 = one if n0 | (a0 >= a3) else zero
    b12 = one if n1 | (a1 >= a2) else zero
    b13 = one if n1 | (a1 >= a3) else zero
    b23 = one if n2 | (a2 >= a3) else zero
    r0 = (one - b01) + (one - b02) + (one - b03)
    r1 = b01 + (one - b12) + (one - b13)
    r2 = b02 + b12 + (one - b23)
    r3 = b03 + b13 + b23
    return r0, r1, r2, r3


@njit(inline="always")
def _pick4(r, q0, q1, q2, q3):
    """The weight of rank r (a float, see _ranks4) from 4 weights loaded
    before the select chain (a conditional load keeps the loop scalar)."""
    return q0 if r == 0 else q1 if r == 1 else q2 if r == 2 else q3


@njit(inline="always")
def _ranks9(a0, a1, a2, a3, a4, a5, a6, a7, a8, one, zero, nan_aware):
    """Stable ranks of 9 positions from their 36 pairwise comparisons (as
    _ranks4). nan_aware is a constant at every call: False (for windows
    known to hold no NaN) folds the NaN tests away, one comparison per
    pair."""
    n0 = nan_aware & (a0 != a0)
    n1 = nan_aware & (a1 != a1)
    n2 = nan_aware & (a2 != a2)
    n3 = nan_aware & (a3 != a3)
    n4 = nan_aware & (a4 != a4)
    n5 = nan_aware & (a5 != a5)
    n6 = nan_aware & (a6 != a6)
    n7 = nan_aware & (a7 != a7)
    b01 = one if n0 | (a0 >= a1) else zero
    b02 = one if n0 | (a0 >= a2) else zero
    b03 = one if n0 | (a0 >= a3) else zero
    b04 = one if n0 | (a0 >= a4) else zero
    b05 = one if n0 | (a0 >= a5) else zero
    b06 = one if n0 | (a0 >= a6) else zero
    b07 = one if n0 | (a0 >= a7) else zero
    b08 = one if n0 | (a0 >= a8) else zero
    b12 = one if n1 | (a1 >= a2) else zero
    b13 = one if n1 | (a1 >= a3) else zero
    b14 = one if n1 | (a1 >= a4) else zero
    b15 = one if n1 | (a1 >= a5) else zero
    b16 = one if n1 | (a1 >= a6) else zero
    b17 = one if n1 | (a1 >= a7) else zero
    b18 = one if n1 | (a1 >= a8) else zero
    b23 = one if n2 | (a2 >= a3) else zero
    b24 = one if n2 | (a2 >= a4) else zero
    b25 = one if n2 | (a2 >= a5) else zero
    b26 = one if n2 | (a2 >= a6) else zero
    b27 = one if n2 | (a2 >= a7) else zero
    b28 = one if n2 | (a2 >= a8) else zero
    b34 = one if n3 | (a3 >= a4) else zero
    b35 = one if n3 | (a3 >= a5) else zero
    b36 = one if n3 | (a3 >= a6) else zero
    b37 = one if n3 | (a3 >= a7) else zero
    b38 = one if n3 | (a3 >= a8) else zero
    b45 = one if n4 | (a4 >= a5) else zero
    b46 = one if n4 | (a4 >= a6) else zero
    b47 = one if n4 | (a4 >= a7) else zero
    b48 = one if n4 | (a4 >= a8) else zero
    b56 = one if n5 | (a5 >= a6) else zero
    b57 = one if n5 | (a5 >= a7) else zero
    b58 = one if n5 | (a5 >= a8) else zero
    b67 = one if n6 | (a6 >= a7) else zero
    b68 = one if n6 | (a6 >= a8) else zero
    b78 = one if n7 | (a7 >= a8) else zero
    r0 = ((one - b01) + (one - b02) + (one - b03) + (one - b04) + (one - b05)
          + (one - b06) + (one - b07) + (one - b08))
    r1 = (b01 + (one - b12) + (one - b13) + (one - b14) + (one - b15)
          + (one - b16) + (one - b17) + (one - b18))
    r2 = (b02 + b12 + (one - b23) + (one - b24) + (one - b25) + (one - b26)
          + (one - b27) + (one - b28))
    r3 = (b03 + b13 + b23 + (one - b34) + (one - b35) + (one - b36)
          + (one - b37) + (one - b38))
    r4 = (b04 + b14 + b24 + b34 + (one - b45) + (one - b46) + (one - b47)
          + (one - b48))
    r5 = (b05 + b15 + b25 + b35 + b45 + (one - b56) + (one - b57)
          + (one - b58))
    r6 = (b06 + b16 + b26 + b36 + b46 + b56 + (one - b67) + (one - b68))
    r7 = (b07 + b17 + b27 + b37 + b47 + b57 + b67 + (one - b78))
    r8 = (b08 + b18 + b28 + b38 + b48 + b58 + b68 + b78)
    return r0, r1, r2, r3, r4, r5, r6, r7, r8


# --------------------------------------------------------------------------
# Register paths, NHWC: one window inside the input, all channels
# --------------------------------------------------------------------------
#
# kk is the pool_range as a compile-time literal (1-4), or 0 when it is only
# known at run time (3x3 windows with pool_range 5-9). Every window holding a
# NaN gives NaN (a NaN ranks first, and p_1 * NaN is NaN), so the forward
# sorts with the NaN-free compare-exchange and then writes NaN where any of
# the window's values is NaN: bit-identical to sorting with NaN on top.

# The register paths ask for the memory of the window _PREFETCH_AHEAD
# windows ahead of the one they compute (_simd.prefetch): the lines of
# each of its rows that its predecessor did not read. From memory, without
# it, a window took 1.6-2 times as many cycles as from the L3 cache: the
# hardware prefetchers did not keep up with three to seven streams of
# rows (see docs/performance.md). The kernels pass it to their row
# functions as ``ahead``, 0 where the rows are scratch already in cache
# (the NCHW paths by blocks of channels), where the prefetches only cost
# instructions.
_PREFETCH_AHEAD = 4
# The NHWC backward prefetches only where x, grad_y and grad_x take this
# many bytes together or more: below, they stay in the caches (32 MB of
# L3 on the EPYC) and the prefetches only cost instructions. Side by side
# (2x2 float32, (n, 112, 112, 64), k = 2): n = 1 / 2 (7 / 14 MB) 7-16%
# faster without them, n = 4 (29 MB) the same, n = 8 and 16 8-10% slower;
# 3x3 n = 1 2-23% faster. The forwards always prefetch (n = 2 already 3%
# faster with them).
_PREFETCH_FROM_BYTES = 16 << 20


@njit
def _prefetch_rows(a, end, span, rows, step, write, ahead):
    """Prefetch a.flat[end - span + q * step:end + q * step] for q <
    rows, a line at a time (for writing where write is set); nothing
    where ahead is 0."""
    if ahead:
        line = lanes(a)  # a vector is a cache line, 64 bytes
        for q in range(rows):
            for j in range(end - span + q * step, end + q * step, line):
                if write:
                    prefetch_write(a, j)
                else:
                    prefetch(a, j)


# The NCHW plane kernels prefetch the input rows (and grad_y's and
# grad_x's) of the output row this many rows ahead of the one they
# compute: the hardware prefetchers left them waiting on memory. Side by
# side on the Intel Xeon, (32, 64, 112, 112), `out=`, ratios to the NCHW
# floor, k = 1 / 4: float32 2x2 forward 0.92 / 1.01 -> 0.78 / 0.76 (now
# under the NHWC floor), backward 2.00 / 2.18 -> 1.63 / 1.69, 3x3
# forward 1.26 / 1.47 -> 1.04 / 1.27, backward (by planes) 2.86 / 3.12
# -> 2.47 / 2.73; float64 10-16% faster; 1, 2 and 4 rows ahead about the
# same for the 2x2 forward (docs/performance.md, sixteenth round).
_NCHW_ROWS_AHEAD = 2


@njit
def _prefetch_plane_rows(a, n, c, h, rows, step, write):
    """Prefetch rows h, h + step, ... (rows of them) of plane (n, c) of
    the NCHW array a (for writing where write is set), where all of them
    lie inside it."""
    if h >= 0 and h + (rows - 1) * step < a.shape[2]:
        width = a.shape[3]
        start = ((n * a.shape[1] + c) * a.shape[2] + h) * width
        _prefetch_rows(a, start + width, width, rows, step * width, write,
                       1)


@njit(inline="always")
def _fwd_2x2_nhwc(r0, r1, yr, lo, hi, sw, pl, dw, tb, ahead, kk):
    """Windows [lo, hi) of one output row, all inside the input: r0 and r1
    its two input rows and yr the output row ((W, C) and (OW, C) views).
    The loop over windows is here rather than in the caller, and windows
    are indexed rather than sliced: a view, or an array passed to an
    inlined function, costs an atomic reference-count increment and
    decrement, and those per window were a measurable share of its time
    (see docs/performance.md)."""
    nan = yr.dtype.type(np.nan)
    channels = yr.shape[1]
    for ow in range(lo, hi):
        c0 = ow * sw - pl
        end = (c0 + dw + 1 + ahead * sw) * channels
        _prefetch_rows(r0, end, sw * channels, 1, 0, False, ahead)
        _prefetch_rows(r1, end, sw * channels, 1, 0, False, ahead)
        for c in range(yr.shape[1]):
            a0 = r0[c0, c]
            a1 = r0[c0 + dw, c]
            a2 = r1[c0, c]
            a3 = r1[c0 + dw, c]
            v0, v1, v2, v3 = _sort4_nan_free(a0, a1, a2, a3)
            acc = _weighted(v0, v1, v2, v3, v3, v3, v3, v3, v3, tb, c, kk)
            yr[ow, c] = nan if _any_nan4(a0, a1, a2, a3) else acc


@njit(inline="always")
def _fwd_3x3_nhwc(r0, r1, r2, yr, lo, hi, sw, pl, dw, tb, ahead, kk):
    """_fwd_2x2_nhwc for 3x3 windows: r0, r1, r2 the input rows."""
    nan = yr.dtype.type(np.nan)
    channels = yr.shape[1]
    for ow in range(lo, hi):
        c0 = ow * sw - pl
        c1 = c0 + dw
        c2 = c1 + dw
        end = (c2 + 1 + ahead * sw) * channels
        _prefetch_rows(r0, end, sw * channels, 1, 0, False, ahead)
        _prefetch_rows(r1, end, sw * channels, 1, 0, False, ahead)
        _prefetch_rows(r2, end, sw * channels, 1, 0, False, ahead)
        for c in range(yr.shape[1]):
            a0 = r0[c0, c]
            a1 = r0[c1, c]
            a2 = r0[c2, c]
            a3 = r1[c0, c]
            a4 = r1[c1, c]
            a5 = r1[c2, c]
            a6 = r2[c0, c]
            a7 = r2[c1, c]
            a8 = r2[c2, c]
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _top9_nan_free(
                a0, a1, a2, a3, a4, a5, a6, a7, a8, kk)
            acc = _weighted(v0, v1, v2, v3, v4, v5, v6, v7, v8, tb, c, kk)
            bad = _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8)
            yr[ow, c] = nan if bad else acc


@njit(inline="always")
def _window9(r0, r1, r2, col, dw):
    """The 9 entries of a 3x3 window in scan order: columns col, col + dw,
    col + 2 dw of rows r0, r1, r2 (scalars of padded NCHW rows)."""
    return (r0[col], r0[col + dw], r0[col + 2 * dw],
            r1[col], r1[col + dw], r1[col + 2 * dw],
            r2[col], r2[col + dw], r2[col + 2 * dw])


# The NHWC register-path forwards in explicit vectors (_simd), for
# channel counts that fill whole vectors: flat indices as for
# _windows_3x3_simd, the same network, products and sums as the loop
# forms, bit for bit.

@njit(inline="always")
def _fwd_store_simd(tb, y, yo, i, channels, v, bad, kk):
    """y.flat[yo + i:...] = sum_{r < kk} tb[r] v[r], NaN where bad."""
    acc = load(tb, i) * v[0]
    for r in range(1, kk):
        acc = acc + load(tb, r * channels + i) * v[r]
    store(y, yo + i, select(bad, full(tb, np.nan), acc))


@njit(inline="always")
def _fwd_2x2_simd(x, tb, y, xo, yo, ws, count, rs, cs, ahead, kk):
    """_fwd_2x2_nhwc for count windows, the first at x.flat[xo] (ws, rs,
    cs: flat steps to the next window, window row and column), outputs
    from y.flat[yo]."""
    channels = tb.shape[1]
    for t in range(count):
        xt = xo + t * ws
        yt = yo + t * channels
        _prefetch_rows(x, xt + ahead * ws + cs + channels, ws, 2, rs, False,
                       ahead)
        for i in range(0, channels, lanes(x)):
            o = xt + i
            a0 = load(x, o)
            a1 = load(x, o + cs)
            a2 = load(x, o + rs)
            a3 = load(x, o + rs + cs)
            _fwd_store_simd(tb, y, yt, i, channels,
                            _sort4_nan_free(a0, a1, a2, a3),
                            _any_nan4(a0, a1, a2, a3), kk)


@njit(inline="always")
def _fwd_3x3_simd(x, tb, y, xo, yo, ws, count, rs, cs, ahead, kk):
    """_fwd_3x3_nhwc in the manner of _fwd_2x2_simd."""
    channels = tb.shape[1]
    for t in range(count):
        xt = xo + t * ws
        yt = yo + t * channels
        _prefetch_rows(x, xt + ahead * ws + 2 * cs + channels, ws, 3, rs,
                       False, ahead)
        for i in range(0, channels, lanes(x)):
            o = xt + i
            a0 = load(x, o)
            a1 = load(x, o + cs)
            a2 = load(x, o + 2 * cs)
            a3 = load(x, o + rs)
            a4 = load(x, o + rs + cs)
            a5 = load(x, o + rs + 2 * cs)
            a6 = load(x, o + 2 * rs)
            a7 = load(x, o + 2 * rs + cs)
            a8 = load(x, o + 2 * rs + 2 * cs)
            _fwd_store_simd(
                tb, y, yt, i, channels,
                _top9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8, kk),
                _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8), kk)


@njit(inline="always")
def _store_or_add_rows(scr, dsts, stores):
    """dsts[i] = scr[i] where bit i of stores is set, else dsts[i] +=
    scr[i]. A plain store where a position is written first (windows that
    do not overlap, or the first-write positions of the 3x3 backward)
    spares reading freshly zeroed or stale memory."""
    channels = scr.shape[1]
    for i in range(len(dsts)):
        src = scr[i]
        dst = dsts[i]
        if (stores >> i) & 1:
            for c in range(channels):
                dst[c] = src[c]
        else:
            for c in range(channels):
                dst[c] += src[c]


# The most windows whose weight-gradient products are summed in the
# input's dtype before the sum goes into a float64 partial sum: it bounds
# the float32 rounding of the weight gradient at about _BLOCK float32
# ulps of the summed magnitudes, whatever the size of the input.
_BLOCK = 32


@njit(inline="always")
def _add_partials(g, scr, first, part, k):
    """part[r] += g * scr[first + r] in the input's dtype, for r < k (a
    block sum, see _flush_partials)."""
    channels = g.shape[0]
    for r in range(k):
        a = part[r]
        v = scr[first + r]
        for c in range(channels):
            a[c] += g[c] * v[c]


@njit(inline="always")
def _flush_partials(part, acc, k):
    """acc[r] += part[r] in float64 and part[r] = 0, for r < k: a block of
    weight-gradient products, summed in the input's dtype, goes into the
    float64 partial sums."""
    for r in range(k):
        a = acc[r]
        b = part[r]
        for c in range(b.shape[0]):
            a[c] += np.float64(b[c])
            b[c] = 0


# The backward needs no literal pool_range: the weight of each position is
# picked from a table padded with zero rows up to the window size (tpad,
# (9, C)), so the unkept ranks select 0 exactly as a shorter chain would.

@njit(inline="always")
def _bwd_2x2_nhwc(x0, x1, x2, x3, g, tpad, gxs, scr, overwrite):
    """One window, all channels. The ranking loop writes only the scratch
    tile ``scr``: rows 0-3 get g * the weight of each position, and rows
    4-7, the block sums of the weight gradient (see _flush_partials), get
    g * each ranked value added (all four ranks; the unkept ones are never
    read). Short copy loops then store or add rows 0-3 into grad_x. With
    every output of the ranking loop in one array, LLVM needs few runtime
    alias checks and vectorises it; the products added in the ranking
    loop, and not in a loop of their own, took 0.3-0.7 ms less (k = 2-4)."""
    zero = x0.dtype.type(0.0)
    one = x0.dtype.type(1.0)
    p0 = tpad[0]
    p1 = tpad[1]
    p2 = tpad[2]
    p3 = tpad[3]
    for c in range(g.shape[0]):
        a0 = x0[c]
        a1 = x1[c]
        a2 = x2[c]
        a3 = x3[c]
        gc = g[c]
        r0, r1, r2, r3 = _ranks4(a0, a1, a2, a3, one, zero, True)
        q0 = p0[c]
        q1 = p1[c]
        q2 = p2[c]
        q3 = p3[c]
        scr[0, c] = gc * _pick4(r0, q0, q1, q2, q3)
        scr[1, c] = gc * _pick4(r1, q0, q1, q2, q3)
        scr[2, c] = gc * _pick4(r2, q0, q1, q2, q3)
        scr[3, c] = gc * _pick4(r3, q0, q1, q2, q3)
        v0, v1, v2, v3 = _sort4(a0, a1, a2, a3)
        scr[4, c] += gc * v0
        scr[5, c] += gc * v1
        scr[6, c] += gc * v2
        scr[7, c] += gc * v3
    _store_or_add_rows(scr, gxs, 15 if overwrite else 0)


@njit(inline="always")
def _rank_sort_rows(xs, scr, nan_aware):
    """The stable ranks of the 9 positions of a 3x3 window (xs: their (C,)
    rows in scan order) into scr rows 0-8, its ranked values into rows
    9-17. Two loops: with the sort in the ranking loop LLVM left both
    scalar (inspect_asm). nan_aware is a constant (see _ranks9)."""
    zero = scr.dtype.type(0.0)
    one = scr.dtype.type(1.0)
    x0, x1, x2, x3, x4, x5, x6, x7, x8 = xs
    for c in range(scr.shape[1]):
        r0, r1, r2, r3, r4, r5, r6, r7, r8 = _ranks9(
            x0[c], x1[c], x2[c], x3[c], x4[c], x5[c], x6[c], x7[c], x8[c],
            one, zero, nan_aware)
        scr[0, c] = r0
        scr[1, c] = r1
        scr[2, c] = r2
        scr[3, c] = r3
        scr[4, c] = r4
        scr[5, c] = r5
        scr[6, c] = r6
        scr[7, c] = r7
        scr[8, c] = r8
    for c in range(scr.shape[1]):
        if nan_aware:
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _sort9(
                x0[c], x1[c], x2[c], x3[c], x4[c], x5[c], x6[c], x7[c],
                x8[c])
        else:
            v0, v1, v2, v3, v4, v5, v6, v7, v8 = _sort9_nan_free(
                x0[c], x1[c], x2[c], x3[c], x4[c], x5[c], x6[c], x7[c],
                x8[c])
        scr[9, c] = v0
        scr[10, c] = v1
        scr[11, c] = v2
        scr[12, c] = v3
        scr[13, c] = v4
        scr[14, c] = v5
        scr[15, c] = v6
        scr[16, c] = v7
        scr[17, c] = v8


@njit(cache=True)
def _rank_rows_3x3(xs, scr):
    """_rank_sort_rows for one window, NaN-aware only when one of its
    values is NaN (checked first, over all channels). A function of its
    own, compiled once per dtype and not once per pool_range, because the
    loops are large."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8 = xs
    bad = False
    for c in range(scr.shape[1]):
        bad |= _any_nan9(x0[c], x1[c], x2[c], x3[c], x4[c], x5[c], x6[c],
                         x7[c], x8[c])
    if bad:
        _rank_sort_rows(xs, scr, True)
    else:
        _rank_sort_rows(xs, scr, False)


@njit(cache=True)
def _weights_3x3(scr, g, tpad, kk):
    """scr rows 0-8 (ranks) become g * the weight of each rank: a chain of
    kk selects for a literal kk (1-4), of all 9 ranks from the zero-padded
    table when kk is 0. Compiled once per literal; it is small."""
    literally(kk)
    zero = g.dtype.type(0.0)
    one = g.dtype.type(1.0)
    # Weights loaded before the selects (a conditional load kept this loop
    # scalar), ranks compared with constants of their own dtype.
    p0 = tpad[0]
    p1 = tpad[1]
    p2 = tpad[2]
    p3 = tpad[3]
    p4 = tpad[4]
    p5 = tpad[5]
    p6 = tpad[6]
    p7 = tpad[7]
    p8 = tpad[8]
    f1 = one
    f2 = f1 + one
    f3 = f2 + one
    f4 = f3 + one
    f5 = f4 + one
    f6 = f5 + one
    f7 = f6 + one
    channels = g.shape[0]
    for q in range(9):
        sq = scr[q]
        if kk > 0:
            for c in range(channels):
                r = sq[c]
                w0 = p0[c]
                w1 = p1[c]
                w2 = p2[c]
                w3 = p3[c]
                w = w0 if r == zero else zero
                if kk > 1:
                    w = w1 if r == f1 else w
                if kk > 2:
                    w = w2 if r == f2 else w
                if kk > 3:
                    w = w3 if r == f3 else w
                sq[c] = g[c] * w
        else:
            for c in range(channels):
                r = sq[c]
                w0 = p0[c]
                w1 = p1[c]
                w2 = p2[c]
                w3 = p3[c]
                w4 = p4[c]
                w5 = p5[c]
                w6 = p6[c]
                w7 = p7[c]
                w = p8[c]
                w = w0 if r == zero else w
                w = w1 if r == f1 else w
                w = w2 if r == f2 else w
                w = w3 if r == f3 else w
                w = w4 if r == f4 else w
                w = w5 if r == f5 else w
                w = w6 if r == f6 else w
                w = w7 if r == f7 else w
                sq[c] = g[c] * w


@njit(cache=True)
def _distinct_weights_3x3(xs, g, tpad, scr, kk):
    """The 3x3 backward of one window without ranks, for a literal kk
    (1-4): sort the values (the network pruned to the kk + 1 largest) and
    give each position the weight of the kept value it equals. That is
    the stable ranking when no value is NaN and the kk + 1 largest are
    distinct (then each kept value sits at exactly one position). Writes
    the kept values into scr rows 9.. and g * weight of each position into
    rows 0-8 (as the ranking path does), or returns False, and the caller
    ranks, when some channel breaks the condition. Ties at the top (ReLU
    zeros) and NaN take the ranking path; typical float data takes this
    one, about half the work.

    Two loops: with the 9 stores of the weights in the sorting loop LLVM
    found too many pointers to check for overlap and left it scalar. The
    flag is a bool: as an int64 it set the vector width of the sorting
    loop to 4 float32 lanes, the width of the widest type in the loop
    (pass remarks; the 3x3 backward took 10% longer). Adding into
    grad_x straight from the weight loops was slower (23 ms against 19 ms
    here) than writing scr and adding it in with _store_or_add_rows."""
    literally(kk)
    zero = scr.dtype.type(0.0)
    x0, x1, x2, x3, x4, x5, x6, x7, x8 = xs
    flag = False
    for c in range(scr.shape[1]):
        a0 = x0[c]
        a1 = x1[c]
        a2 = x2[c]
        a3 = x3[c]
        a4 = x4[c]
        a5 = x5[c]
        a6 = x6[c]
        a7 = x7[c]
        a8 = x8[c]
        v0, v1, v2, v3, v4, v5, v6, v7, v8 = _sort9_nan_free(
            a0, a1, a2, a3, a4, a5, a6, a7, a8)
        bad = _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8) | (v0 == v1)
        if kk > 1:
            bad |= v1 == v2
        if kk > 2:
            bad |= v2 == v3
        if kk > 3:
            bad |= v3 == v4
        flag |= bad
        scr[9, c] = v0
        if kk > 1:
            scr[10, c] = v1
        if kk > 2:
            scr[11, c] = v2
        if kk > 3:
            scr[12, c] = v3
    if flag:
        return False
    p0 = tpad[0]
    p1 = tpad[1]
    p2 = tpad[2]
    p3 = tpad[3]
    s0 = scr[9]
    s1 = scr[10]
    s2 = scr[11]
    s3 = scr[12]
    for q in range(9):
        xq = xs[q]
        sq = scr[q]
        for c in range(scr.shape[1]):
            a = xq[c]
            w = p0[c] if a == s0[c] else zero
            if kk > 1:
                w = p1[c] if a == s1[c] else w
            if kk > 2:
                w = p2[c] if a == s2[c] else w
            if kk > 3:
                w = p3[c] if a == s3[c] else w
            sq[c] = g[c] * w
    return True


@njit(inline="always")
def _bwd_3x3_nhwc(xs, g, tpad, gxs, part, scr, stores, k):
    """One 3x3 window, all channels (xs, gxs: the (C,) rows of x and
    grad_x in scan order). For k <= 4 first without ranks (see
    _distinct_weights_3x3); otherwise, or when that fails, ranks and ranked
    values into the scratch tile, then one short loop per position picks
    its weight. Then one loop per position writes into grad_x (stores:
    bit q set where position q is the first to be written, see
    _bwd_rows_nhwc, else it adds) and one per kept rank adds into the
    block sums of the weight gradient (part)."""
    if k == 1:
        done = _distinct_weights_3x3(xs, g, tpad, scr, 1)
    elif k == 2:
        done = _distinct_weights_3x3(xs, g, tpad, scr, 2)
    elif k == 3:
        done = _distinct_weights_3x3(xs, g, tpad, scr, 3)
    elif k == 4:
        done = _distinct_weights_3x3(xs, g, tpad, scr, 4)
    else:
        done = False
    if not done:
        _rank_rows_3x3(xs, scr)
        if k == 1:
            _weights_3x3(scr, g, tpad, 1)
        elif k == 2:
            _weights_3x3(scr, g, tpad, 2)
        elif k == 3:
            _weights_3x3(scr, g, tpad, 3)
        elif k == 4:
            _weights_3x3(scr, g, tpad, 4)
        else:
            _weights_3x3(scr, g, tpad, 0)
    _store_or_add_rows(scr, gxs, stores)
    _add_partials(g, scr, 9, part, k)


# The 3x3 backward in explicit vectors (_simd), for channel counts that are
# a multiple of the vector's lanes (16 float32, 8 float64). One window is
# straight-line code per block of channels: the nine values in registers,
# sorted by the network, each position's weight picked by comparing its
# value with the kept ones (the ranking-free path of _distinct_weights_3x3,
# for every pool_range), nine stores or adds into grad_x. Indices are flat
# (load/store), so a window makes no array views: each view costs an
# atomic reference-count increment and decrement, and in the loop form
# above those took more time than the window's arithmetic.

@njit(inline="always")
def _put(gx, i, v, first):
    """gx.flat[i:i + lanes] = v if first, else += v."""
    if first:
        store(gx, i, v)
    else:
        store(gx, i, load(gx, i) + v)


@njit(inline="always")
def _of_rank(r, zero, one, two, q0, q1, q2, q3):
    """q[r] for a vector r of ranks 0-3 (zero, one, two: their vectors)."""
    return select(r == zero, q0, select(r == one, q1,
                                        select(r == two, q2, q3)))


@njit(inline="always")
def _at_rank(f, r0, r1, r2, a0, a1, a2, a3):
    """The value of the one position of 4 whose rank (r0-r2; else 3) is
    the vector f."""
    return select(r0 == f, a0, select(r1 == f, a1, select(r2 == f, a2, a3)))


@njit(inline="always")
def _vector_ranks4(a0, a1, a2, a3, zero, one, nan_aware):
    """The stable ranks (0 = highest) of 4 vectors, lane by lane, as
    vectors of floats (as _ranks4; zero and one: vectors of 0 and 1).
    nan_aware is a constant at every call: False (for vectors known to
    hold no NaN) makes one comparison per pair."""
    if nan_aware:
        n0 = a0 != a0
        n1 = a1 != a1
        n2 = a2 != a2
        # bST: position S (earlier) ranks above position T (later).
        b01 = n0 | (a0 >= a1)
        b02 = n0 | (a0 >= a2)
        b03 = n0 | (a0 >= a3)
        b12 = n1 | (a1 >= a2)
        b13 = n1 | (a1 >= a3)
        b23 = n2 | (a2 >= a3)
    else:
        b01 = a0 >= a1
        b02 = a0 >= a2
        b03 = a0 >= a3
        b12 = a1 >= a2
        b13 = a1 >= a3
        b23 = a2 >= a3
    r0 = (select(b01, zero, one) + select(b02, zero, one)
          + select(b03, zero, one))
    r1 = (select(b01, one, zero) + select(b12, zero, one)
          + select(b13, zero, one))
    r2 = (select(b02, one, zero) + select(b12, one, zero)
          + select(b23, zero, one))
    r3 = (select(b03, one, zero) + select(b13, one, zero)
          + select(b23, one, zero))
    return r0, r1, r2, r3


@njit
def _prefetch_window(x, gy, gx, xt, gt, ws, rs, cs, channels, rows, ahead):
    """Prefetch for the vector backwards (see _PREFETCH_AHEAD) the window
    ahead windows after the one at x.flat[xt], of rows rows (and as many
    columns): its rows of x and of grad_x (which it adds into) and its
    g. A plain @njit function, which LLVM inlines: inlined by Numba
    (inline="always"), it cost an atomic reference-count increment and
    decrement of an array per window (3x3 float32 backward k = 9 4%
    slower)."""
    end = xt + ahead * ws + (rows - 1) * cs + channels
    _prefetch_rows(x, end, ws, rows, rs, False, ahead)
    _prefetch_rows(gx, end, ws, rows, rs, True, ahead)
    _prefetch_rows(gy, gt + (ahead + 1) * channels, channels, 1, 0, False,
                   ahead)


@njit(inline="always")
def _windows_2x2_simd(x, gy, tpad, gx, part, acc, xo, go, ws, count, rs, cs,
                      overwrite, in_block, k, ahead):
    """_bwd_2x2_nhwc in explicit vectors (_simd): count windows inside the
    input, all channels, flat indices and block sums as for
    _windows_3x3_simd. Ranks from the 6 pairwise comparisons
    (_vector_ranks4: NaN-aware, earlier position first on ties), each
    position's weight from the zero-padded table by a chain of selects,
    and the ranked values for the block sums (all four ranks, as in
    _bwd_2x2_nhwc) by picking the position of each rank: the same numbers
    as the loop form, bit for bit."""
    channels = tpad.shape[1]
    nl = lanes(x)
    zero = zeros(tpad)
    one = full(tpad, 1.0)
    two = full(tpad, 2.0)
    three = full(tpad, 3.0)
    for t in range(count):
        xt = xo + t * ws
        gt = go + t * channels
        _prefetch_window(x, gy, gx, xt, gt, ws, rs, cs, channels, 2, ahead)
        for i in range(0, channels, nl):
            o = xt + i
            a0 = load(x, o)
            a1 = load(x, o + cs)
            a2 = load(x, o + rs)
            a3 = load(x, o + rs + cs)
            r0, r1, r2, r3 = _vector_ranks4(a0, a1, a2, a3, zero, one, True)
            g = load(gy, gt + i)
            q0 = load(tpad, i)
            q1 = load(tpad, channels + i)
            q2 = load(tpad, 2 * channels + i)
            q3 = load(tpad, 3 * channels + i)
            w0 = _of_rank(r0, zero, one, two, q0, q1, q2, q3)
            w1 = _of_rank(r1, zero, one, two, q0, q1, q2, q3)
            w2 = _of_rank(r2, zero, one, two, q0, q1, q2, q3)
            w3 = _of_rank(r3, zero, one, two, q0, q1, q2, q3)
            _put(gx, o, g * w0, overwrite)
            _put(gx, o + cs, g * w1, overwrite)
            _put(gx, o + rs, g * w2, overwrite)
            _put(gx, o + rs + cs, g * w3, overwrite)
            v0 = _at_rank(zero, r0, r1, r2, a0, a1, a2, a3)
            v1 = _at_rank(one, r0, r1, r2, a0, a1, a2, a3)
            v2 = _at_rank(two, r0, r1, r2, a0, a1, a2, a3)
            v3 = _at_rank(three, r0, r1, r2, a0, a1, a2, a3)
            store(part, i, load(part, i) + g * v0)
            store(part, channels + i, load(part, channels + i) + g * v1)
            j = 2 * channels + i
            store(part, j, load(part, j) + g * v2)
            j = 3 * channels + i
            store(part, j, load(part, j) + g * v3)
        in_block += 1
        if in_block == _BLOCK:
            _flush_partials(part, acc, k)
            in_block = 0
    return in_block


@njit(inline="always")
def _rank_simd(a, q, f):
    """The stable rank of position q among the 9 vectors of a (NaN on top,
    ties to the earlier position), as _ranks9; f[r] is the vector of r.
    Positions s < t are compared by the same expression for both, so each
    of the 36 comparisons is computed once."""
    r = f[0]
    for t in range(9):
        if t < q:
            r = r + select((a[t] != a[t]) | (a[t] >= a[q]), f[1], f[0])
        elif t > q:
            r = r + select((a[q] != a[q]) | (a[q] >= a[t]), f[0], f[1])
    return r


@njit(inline="always")
def _weight_by_rank(rank, p, f):
    """The weight of rank (a vector of ranks) from the 9 rows p of the
    zero-padded table."""
    w = select(rank == f[0], p[0], f[0])
    for r in range(1, 9):
        w = select(rank == f[r], p[r], w)
    return w


@njit(inline="always")
def _value_of_rank(a, rank, f, r):
    """The value of the position whose rank is r (exactly one is)."""
    v = a[8]
    for q in range(7, -1, -1):
        v = select(rank[q] == f[r], a[q], v)
    return v


@njit
def _ranked_block_simd(a, p, f):
    """(weights of the 9 positions, values of ranks 0-8) of one block of a
    3x3 window by ranks, bit-identical to the ranking path of
    _bwd_3x3_nhwc; p: the 9 rows of the zero-padded table, f[r]: the
    vector of r. A function of its own, compiled once per dtype rather
    than inlined into each pool_range's row function: inlined, the
    backward took several minutes to compile."""
    rank = (_rank_simd(a, 0, f), _rank_simd(a, 1, f), _rank_simd(a, 2, f),
            _rank_simd(a, 3, f), _rank_simd(a, 4, f), _rank_simd(a, 5, f),
            _rank_simd(a, 6, f), _rank_simd(a, 7, f), _rank_simd(a, 8, f))
    w = (_weight_by_rank(rank[0], p, f), _weight_by_rank(rank[1], p, f),
         _weight_by_rank(rank[2], p, f), _weight_by_rank(rank[3], p, f),
         _weight_by_rank(rank[4], p, f), _weight_by_rank(rank[5], p, f),
         _weight_by_rank(rank[6], p, f), _weight_by_rank(rank[7], p, f),
         _weight_by_rank(rank[8], p, f))
    v = (_value_of_rank(a, rank, f, 0), _value_of_rank(a, rank, f, 1),
         _value_of_rank(a, rank, f, 2), _value_of_rank(a, rank, f, 3),
         _value_of_rank(a, rank, f, 4), _value_of_rank(a, rank, f, 5),
         _value_of_rank(a, rank, f, 6), _value_of_rank(a, rank, f, 7),
         _value_of_rank(a, rank, f, 8))
    return w, v


@njit
def _table_rows(tpad, i):
    """The vectors at channel i of the nine rows of the zero-padded weight
    table tpad (9, channels). A plain function, which LLVM inlines: an
    array passed to a function Numba inlines costs an atomic
    reference-count increment and decrement per call (see
    _windows_3x3_simd)."""
    channels = tpad.shape[1]
    return (load(tpad, i), load(tpad, channels + i),
            load(tpad, 2 * channels + i), load(tpad, 3 * channels + i),
            load(tpad, 4 * channels + i), load(tpad, 5 * channels + i),
            load(tpad, 6 * channels + i), load(tpad, 7 * channels + i),
            load(tpad, 8 * channels + i))


@njit(inline="always")
def _weight_of_value(a, v, p, zero, kk):
    """The weight of the position holding a, given the kk largest values
    v[0..kk-1] of its window, all distinct, and the weight vectors p (in
    registers, loaded once per block): the weight of the value it
    equals, else zero."""
    w = select(a == v[0], p[0], zero)
    for r in range(1, kk):
        w = select(a == v[r], p[r], w)
    return w


@njit(inline="always")
def _grads_3x3_simd(a, g, p, f, kk):
    """(g times the weight of each of the 9 positions of a block of 3x3
    windows, the values of ranks 0-8) for the 9 vectors a in scan order,
    the windows' g, the 9 weight vectors p (0 from rank pool_range on) and
    f[r], the vector of r, for a literal kk of 1-4; the block body of the
    3x3 backwards of both layouts (_windows_3x3_simd, NHWC, and
    _bwd_row_3x3_nchw_simd). Sort the nine vectors with the NaN-free
    network (only the comparators reaching its kk + 1 largest outputs
    survive); where a lane holds a NaN or a tie among its kk + 1 largest
    values, ranks from the pairwise comparisons (_ranked_block_simd, as
    _bwd_3x3_nhwc's ranking path); else each position's product is the
    g * p_r of the kept value it equals (the ranking-free path of
    _distinct_weights_3x3), 0 where it equals none."""
    v, _ = _sort9_swaps(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
                        a[8])
    m = _any_nan9(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8])
    for r in range(kk):
        m = m | (v[r] == v[r + 1])
    if any_lane(m):
        w, v = _ranked_block_simd(a, p, f)
    else:
        # The products g * p_r picked directly (an unkept position gets
        # +0.0 where g * 0 would carry g's sign).
        zero = f[0]
        gp = (g * p[0], g * p[1], g * p[2], g * p[3], g * p[4], g * p[5],
              g * p[6], g * p[7], g * p[8])
        return (_weight_of_value(a[0], v, gp, zero, kk),
                _weight_of_value(a[1], v, gp, zero, kk),
                _weight_of_value(a[2], v, gp, zero, kk),
                _weight_of_value(a[3], v, gp, zero, kk),
                _weight_of_value(a[4], v, gp, zero, kk),
                _weight_of_value(a[5], v, gp, zero, kk),
                _weight_of_value(a[6], v, gp, zero, kk),
                _weight_of_value(a[7], v, gp, zero, kk),
                _weight_of_value(a[8], v, gp, zero, kk)), v
    return (g * w[0], g * w[1], g * w[2], g * w[3], g * w[4], g * w[5],
            g * w[6], g * w[7], g * w[8]), v


@njit(inline="always")
def _windows_3x3_simd(x, gy, tpad, gx, part, acc, xo, go, ws, count, rs, cs,
                      stores, in_block, k, ahead, kk):
    """count 3x3 windows of one output row, all inside the input, all
    channels, for a literal kk: x.flat[xo] is the first one's first
    position's first channel, ws, rs and cs the flat steps to the next
    window, window row and window column, gy.flat[go] the first one's g;
    stores as for _bwd_3x3_nhwc. The weight gradient's products go into
    the block sums part, flushed into acc every _BLOCK windows (in_block:
    the windows in the current block; the new count is returned). The
    loop over windows is here, not in the caller, so that the arrays are
    passed once per row: an array passed to an inlined function costs an
    atomic reference-count increment and decrement. Per block of
    channels: for kk 1-4, the products g * p of the nine positions by
    _grads_3x3_simd; for kk = 9 (pool_range 5-9: all nine values ranked)
    the same network with its swap masks: in each lane without a NaN or
    a tie, a position's product is that of its place in the network's
    output, moved back through the swaps (_unsort9: the 25 swap masks
    kept and 50 selects, against 81 comparisons and 81 selects; the same
    numbers, as every weight is one of the table's), in the other lanes
    (where a block has any) from the pairwise comparisons. Then nine
    stores or adds into grad_x and the block sums. The nine weight rows
    are loaded before the first store: a store to grad_x could alias tpad
    for all LLVM knows, which would repeat their loads for each
    position."""
    channels = tpad.shape[1]
    nl = lanes(x)
    zero = zeros(tpad)
    f = (zero, full(tpad, 1), full(tpad, 2), full(tpad, 3), full(tpad, 4),
         full(tpad, 5), full(tpad, 6), full(tpad, 7), full(tpad, 8))
    for t in range(count):
        xt = xo + t * ws
        gt = go + t * channels
        _prefetch_window(x, gy, gx, xt, gt, ws, rs, cs, channels, 3, ahead)
        for i in range(0, channels, nl):
            o = xt + i
            a = (load(x, o), load(x, o + cs), load(x, o + 2 * cs),
                 load(x, o + rs), load(x, o + rs + cs),
                 load(x, o + rs + 2 * cs), load(x, o + 2 * rs),
                 load(x, o + 2 * rs + cs), load(x, o + 2 * rs + 2 * cs))
            g = load(gy, gt + i)
            if kk <= 4:
                gw, v = _grads_3x3_simd(a, g, _table_rows(tpad, i), f, kk)
            else:
                v, swaps = _sort9_swaps(a[0], a[1], a[2], a[3], a[4], a[5],
                                        a[6], a[7], a[8])
                # The unsort before the branch, in the network's basic
                # block: placed on the branch's fall-through side, its 25
                # comparisons were sunk there by LLVM (a mask is not kept
                # across blocks), their 50 operands held across the
                # branch, on the stack.
                p = _table_rows(tpad, i)
                gw = _unsort9(swaps, g * p[0], g * p[1], g * p[2], g * p[3],
                              g * p[4], g * p[5], g * p[6], g * p[7],
                              g * p[8])
                m = _any_nan9(a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                              a[7], a[8])
                for r in range(8):
                    m = m | (v[r] == v[r + 1])
                if any_lane(m):
                    # The lanes with a NaN or a tie from the ranks; the
                    # others keep the unsort's numbers (the ranks give
                    # the same), which makes the unsort used on both
                    # sides of the branch, so that LLVM cannot sink it.
                    w, v = _ranked_block_simd(a, p, f)
                    gw = (select(m, g * w[0], gw[0]),
                          select(m, g * w[1], gw[1]),
                          select(m, g * w[2], gw[2]),
                          select(m, g * w[3], gw[3]),
                          select(m, g * w[4], gw[4]),
                          select(m, g * w[5], gw[5]),
                          select(m, g * w[6], gw[6]),
                          select(m, g * w[7], gw[7]),
                          select(m, g * w[8], gw[8]))
            # Written out: as a loop over q, gw[q] became a jump table
            # (an indirect branch per position) that LLVM did not unroll.
            _put(gx, o, gw[0], stores & 1)
            _put(gx, o + cs, gw[1], (stores >> 1) & 1)
            _put(gx, o + 2 * cs, gw[2], (stores >> 2) & 1)
            _put(gx, o + rs, gw[3], (stores >> 3) & 1)
            _put(gx, o + rs + cs, gw[4], (stores >> 4) & 1)
            _put(gx, o + rs + 2 * cs, gw[5], (stores >> 5) & 1)
            _put(gx, o + 2 * rs, gw[6], (stores >> 6) & 1)
            _put(gx, o + 2 * rs + cs, gw[7], (stores >> 7) & 1)
            _put(gx, o + 2 * rs + 2 * cs, gw[8], (stores >> 8) & 1)
            for r in range(kk):
                j = r * channels + i
                store(part, j, load(part, j) + g * v[r])
        in_block += 1
        if in_block == _BLOCK:
            _flush_partials(part, acc, k)
            in_block = 0
    return in_block


@njit(cache=True)
def _bwd_row_3x3_simd(args, kk):
    """The windows [ow_lo, ow_hi) of output row oh, all inside the input,
    by _windows_3x3_simd; block sums of the weight gradient flushed every
    _BLOCK windows as in _bwd_rows_nhwc. Returns the windows in the block
    not yet flushed. Compiled once per literal kk (1-4, 9: see
    _simd_row), with two copies of the window loop: one prefetching
    (ahead nonzero: _PREFETCH_AHEAD windows ahead), one without any
    prefetching code (ahead 0, the NCHW blocks). With one loop and the
    distance a variable, the blocks ran 9-13% slower than without the
    code, although they issued no prefetches; the copy costs 20 s of the
    first compile (60 -> 80 s for a dtype). args: see _simd_row."""
    literally(kk)
    (x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi, geo, stores,
     in_block, k, ahead) = args
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    height = x.shape[1]
    width = x.shape[2]
    channels = x.shape[3]
    rs = dh * width * channels
    cs = dw * channels
    h0 = oh * sh - pt
    c0 = ow_lo * sw - pl
    xo = ((n * height + h0) * width + c0) * channels
    go = ((n * gy.shape[1] + oh) * gy.shape[2] + ow_lo) * channels
    count = max(ow_hi - ow_lo, 0)
    if ahead:
        return _windows_3x3_simd(x, gy, tpad, gx, part, acc, xo, go,
                                 sw * channels, count, rs, cs, stores,
                                 in_block, k, _PREFETCH_AHEAD, kk)
    return _windows_3x3_simd(x, gy, tpad, gx, part, acc, xo, go,
                             sw * channels, count, rs, cs, stores,
                             in_block, k, 0, kk)


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
#
# The parallel kernels hand each output row (forward) or chunk of rows
# (backward) to a row function compiled once per literal pool_range
# (numba.literally). Each specialisation is a separate LLVM function: the
# same code inlined five times into one kernel took several times longer to
# compile than five separate functions, for the same speed.
#
# The kind of window (kind: 2 for 2x2, 3 for 3x3, 0 for the tile path only)
# is a literal too: each kind has a backward kernel of its own
# (_nhwc_backward), and each pair of kind and pool_range a forward kernel
# (_nhwc_forward), compiled on first use, so that a first call compiles
# the code it runs and little else (one kernel for every kind and
# pool_range took 25 s to compile for the forward and 86-97 s for the
# backward, float32; see docs/performance.md). Numba types every branch
# of a function, even one that a literal rules out, and compiles whatever
# is called there; so the backward's 3x3 bodies go through typing-time
# switches (numba.extending.overload: _row_3x3_simd, _window_3x3_loop)
# that resolve to a function doing nothing in the 2x2 and tile kernels.

def _literal(t):
    """The value of a literal integer type, or None."""
    return t.literal_value if isinstance(t, types.IntegerLiteral) else None


@njit(cache=True)
def _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, y, scratch, ahead, kk,
                  vectors):
    """One output row. kind 2: 2x2 and kind 3: 3x3 register paths for the
    windows inside the input, in explicit vectors where vectors is true
    and the channels fill whole ones (see _forward_vectors), else in
    loops over channels; every other window takes the tile path, with
    the caller's scratch (_fwd_scratch)."""
    literally(kind)
    literally(kk)
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    channels = x.shape[3]
    pos_h, pos_w, pos_s, top, top_s, carry, carry_s = scratch
    interior_row = kind > 0 and oh >= oh_lo and oh < oh_hi
    h0 = oh * sh - pt
    tb = tblT[k]
    simd = vectors and channels % lanes(x) == 0
    lo, hi = (ow_lo, max(ow_lo, ow_hi)) if interior_row else (0, 0)
    for ow in range(y.shape[2]):
        if ow == lo and hi > lo:
            if simd:
                rs = dh * x.shape[2] * channels
                cs = dw * channels
                xo = ((n * x.shape[1] + h0) * x.shape[2] + lo * sw - pl) \
                    * channels
                yo = ((n * y.shape[1] + oh) * y.shape[2] + lo) * channels
                if kind == 2:
                    _fwd_2x2_simd(x, tb, y, xo, yo, sw * channels, hi - lo,
                                  rs, cs, ahead, kk)
                else:
                    _fwd_3x3_simd(x, tb, y, xo, yo, sw * channels, hi - lo,
                                  rs, cs, ahead, kk)
            elif kind == 2:
                _fwd_2x2_nhwc(x[n, h0], x[n, h0 + dh], y[n, oh], lo, hi, sw,
                              pl, dw, tb, ahead, kk)
            else:
                _fwd_3x3_nhwc(x[n, h0], x[n, h0 + dh], x[n, h0 + 2 * dh],
                              y[n, oh], lo, hi, sw, pl, dw, tb, ahead, kk)
        elif ow < lo or ow >= hi:
            _fwd_tile_nhwc(x, n, oh, ow, tblT, k, kh, kw, sh, sw, dh, dw,
                           pt, pb, pl, pr, has_pad, pad_value, pos_h, pos_w,
                           pos_s, top, top_s, carry, carry_s, y[n, oh, ow])


@njit(inline="always")
def _fwd_scratch(x, window, k):
    """Scratch of the forward's tile path for one worker: window
    positions (row, column, scan index) and the k largest values and
    their scan indices, per channel. Made once per worker, not per row:
    an allocation costs tens of nanoseconds, and a row of a small input
    not many microseconds."""
    channels = x.shape[3]
    return (np.empty(window, dtype=np.int64),
            np.empty(window, dtype=np.int64),
            np.empty(window, dtype=np.int64),
            np.empty((k, channels), dtype=x.dtype),
            np.empty((k, channels), dtype=x.dtype),
            np.empty(channels, dtype=x.dtype),
            np.empty(channels, dtype=x.dtype))


@functools.lru_cache(maxsize=None)
def _nhwc_forward(kind, kk):
    """The parallel NHWC forward for one kind of window and, for the
    register paths, one pool_range kk (0 for the tile path only): both
    constants of the closure, which Numba types as literals, so that a
    first call compiles its row function and no other. A kernel per pair,
    rather than one kernel with kind and kk as literal arguments
    (numba.literally): a Python call to a function that takes a literal
    retypes it every time (25 ms)."""
    @njit(parallel=True, cache=True)
    def kernel(x, tblT, k, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad,
               pad_value, oh_lo, oh_hi, ow_lo, ow_hi, workers, vectors, y):
        geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
        bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
        out_h = y.shape[1]
        rows = x.shape[0] * out_h
        # Rows split evenly over the workers, as prange would, with the
        # tile path's scratch made once per worker.
        for u in prange(workers):
            scratch = _fwd_scratch(x, kh * kw, k)
            for t in range(u * rows // workers, (u + 1) * rows // workers):
                n = t // out_h
                oh = t - n * out_h
                _fwd_row_nhwc(x, n, oh, tblT, k, kind, geo, bnd, y, scratch,
                              _PREFETCH_AHEAD, kk, vectors)

    return kernel


@njit(inline="always")
def _zero_rows(gx, n, h_lo, h_hi):
    """gx[n, h_lo:h_hi] = 0."""
    z = gx.dtype.type(0.0)
    for h in range(h_lo, h_hi):
        r = gx[n, h]
        for j in range(r.shape[0]):
            d = r[j]
            for c in range(d.shape[0]):
                d[c] = z


@njit(inline="always")
def _zero_cols(gx, n, h_lo, h_hi, w_lo, w_hi):
    """gx[n, h_lo:h_hi, w_lo:w_hi] = 0."""
    z = gx.dtype.type(0.0)
    for h in range(h_lo, h_hi):
        r = gx[n, h]
        for j in range(max(w_lo, 0), min(w_hi, r.shape[0])):
            d = r[j]
            for c in range(d.shape[0]):
                d[c] = z


@njit(inline="always")
def _rows_to_zero(row, row_lo, row_hi, n_rows, out_h, height, sh, pt, ext,
                  odd):
    """The input rows [z0, z1) of sample row // out_h that output row
    ``row`` zeroes before it first adds into them: the span of its window
    (rows oh * sh - pt + [0, ext)) less what was zeroed before. Before: by
    the previous output row of the same sample, when it is in this chunk
    or (odd: this chunk runs in the second pass) in the chunk before,
    which ran in the first pass. Odd chunks also leave the rows of the next
    chunk (first pass) alone. Chunks two apart share no input row, and the
    spans only move forward, so every covered row is zeroed exactly once,
    before any window adds into it; rows no window covers are zeroed by
    the caller."""
    n = row // out_h
    oh = row - n * out_h
    h0 = oh * sh - pt
    z0 = max(0, h0)
    z1 = min(height, h0 + ext)
    if oh > 0 and (row > row_lo or odd):
        z0 = max(z0, min(height, h0 - sh + ext))
    if odd and row_hi < n_rows and row_hi // out_h == n:
        z1 = min(z1, max(0, (row_hi - n * out_h) * sh - pt))
    return n, z0, z1


def _simd_row(x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi, geo, stores,
              in_block, k, ahead, kind):
    """_bwd_row_3x3_simd with pool_range k as a literal (1-4, or 9)."""
    # in_block + 0: typing reaches this call with in_block both as the
    # literal 0 and as int64, and would compile every row function twice.
    a = (x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi, geo, stores,
         in_block + 0, k, ahead)
    if k == 1:
        return _bwd_row_3x3_simd(a, 1)
    if k == 2:
        return _bwd_row_3x3_simd(a, 2)
    if k == 3:
        return _bwd_row_3x3_simd(a, 3)
    if k == 4:
        return _bwd_row_3x3_simd(a, 4)
    # 5-8 as 9: the table's rows from k on are 0, so the weights are
    # right; the values must then be distinct down to rank 9, not k + 1
    # (more blocks ranked, same numbers); the block sums of ranks k-8 are
    # never flushed. One specialisation instead of five: each takes tens
    # of seconds to compile.
    return _bwd_row_3x3_simd(a, 9)


def _call_3x3_window(xs, g, tpad, gxs, part, scr, stores, k, kind):
    _bwd_3x3_nhwc(xs, g, tpad, gxs, part, scr, stores, k)


def _skip_3x3_window(xs, g, tpad, gxs, part, scr, stores, k, kind):
    return None


def _skip_3x3_row(x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi, geo,
                  stores, in_block, k, ahead, kind):
    return in_block


def _window_3x3_loop(xs, g, tpad, gxs, part, scr, stores, k, kind):
    """_bwd_3x3_nhwc where the literal kind is 3; else nothing."""


def _row_3x3_simd(x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi, geo,
                  stores, in_block, k, ahead, kind):
    """_simd_row where the literal kind is 3; else returns in_block."""


@overload(_window_3x3_loop, prefer_literal=True, inline="always")
def _window_3x3_loop_typing(xs, g, tpad, gxs, part, scr, stores, k, kind):
    return _skip_3x3_window if _literal(kind) in (0, 2) else _call_3x3_window


@overload(_row_3x3_simd, prefer_literal=True, inline="always")
def _row_3x3_simd_typing(x, gy, tpad, gx, part, acc, n, oh, ow_lo, ow_hi,
                         geo, stores, in_block, k, ahead, kind):
    return _skip_3x3_row if _literal(kind) in (0, 2) else _simd_row


@njit(cache=True)
def _bwd_rows_nhwc(x, gy, tblT, tpad, k, kind, plain, geo, bnd, row_lo,
                   row_hi, zero, odd, gx, acc, ahead):
    """Output rows [row_lo, row_hi) (global index n * out_h + oh); ahead:
    the register paths' prefetch distance (see _PREFETCH_AHEAD); plain:
    windows do not overlap, so grad_x is stored, not accumulated; zero:
    grad_x holds anything and each row of it is zeroed here, just before
    its first use (see _rows_to_zero), which saves a pass over memory;
    for 3x3 stride 2 only the columns that the register path does not
    store first (first_stores below).
    kind is a literal (2, 3, or 0 for the tile path only): with the 2x2 and
    the 3x3 bodies both in one function the 2x2 backward ran 20-25%
    slower."""
    literally(kind)
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    out_h = gy.shape[1]
    out_w = gy.shape[2]
    channels = x.shape[3]
    n_rows = x.shape[0] * out_h
    ext = (kh - 1) * dh + 1
    window = kh * kw
    pos_h = np.empty(window, dtype=np.int64)
    pos_w = np.empty(window, dtype=np.int64)
    pos_s = np.empty(window, dtype=np.int64)
    top = np.empty((k, channels), dtype=x.dtype)
    top_s = np.empty((k, channels), dtype=x.dtype)
    carry = np.empty(channels, dtype=x.dtype)
    carry_s = np.empty(channels, dtype=x.dtype)
    wsel = np.empty(channels, dtype=x.dtype)
    # Rows 0-17: the register bodies' scratch; the weight gradient's
    # block sums (see _flush_partials) in rows 4-7 for 2x2 (the ranking
    # loop adds into them) and in rows 18-26 for 3x3.
    scr = np.zeros((27, channels), dtype=x.dtype)
    part = scr[4:8] if kind == 2 else scr[18:27]
    in_block = 0
    ak = acc[k]
    # 3x3 stride 2 (the usual overlapping case): the rows that an output
    # row is the first to write are not zeroed in full. Its register-path
    # windows store into their second and third columns there (window ow's
    # first column is the previous window's third), so only the columns
    # before the first such window's second column and after the last
    # one's third are zeroed (the tile path always adds). Zeroing the whole
    # rows cost about 15% of the 3x3 kernel: each zeroed line is read from
    # memory first.
    first_stores = (kind == 3 and zero and not plain and sh == 2
                    and sw == 2 and dh == 1 and dw == 1)
    col_lo = ow_lo * sw - pl + 1
    col_hi = (ow_hi - 1) * sw - pl + 3
    stores = 511 if plain else 0
    # Register-path windows in explicit vectors where the channels fill
    # whole ones.
    simd = kind > 0 and channels % lanes(x) == 0
    rs = dh * x.shape[2] * channels
    cs = dw * channels
    for row in range(row_lo, row_hi):
        n = row // out_h
        oh = row - n * out_h
        interior_row = kind > 0 and oh >= oh_lo and oh < oh_hi
        h0 = oh * sh - pt
        if zero:
            zn, z0, z1 = _rows_to_zero(row, row_lo, row_hi, n_rows, out_h,
                                       x.shape[1], sh, pt, ext, odd)
            if first_stores and interior_row and ow_lo < ow_hi:
                _zero_cols(gx, zn, z0, z1, 0, col_lo)
                _zero_cols(gx, zn, z0, z1, col_hi, x.shape[2])
                # Bits 3 dy + 1, 3 dy + 2 for the rows this row writes
                # first.
                stores = 0
                for dy in range(3):
                    if h0 + dy >= z0 and h0 + dy < z1:
                        stores |= 6 << (3 * dy)
            else:
                _zero_rows(gx, zn, z0, z1)
                stores = 511 if plain else 0
        for ow in range(out_w):
            inside = interior_row and ow >= ow_lo and ow < ow_hi
            if inside and simd and kind == 3:
                if ow == ow_lo:
                    in_block = _row_3x3_simd(x, gy, tpad, gx, part, ak, n,
                                             oh, ow_lo, ow_hi, geo, stores,
                                             in_block, k, ahead, kind)
            elif inside and simd:
                if ow == ow_lo:
                    in_block = _windows_2x2_simd(
                        x, gy, tpad, gx, part, ak,
                        ((n * x.shape[1] + h0) * x.shape[2] + ow * sw - pl)
                        * channels, ((n * out_h + oh) * out_w + ow) * channels,
                        sw * channels, ow_hi - ow_lo, rs, cs, plain,
                        in_block, k, ahead)
            elif inside:
                c0 = ow * sw - pl
                h1 = h0 + dh
                c1 = c0 + dw
                if kind == 2:
                    _bwd_2x2_nhwc(x[n, h0, c0], x[n, h0, c1], x[n, h1, c0],
                                  x[n, h1, c1], gy[n, oh, ow], tpad,
                                  (gx[n, h0, c0], gx[n, h0, c1],
                                   gx[n, h1, c0], gx[n, h1, c1]),
                                  scr, plain)
                elif kind == 3:
                    h2 = h1 + dh
                    c2 = c1 + dw
                    _window_3x3_loop(
                        (x[n, h0, c0], x[n, h0, c1], x[n, h0, c2],
                         x[n, h1, c0], x[n, h1, c1], x[n, h1, c2],
                         x[n, h2, c0], x[n, h2, c1], x[n, h2, c2]),
                        gy[n, oh, ow], tpad,
                        (gx[n, h0, c0], gx[n, h0, c1], gx[n, h0, c2],
                         gx[n, h1, c0], gx[n, h1, c1], gx[n, h1, c2],
                         gx[n, h2, c0], gx[n, h2, c1], gx[n, h2, c2]),
                        part, scr, stores, k, kind)
                in_block += 1
                if in_block == _BLOCK:
                    _flush_partials(part, ak, k)
                    in_block = 0
            else:
                _bwd_tile_nhwc(x, n, oh, ow, gy[n, oh, ow], tblT, k, kh, kw,
                               sh, sw, dh, dw, pt, pb, pl, pr, has_pad,
                               pad_value, pos_h, pos_w, pos_s, top, top_s,
                               carry, carry_s, wsel, gx, acc)
        if in_block > 0:
            _flush_partials(part, ak, k)
            in_block = 0


# Rows ahead that _block_in and _block_out prefetch where a block has more
# than _PLANE_STREAMS channels: a block reads (or writes) one row in each
# of its channels' planes, as many streams as it has channels. Side by
# side (3x3 s2 p1, NCHW): blocks of 32 float32 channels, forward k = 9
# 9-14% faster, backward 2-4%; blocks of 16 float64 channels 1-3% slower
# (the hardware prefetchers follow 16 streams). Distances 2, 4 and 8 about
# equal.
_PLANE_AHEAD = 4
_PLANE_STREAMS = 16


@njit(inline="always")
def _prefetch_planes(a, n, c0, block, h, write):
    """Prefetch row h of a[n, c0 + c] for c < block, a line at a time (for
    writing where write is set); nothing past the last row, nothing for
    blocks of _PLANE_STREAMS channels or fewer."""
    channels, height, width = a.shape[1], a.shape[2], a.shape[3]
    if h < height and block > _PLANE_STREAMS:
        line = lanes(a)  # a vector is a cache line, 64 bytes
        for c in range(block):
            start = ((n * channels + c0 + c) * height + h) * width
            for j in range(start, start + width + line - 1, line):
                j = min(j, start + width - 1)
                if write:
                    prefetch_write(a, j)
                else:
                    prefetch(a, j)


@njit(inline="always")
def _block_in(a, n, c0, s, h_lo, h_hi):
    """s[0, h, w, c] = a[n, c0 + c, h, w] for h_lo <= h < h_hi and c <
    s.shape[3] (a multiple of the lanes): transposed tiles of lanes x
    lanes, the columns past the last whole tile one by one."""
    channels, height, width = a.shape[1], a.shape[2], a.shape[3]
    block = s.shape[3]
    nl = lanes(a)
    tiled = width - width % nl
    plane = height * width
    for h in range(h_lo, h_hi):
        _prefetch_planes(a, n, c0, block, h + _PLANE_AHEAD, False)
        for cb in range(0, block, nl):
            src = ((n * channels + c0 + cb) * height + h) * width
            dst = h * width * block + cb
            for j in range(0, tiled, nl):
                transpose(a, src + j, plane, s, dst + j * block, block)
        d = s[0, h]
        for c in range(block):
            r = a[n, c0 + c, h]
            for j in range(tiled, width):
                d[j, c] = r[j]


@njit(inline="always")
def _block_out(s, a, n, c0, h_lo, h_hi):
    """a[n, c0 + c, h, w] = s[0, h, w, c] for h_lo <= h < h_hi: _block_in
    undone."""
    channels, height, width = a.shape[1], a.shape[2], a.shape[3]
    block = s.shape[3]
    nl = lanes(a)
    tiled = width - width % nl
    plane = height * width
    for h in range(h_lo, h_hi):
        _prefetch_planes(a, n, c0, block, h + _PLANE_AHEAD, True)
        for cb in range(0, block, nl):
            src = h * width * block + cb
            dst = ((n * channels + c0 + cb) * height + h) * width
            for j in range(0, tiled, nl):
                transpose(s, src + j * block, block, a, dst + j, plane)
        r = s[0, h]
        for c in range(block):
            d = a[n, c0 + c, h]
            for j in range(tiled, width):
                d[j] = r[j, c]


def _nhwc_backward(kind):
    """The parallel backward for one kind of window (a constant of the
    closure, as in _nhwc_forward; a kernel per pool_range as well made
    each further 3x3 pool_range cost 21 s to compile), on NHWC memory or
    (workers > 0) on NCHW memory by blocks of channels.

    NHWC: tbls[0], tpads[0] are the tables (k+1, k, C) and (9, C);
    acc[chunk, m, r, c] float64 partial sums of g * a(r), per chunk of
    output rows; zero: zero the rows of grad_x that windows cover (the
    caller zeroes the others).

    NCHW: each task, one sample and one block of channels (tbls[b] and
    tpads[b] its tables), moves its input plane and grad_y plane into
    channels-last scratch arrays (transposed tiles, see _block_in), runs
    the NHWC rows on them in bands of rows_per_chunk output rows and moves
    grad_x back as its rows are completed; acc[n, m, r, c] per sample. The
    scratch stays in cache, where channels-last copies of the whole
    tensors went through memory twice more. The tasks are split
    evenly over ``workers`` (the thread count), each with scratch of its
    own; ``uncovered`` marks the input rows no window covers, zeroed in
    the scratch. prefetch: whether the NHWC rows prefetch (see
    _PREFETCH_FROM_BYTES)."""
    @njit(parallel=True, cache=True)
    def kernel(x, gy, tbls, tpads, k, plain, kh, kw, sh, sw, dh, dw, pt, pb,
               pl, pr, has_pad, pad_value, oh_lo, oh_hi, ow_lo, ow_hi,
               rows_per_chunk, parity_passes, zero, workers, uncovered,
               prefetch, gx, acc):
        geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
        bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
        # One parallel loop and one call of the row function for both
        # layouts: a second loop compiled the rows a second time (20 s).
        blocks = workers > 0
        # No prefetching on the scratch of the blocks (it is in cache),
        # nor where the caller says the data fit in the caches.
        ahead = 0 if blocks or not prefetch else _PREFETCH_AHEAD
        n_rows = x.shape[0] * gy.shape[1]
        n_chunks = acc.shape[0]
        batch, _, height, width = x.shape
        out_h, out_w = gy.shape[2], gy.shape[3]
        n_blocks, block = tbls.shape[0], tbls.shape[3]
        n_tasks = batch * n_blocks
        step = 1 if blocks else parity_passes
        ext = (kh - 1) * dh + 1
        for phase in range(step):
            n_here = (workers if blocks
                      else (n_chunks - phase + step - 1) // step)
            for u in prange(n_here):
                chunk = phase + u * step
                # Scratch (empty for NHWC). The rows read x and grad_y, or
                # the scratch, through xs and gys; the scratch is written
                # through bx and bgy, typed apart from a read-only x. Numba
                # hoists these allocations out of the loop into the
                # function each worker runs over its share of iterations
                # (parallel_diagnostics, "Allocation hoisting"): a worker
                # reuses its own scratch, never another's.
                m = 1 if blocks else 0
                bx = np.empty((m, height, width, block), x.dtype)
                bgy = np.empty((m, out_h, out_w, block), x.dtype)
                gxs = np.empty((m, height, width, block), x.dtype)
                accs = np.empty((k + 1, k, block))
                if blocks:
                    xs, gys = bx, bgy
                    t_lo = u * n_tasks // workers
                    t_hi = (u + 1) * n_tasks // workers
                else:
                    xs, gys, gxs, accs = x, gy, gx, acc[chunk]
                    t_lo, t_hi = 0, 1
                for t in range(t_lo, t_hi):
                    n = t // n_blocks
                    b = t - n * n_blocks
                    c0 = b * block
                    n_bands = 1
                    if blocks:
                        _block_in(gy, n, c0, bgy, 0, out_h)
                        for h in range(height):
                            if uncovered[h]:
                                gxs[0, h] = 0.0
                        accs[...] = 0.0
                        n_bands = -(-out_h // rows_per_chunk)
                    # Blocks: the output rows in bands of rows_per_chunk,
                    # each band's input rows moved in just before it and
                    # the grad_x rows it completes moved out just after,
                    # so that scratch rows are used while in cache.
                    ready = 0
                    done = 0
                    for band in range(n_bands):
                        nxt = 0  # (defined on both paths, for parfors)
                        if blocks:
                            row_lo = band * rows_per_chunk
                            row_hi = min(row_lo + rows_per_chunk, out_h)
                            end = (row_hi - 1) * sh - pt + ext
                            need = min(height, max(0, end))
                            if need > ready:
                                _block_in(x, n, c0, bx, ready, need)
                                ready = need
                            # A band zeroes its rows as a chunk of the
                            # second pass does (odd below), up to the next
                            # band's first window: the rows it shares with
                            # the next band are zeroed here.
                            nxt = row_hi * sh - pt
                            if zero and row_hi < out_h:
                                for h in range(max(0, nxt), min(height, end)):
                                    gxs[0, h] = 0.0
                            odd = True
                        else:
                            row_lo = chunk * rows_per_chunk
                            row_hi = min(row_lo + rows_per_chunk, n_rows)
                            odd = phase == 1
                        _bwd_rows_nhwc(xs, gys, tbls[b], tpads[b], k, kind,
                                       plain, geo, bnd, row_lo, row_hi, zero,
                                       odd, gxs, accs, ahead)
                        if blocks:
                            fin = height
                            if row_hi < out_h:
                                fin = min(height, max(0, nxt))
                            if fin > done:
                                _block_out(gxs, gx, n, c0, done, fin)
                                done = fin
                    if blocks:
                        acc[n, :, :, c0:c0 + block] = accs
    return kernel


_BACKWARD_NHWC = {kind: _nhwc_backward(kind) for kind in (0, 2, 3)}


@functools.lru_cache(maxsize=None)
def _nchw_forward_blocks(kind, kk):
    """The NCHW forward by blocks of channels, for one kind of window and
    pool_range kk (constants of the closure, as in _nhwc_forward): one
    task per sample and block of channels (tbls[b] its table) moves the
    input rows each output row needs into channels-last scratch (_block_in)
    just before it, runs the NHWC forward's row function on the scratch and
    moves the block's output back. Tasks split evenly over ``workers``.
    Used for 3x3 windows from _NCHW_BLOCKS_FROM ranks on whose rows the
    NCHW 3x3 kernel cannot run in explicit vectors (a stride other than 2
    or a dilation): float32 6 or more, where it was faster than that
    kernel's loops (k = 7 / 8 / 9: 13.7 / 13.7 / 14.7 against 16.8 / 17.7
    / 20.2 ms for (32, 64, 112, 112) float32 on the Xeon; k = 6 9% faster
    on the EPYC since its moves prefetch, k = 5 the same), float64 every
    pool_range."""
    @njit(parallel=True, cache=True)
    def kernel(x, tbls, k, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad,
               pad_value, oh_lo, oh_hi, ow_lo, ow_hi, workers, vectors, y):
        geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
        bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
        batch, _, height, width = x.shape
        out_h, out_w = y.shape[2], y.shape[3]
        n_blocks, block = tbls.shape[0], tbls.shape[3]
        n_tasks = batch * n_blocks
        ext = (kh - 1) * dh + 1
        for u in prange(workers):
            # Scratch per worker (hoisted as in _nhwc_backward).
            bx = np.empty((1, height, width, block), x.dtype)
            by = np.empty((1, out_h, out_w, block), x.dtype)
            scratch = _fwd_scratch(bx, kh * kw, k)
            for t in range(u * n_tasks // workers,
                           (u + 1) * n_tasks // workers):
                n = t // n_blocks
                b = t - n * n_blocks
                c0 = b * block
                ready = 0
                for oh in range(out_h):
                    need = min(height, max(0, oh * sh - pt + ext))
                    if need > ready:
                        _block_in(x, n, c0, bx, ready, need)
                        ready = need
                    # No prefetching: the scratch rows are in cache.
                    _fwd_row_nhwc(bx, 0, oh, tbls[b], k, kind, geo, bnd, by,
                                  scratch, 0, kk, vectors)
                _block_out(by, y, n, c0, 0, out_h)
    return kernel


def _blocked(table: np.ndarray, block: int) -> np.ndarray:
    """A (..., C) table as (C // block, ..., block), C-contiguous: the
    table of each block of channels."""
    lead = table.shape[:-1]
    blocks = table.reshape(lead + (-1, block))
    return np.ascontiguousarray(np.moveaxis(blocks, -2, 0))


# --------------------------------------------------------------------------
# NCHW forward kernels (2x2, 3x3): one (sample, channel) plane per task,
# innermost loop along the output columns
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
def _scalar_window(x, n, oh, ow, c, tb, k, geo, top, top_pos):
    """y of one window of one NCHW plane by scalar insertion (any window:
    borders, padding, windows that keep fewer than k ranks)."""
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    m = _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw, pt, pb, pl,
                    pr, has_pad, pad_value, top, top_pos)
    acc = tb[m, 0] * top[0]
    for r in range(1, m):
        acc += tb[m, r] * top[r]
    return acc


@njit(inline="always")
def _row_2x2_nchw(x0, x1, yr, lo, hi, sw, pl, dw, p0, p1, p2, p3, kk):
    """yr[lo:hi] from input rows x0, x1 of one plane (window ow starts at
    column ow * sw - pl). The rows are sliced first so that every index
    counts up from 0: Numba wraps an index that may be negative around
    per element (ow * sw - pl with a run-time lo and pl), which kept this
    loop 3x slower than memory."""
    nan = yr.dtype.type(np.nan)
    base = lo * sw - pl
    a = x0[base:]
    b = x1[base:]
    yv = yr[lo:hi]
    for i in range(hi - lo):
        col = i * sw
        a0 = a[col]
        a1 = a[col + dw]
        a2 = b[col]
        a3 = b[col + dw]
        v0, v1, v2, v3 = _sort4_nan_free(a0, a1, a2, a3)
        acc = p0 * v0
        if kk >= 2:
            acc += p1 * v1
        if kk >= 3:
            acc += p2 * v2
        if kk >= 4:
            acc += p3 * v3
        yv[i] = nan if _any_nan4(a0, a1, a2, a3) else acc


@njit(inline="always")
def _row_2x2_nchw_simd(x, i0, i1, y, yo, count, p, kk):
    """_row_2x2_nchw for stride 2, no dilation, in explicit vectors
    (_simd), the outputs y.flat[yo:yo + count]: window t's columns are
    x.flat[i0 + 2 t] and the next in its top row, from x.flat[i1 + 2 t]
    in its bottom row, split into even and odd columns by load_pairs; p
    holds kk weights as vectors. The same network, products and sums as
    the loop form, bit for bit. Returns how many outputs it wrote: all
    count of them when there is at least one vector's worth (the last
    vector overlaps the one before, rather than leave a remainder to a
    scalar loop), else none."""
    nan = full(x, np.nan)
    nl = lanes(x)
    if count < nl:
        return 0
    for b in range(0, count, nl):
        t = min(b, count - nl)
        a0, a1 = load_pairs(x, i0 + 2 * t)
        a2, a3 = load_pairs(x, i1 + 2 * t)
        v = _sort4_nan_free(a0, a1, a2, a3)
        acc = p[0] * v[0]
        for r in range(1, kk):
            acc = acc + p[r] * v[r]
        store(y, yo + t, select(_any_nan4(a0, a1, a2, a3), nan, acc))
    return count


@njit(cache=True)
def _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, y, vectors, kk):
    """One (sample, channel) plane, compiled once per literal pool_range;
    vectors: whether the interior windows of stride-2 rows run in
    explicit vectors (_row_2x2_nchw_simd), where a row has at least a
    vector's worth of them (else the loop form runs them)."""
    literally(kk)
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    out_h = y.shape[2]
    out_w = y.shape[3]
    top = np.empty(k, dtype=x.dtype)
    top_pos = np.empty(k, dtype=np.int64)
    # The weights as scalars: loads from the table inside the loop could
    # alias the stores.
    p0 = tb[kk, 0]
    p1 = tb[kk, 1] if kk >= 2 else p0
    p2 = tb[kk, 2] if kk >= 3 else p0
    p3 = tb[kk, 3] if kk >= 4 else p0
    pv = (full(x, p0), full(x, p1), full(x, p2), full(x, p3))
    xp = x[n, c]
    yp = y[n, c]
    for oh in range(out_h):
        yr = yp[oh]
        lo = out_w
        hi = out_w
        if oh >= oh_lo and oh < oh_hi:
            lo = ow_lo
            hi = ow_hi
            h0 = oh * sh - pt
            _prefetch_plane_rows(x, n, c, h0 + _NCHW_ROWS_AHEAD * sh, 2, dh,
                                 False)
            # Literal strides for the common case: LLVM vectorises the
            # strided loads only when it knows the stride.
            if sw == 2 and dw == 1:
                mid = lo
                if vectors:
                    i0 = ((n * x.shape[1] + c) * x.shape[2] + h0) \
                        * x.shape[3] + 2 * lo - pl
                    mid += _row_2x2_nchw_simd(
                        x, i0, i0 + dh * x.shape[3], y,
                        ((n * y.shape[1] + c) * out_h + oh) * out_w + lo,
                        max(hi - lo, 0), pv, kk)
                _row_2x2_nchw(xp[h0], xp[h0 + dh], yr, mid, hi, 2, pl, 1,
                              p0, p1, p2, p3, kk)
            else:
                _row_2x2_nchw(xp[h0], xp[h0 + dh], yr, lo, hi, sw, pl, dw,
                              p0, p1, p2, p3, kk)
        # Border windows only (a loop over every column that skipped the
        # interior ones cost a third of the kernel).
        for ow in range(lo):
            yr[ow] = _scalar_window(x, n, oh, ow, c, tb, k, geo, top,
                                    top_pos)
        for ow in range(max(lo, hi), out_w):
            yr[ow] = _scalar_window(x, n, oh, ow, c, tb, k, geo, top,
                                    top_pos)


@njit(parallel=True, cache=True)
def _forward_nchw_2x2(x, table, per_channel, k, kh, kw, sh, sw, dh, dw, pt,
                      pb, pl, pr, has_pad, pad_value, oh_lo, oh_hi, ow_lo,
                      ow_hi, vectors, y):
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
    channels = x.shape[1]
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        tb = table[c if per_channel else 0]
        if k == 1:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, y, vectors, 1)
        elif k == 2:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, y, vectors, 2)
        elif k == 3:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, y, vectors, 3)
        else:
            _fwd_plane_nchw(x, n, c, tb, k, geo, bnd, y, vectors, 4)


@njit(inline="always")
def _padded_row(x, n, c, h, pt, pb, pl, pr, has_pad, pad_value, row):
    """Input row h of plane (n, c) as the windows see it: row[j] is column
    j - pl; columns outside the input hold pad_value where the padding
    has a value, and -inf where a window position is absent (the
    caller treats windows that keep fewer ranks than k separately)."""
    height = x.shape[2]
    width = x.shape[3]
    span = row.shape[0]
    ninf = x.dtype.type(-np.inf)
    pad_row = has_pad and h >= -pt and h < height + pb
    edge = pad_value if pad_row else ninf
    mid = min(max(pl, 0), span)
    for j in range(mid):
        row[j] = edge
    last = min(pl + width, span)
    if h >= 0 and h < height:
        # Indices from 0 (see _row_2x2_nchw): src[j - pl] for a run-time
        # j and pl is wrapped around per element.
        src = x[n, c, h][mid - pl:]
        dst = row[mid:last]
        for j in range(last - mid):
            dst[j] = src[j]
    else:
        for j in range(mid, last):
            row[j] = edge
    end_pad = min(max(pl + width + pr, last), span)
    for j in range(last, end_pad):
        row[j] = edge
    for j in range(end_pad, span):
        row[j] = ninf


@njit(inline="always")
def _sort_row_3x3_nchw(r0, r1, r2, yr, sw, dw, p0, p1, p2, p3, p4, p5, p6,
                       p7, p8, kk):
    """yr[ow] for every window of one output row, from the padded input
    rows r0, r1, r2 (window ow starts at column ow * sw)."""
    nan = yr.dtype.type(np.nan)
    for ow in range(yr.shape[0]):
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window9(r0, r1, r2, ow * sw,
                                                      dw)
        v0, v1, v2, v3, v4, v5, v6, v7, v8 = _top9_nan_free(
            a0, a1, a2, a3, a4, a5, a6, a7, a8, kk)
        acc = p0 * v0
        if kk >= 2:
            acc += p1 * v1
        if kk >= 3:
            acc += p2 * v2
        if kk >= 4:
            acc += p3 * v3
        if kk >= 5:
            acc += p4 * v4
        if kk >= 6:
            acc += p5 * v5
        if kk >= 7:
            acc += p6 * v6
        if kk >= 8:
            acc += p7 * v7
        if kk >= 9:
            acc += p8 * v8
        bad = _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8)
        yr[ow] = nan if bad else acc


@njit(inline="always")
def _edge_term(acc, v, ew, i, m, r):
    """acc + ew.flat[i:...] * v where r < m (lane by lane), else acc."""
    return select(full(ew, r) < m, acc + load(ew, i) * v, acc)


@njit(inline="always")
def _edge_sum(v, ew, step, t, m, kk):
    """sum_{r < m} ew.flat[t + r step:...] v[r] lane by lane, in rank order
    (m: a vector of rank counts, at most kk), written out: as a loop over
    r LLVM does not unroll it, and v goes to the stack."""
    acc = load(ew, t) * v[0]
    if kk > 1:
        acc = _edge_term(acc, v[1], ew, step + t, m, 1)
    if kk > 2:
        acc = _edge_term(acc, v[2], ew, 2 * step + t, m, 2)
    if kk > 3:
        acc = _edge_term(acc, v[3], ew, 3 * step + t, m, 3)
    if kk > 4:
        acc = _edge_term(acc, v[4], ew, 4 * step + t, m, 4)
    if kk > 5:
        acc = _edge_term(acc, v[5], ew, 5 * step + t, m, 5)
    if kk > 6:
        acc = _edge_term(acc, v[6], ew, 6 * step + t, m, 6)
    if kk > 7:
        acc = _edge_term(acc, v[7], ew, 7 * step + t, m, 7)
    if kk > 8:
        acc = _edge_term(acc, v[8], ew, 8 * step + t, m, 8)
    return acc


@njit(inline="always")
def _window_vectors_3x3(rows, t):
    """The nine vectors of windows t to t + lanes of a stride-2 row from
    its padded rows (see _row_3x3_nchw_simd), in scan order."""
    span = rows.shape[1]
    o = 2 * t
    a0, a1 = load_pairs(rows, o)
    a2, _ = load_pairs(rows, o + 2)
    a3, a4 = load_pairs(rows, span + o)
    a5, _ = load_pairs(rows, span + o + 2)
    a6, a7 = load_pairs(rows, 2 * span + o)
    a8, _ = load_pairs(rows, 2 * span + o + 2)
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@njit(inline="always")
def _plain_vector_3x3(rows, y, yo, t, p, nan, kk):
    """y.flat[yo + t:...] for windows t to t + lanes that keep kk ranks:
    the network, the products with the weight vectors p summed in rank
    order, NaN where a window holds one."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window_vectors_3x3(rows, t)
    v = _top9_nan_free(a0, a1, a2, a3, a4, a5, a6, a7, a8, kk)
    acc = p[0] * v[0]
    for r in range(1, kk):
        acc = acc + p[r] * v[r]
    bad = _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8)
    store(y, yo + t, select(bad, nan, acc))


@njit(inline="always")
def _row_3x3_nchw_simd(rows, y, yo, count, p, kk):
    """_sort_row_3x3_nchw for stride 2, no dilation, in explicit vectors
    (_simd): y.flat[yo:yo + count] from the padded rows, rows of shape
    (3, span + 1) (span = rows.shape[1] here); window t's columns 2 t,
    2 t + 1 by load_pairs, column 2 t + 2 as the even ones from 2 t + 2
    (which reads one element past the last window: the rows have a
    column to spare). p holds kk weights as vectors. The same
    network, products and sums as the loop form, bit for bit. Returns how
    many outputs it wrote, all or none, as _row_2x2_nchw_simd."""
    nan = full(rows, np.nan)
    nl = lanes(rows)
    if count < nl:
        return 0
    for b in range(0, count, nl):
        t = min(b, count - nl)
        _plain_vector_3x3(rows, y, yo, t, p, nan, kk)
    return count


@njit(inline="always")
def _row_3x3_nchw_edges_simd(rows, y, yo, count, p, e_lo, e_hi, kk):
    """_row_3x3_nchw_simd for a row whose windows outside [e_lo, e_hi)
    keep fewer ranks than kk (absent positions; see _edge_columns_3x3):
    a vector holding one takes window t's weights from rows[4:4 + kk, t]
    and sums rank r only where r < rows[3, t], its rank count (the rest
    are absent -inf, whose product with a zero weight would be NaN),
    which gives _edge_3x3_nchw's numbers. Windows without a present
    position are left to the caller. The vectors as _row_3x3_nchw_simd's,
    those inside [e_lo, e_hi) as there, the others in a loop of their own
    (in one loop with the others LLVM computes both sums for every vector
    and selects). Returns count, or 0 for a row narrower than a vector."""
    nan = full(rows, np.nan)
    span = rows.shape[1]
    nl = lanes(rows)
    if count < nl:
        return 0
    for b in range(0, count, nl):
        t = min(b, count - nl)
        if t < e_lo or t + nl > e_hi:
            continue
        _plain_vector_3x3(rows, y, yo, t, p, nan, kk)
    for b in range(0, count, nl):
        t = min(b, count - nl)
        if t >= e_lo and t + nl <= e_hi:
            continue
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window_vectors_3x3(rows, t)
        v = _top9_inline(a0, a1, a2, a3, a4, a5, a6, a7, a8, kk)
        acc = _edge_sum(v, rows, span, 4 * span + t, load(rows, 3 * span + t),
                        kk)
        bad = _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8)
        store(y, yo + t, select(bad, nan, acc))
    return count


@njit(inline="always")
def _edge_3x3_nchw(r0, r1, r2, col, dw, tb, m):
    """y of a 3x3 window with 1 <= m < k present positions (borders), from
    the padded rows (absent positions hold -inf and sort below the present
    ones, or tie with present -inf values, which gives the same values):
    the network sort and the table row of m ranks, summed in rank order as
    _scalar_window does. About 5x faster than the insertion there, which
    matters for k > 6, where every top-row and left-column window of a
    padded input lands here."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window9(r0, r1, r2, col, dw)
    if _any_nan9(a0, a1, a2, a3, a4, a5, a6, a7, a8):
        return r0.dtype.type(np.nan)
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = _sort9_nan_free(
        a0, a1, a2, a3, a4, a5, a6, a7, a8)
    # Table row m as a (ranks, 1) column, for _weighted's tb[r, c].
    return _weighted(v0, v1, v2, v3, v4, v5, v6, v7, v8, tb[m:m + 1].T, 0,
                     m)


@njit(inline="always")
def _present(start, step, size, lead, trail):
    """How many of the 3 positions start + i * step (i < 3) lie inside
    the input or its padding [-lead, size + trail)."""
    m = 0
    for i in range(3):
        q = start + i * step
        if q >= -lead and q < size + trail:
            m += 1
    return m


# The pool_range from which the NCHW 3x3 forward's vector rows take the
# windows that keep fewer ranks (_row_3x3_nchw_edges_simd).
_EDGE_VECTORS_FROM = 7


@njit(inline="always")
def _edge_columns_3x3(k, m_rows, pl, width, lead, trail, out_w):
    """For the vector rows (_row_3x3_nchw_simd) of output rows with m_rows
    present input rows, stride 2, no dilation: [e_lo, e_hi), the columns
    whose windows keep k ranks, one run (a window's present count rises
    and falls along a row); (0, 0) when there are none."""
    e_lo = 0
    while (e_lo < out_w and m_rows * _present(2 * e_lo - pl, 1, width, lead,
                                              trail) < k):
        e_lo += 1
    e_hi = out_w
    while (e_hi > e_lo and m_rows * _present(2 * e_hi - 2 - pl, 1, width,
                                             lead, trail) < k):
        e_hi -= 1
    if e_lo == e_hi:
        return 0, 0
    return e_lo, e_hi


@njit(inline="always")
def _edge_weights_3x3(tb, k, m_rows, pl, width, lead, trail, e_lo, e_hi,
                      nl, out_w, rows, kk):
    """For the columns of every vector that reaches outside [e_lo, e_hi)
    (_edge_columns_3x3), the weights of each window's rank count
    m = min(present positions, k) (rows[4:4 + kk, ow], zero from rank m
    on) and m (rows[3, ow])."""
    zero = tb.dtype.type(0.0)
    for j in range(out_w):
        if j >= e_lo + nl and j < e_hi - nl:
            continue
        m = min(m_rows * _present(2 * j - pl, 1, width, lead, trail), k)
        rows[3, j] = m
        for r in range(kk):
            rows[4 + r, j] = tb[m, r] if r < m else zero


@njit(cache=True)
def _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors, kk):
    """One (sample, channel) plane of a 3x3 forward, compiled once per
    literal pool_range. Each output row is one vectorised loop along the
    output columns over the three input rows copied into padded scratch
    rows, so that border windows need no branch: positions in the padding
    hold pad_value, absent positions -inf. For a window that keeps at
    least k ranks an absent position ranked as -inf changes nothing (the
    k largest values are the same values, and the table row is that of k
    ranks); windows that keep fewer (borders, with large k) take the
    weights of their own rank count: from _EDGE_VECTORS_FROM ranks on in
    the vector rows, by a per-column table of weights
    (_row_3x3_nchw_edges_simd), else redone one by one from the padded
    rows (_edge_3x3_nchw). vectors: whether rows of stride 2 run in
    explicit vectors (_row_3x3_nchw_simd), where a row has at least a
    vector's worth of windows (else the loop form runs them)."""
    literally(kk)
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    oh_lo, oh_hi, ow_lo, ow_hi = bnd
    height = x.shape[2]
    width = x.shape[3]
    out_h = y.shape[2]
    out_w = y.shape[3]
    top = np.empty(k, dtype=x.dtype)
    top_pos = np.empty(k, dtype=np.int64)
    span = (out_w - 1) * sw + 2 * dw + 1
    in_vectors = vectors and sw == 2 and dw == 1 and out_w >= lanes(x)
    # From 7 ranks on (every window of the first row and column of a 3x3
    # s2 p1 input keeps fewer) the vector rows take the windows that keep
    # fewer ranks than k too: their rank counts and weights per column in
    # rows 3 and 4 to 4 + kk of the scratch (as wide as the padded rows,
    # about twice the output row), for the present row count held. Below
    # 7 the few such windows (corners) are redone one by one.
    edges = in_vectors and kk >= _EDGE_VECTORS_FROM
    # One column to spare for _row_3x3_nchw_simd's last load.
    rows = np.empty((3 + (1 + kk if edges else 0), span + 1), dtype=x.dtype)
    # The weights as scalars before the loop (loads from the table inside
    # it could alias the stores).
    zero = x.dtype.type(0.0)
    p0 = tb[kk, 0]
    p1 = tb[kk, 1] if kk >= 2 else zero
    p2 = tb[kk, 2] if kk >= 3 else zero
    p3 = tb[kk, 3] if kk >= 4 else zero
    p4 = tb[kk, 4] if kk >= 5 else zero
    p5 = tb[kk, 5] if kk >= 6 else zero
    p6 = tb[kk, 6] if kk >= 7 else zero
    p7 = tb[kk, 7] if kk >= 8 else zero
    p8 = tb[kk, 8] if kk >= 9 else zero
    pv = (full(x, p0), full(x, p1), full(x, p2), full(x, p3), full(x, p4),
          full(x, p5), full(x, p6), full(x, p7), full(x, p8))
    r0 = rows[0]
    r1 = rows[1]
    r2 = rows[2]
    # Positions in the padding count as present only when it has a
    # value.
    lead = pl if has_pad else 0
    trail = pr if has_pad else 0
    held = -1
    e_lo = 0
    e_hi = out_w
    for oh in range(out_h):
        h0 = oh * sh - pt
        _prefetch_plane_rows(x, n, c, h0 + _NCHW_ROWS_AHEAD * sh, 3, dh,
                             False)
        _padded_row(x, n, c, h0, pt, pb, pl, pr, has_pad, pad_value, r0)
        _padded_row(x, n, c, h0 + dh, pt, pb, pl, pr, has_pad, pad_value,
                    r1)
        _padded_row(x, n, c, h0 + 2 * dh, pt, pb, pl, pr, has_pad,
                    pad_value, r2)
        yr = y[n, c, oh]
        m_rows = _present(h0, dh, height, pt if has_pad else 0,
                          pb if has_pad else 0)
        if edges and m_rows != held:
            held = m_rows
            e_lo, e_hi = _edge_columns_3x3(k, m_rows, pl, width, lead,
                                           trail, out_w)
            if e_lo > 0 or e_hi < out_w:
                _edge_weights_3x3(tb, k, m_rows, pl, width, lead, trail,
                                  e_lo, e_hi, lanes(x), out_w, rows, kk)
        # Literal stride and dilation for the common case: LLVM vectorises
        # the strided loads only when it knows the stride.
        done = False
        if sw == 2 and dw == 1:
            yo = ((n * y.shape[1] + c) * out_h + oh) * out_w
            if edges and (e_lo > 0 or e_hi < out_w):
                done = _row_3x3_nchw_edges_simd(rows, y, yo, out_w, pv, e_lo,
                                                e_hi, kk) > 0
            elif in_vectors:
                done = _row_3x3_nchw_simd(rows, y, yo, out_w, pv, kk) > 0
            if not done:
                _sort_row_3x3_nchw(r0, r1, r2, yr, 2, 1, p0, p1, p2, p3, p4,
                                   p5, p6, p7, p8, kk)
        else:
            _sort_row_3x3_nchw(r0, r1, r2, yr, sw, dw, p0, p1, p2, p3, p4,
                               p5, p6, p7, p8, kk)
        # Only the border columns (all of them in border rows).
        lo = out_w
        hi = out_w
        if oh >= oh_lo and oh < oh_hi:
            lo = ow_lo
            hi = max(ow_lo, ow_hi)
        for j in range(out_w - (hi - lo)):
            ow = j if j < lo else j + (hi - lo)
            m = m_rows * _present(ow * sw - pl, dw, width, lead, trail)
            if m >= k or (m > 0 and done and edges):
                continue
            if m > 0:
                yr[ow] = _edge_3x3_nchw(r0, r1, r2, ow * sw, dw, tb, m)
            else:
                yr[ow] = _scalar_window(x, n, oh, ow, c, tb, k, geo, top,
                                        top_pos)


@njit(parallel=True, cache=True)
def _forward_nchw_3x3(x, table, per_channel, k, kh, kw, sh, sw, dh, dw, pt,
                      pb, pl, pr, has_pad, pad_value, oh_lo, oh_hi, ow_lo,
                      ow_hi, vectors, y):
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    bnd = (oh_lo, oh_hi, ow_lo, ow_hi)
    channels = x.shape[1]
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        tb = table[c if per_channel else 0]
        # One specialisation per literal pool_range (see _nhwc_forward).
        if k == 1:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                1)
        elif k == 2:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                2)
        elif k == 3:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                3)
        elif k == 4:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                4)
        elif k == 5:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                5)
        elif k == 6:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                6)
        elif k == 7:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                7)
        elif k == 8:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                8)
        else:
            _fwd_plane_nchw_3x3(x, n, c, tb, k, geo, bnd, y, vectors,
                                9)


@njit(inline="always")
def _rank_row_2x2_nchw(x0, x1, gr, p0, p1, p2, p3, scr, nan_aware):
    """The ranking loop of _bwd_row_2x2_nchw; nan_aware is a constant."""
    zero = x0.dtype.type(0.0)
    one = x0.dtype.type(1.0)
    for i in range(gr.shape[0]):
        col = 2 * i
        a0 = x0[col]
        a1 = x0[col + 1]
        a2 = x1[col]
        a3 = x1[col + 1]
        gc = gr[i]
        r0, r1, r2, r3 = _ranks4(a0, a1, a2, a3, one, zero, nan_aware)
        scr[0, i] = gc * _pick4(r0, p0, p1, p2, p3)
        scr[1, i] = gc * _pick4(r1, p0, p1, p2, p3)
        scr[2, i] = gc * _pick4(r2, p0, p1, p2, p3)
        scr[3, i] = gc * _pick4(r3, p0, p1, p2, p3)
        if nan_aware:
            v0, v1, v2, v3 = _sort4(a0, a1, a2, a3)
        else:
            v0, v1, v2, v3 = _sort4_nan_free(a0, a1, a2, a3)
        scr[4, i] += gc * v0
        scr[5, i] += gc * v1
        scr[6, i] += gc * v2
        scr[7, i] += gc * v3


@njit(inline="always")
def _bwd_row_2x2_nchw(x0, x1, gr, d0, d1, p0, p1, p2, p3, scr):
    """One output row of a 2x2 stride-2 backward on NCHW planes: input rows
    x0, x1, grad_y row gr, grad_x rows d0, d1 (stored, not added: the
    windows do not overlap). As in the NHWC kernel the ranking loop
    writes only the scratch tile scr: rows 0-3 get g * the weight of each
    position, and g * a(r) is added into rows 4-7, the weight gradient's
    block sums per window column (element-wise, so they vectorise: a sum
    over the row would be a serial chain of additions; see
    _backward_nchw_2x2). Short loops then store grad_x. Rows without NaN
    (checked first) rank with one comparison per pair and sort with the
    NaN-free network."""
    out_w = gr.shape[0]
    bad = False
    for j in range(2 * out_w):
        bad |= (x0[j] != x0[j]) | (x1[j] != x1[j])
    if bad:
        _rank_row_2x2_nchw(x0, x1, gr, p0, p1, p2, p3, scr, True)
    else:
        _rank_row_2x2_nchw(x0, x1, gr, p0, p1, p2, p3, scr, False)
    s0 = scr[0]
    s1 = scr[1]
    for i in range(out_w):
        d0[2 * i] = s0[i]
        d0[2 * i + 1] = s1[i]
    s2 = scr[2]
    s3 = scr[3]
    for i in range(out_w):
        d1[2 * i] = s2[i]
        d1[2 * i + 1] = s3[i]


@njit(inline="always")
def _bwd_row_2x2_nchw_simd(x, i0, gy, go, gx, scr, count, p, iota):
    """_bwd_row_2x2_nchw in explicit vectors of output columns (_simd), all
    count of them, when count fills at least one vector (else nothing is
    done; returns whether it was): window t's top-row columns are
    x.flat[i0 + 2 t] and the next (load_pairs), its bottom row one input
    row further on, its g gy.flat[go + t]; grad_x goes to the same flat
    places of gx (store_pairs). Per vector, the ranks from the pairwise
    comparisons (NaN-aware only where a lane holds a NaN) and the weights
    by selects from the 4 weights p (zero where a rank is not kept), as
    _windows_2x2_simd; the sorted values by the network the loop form
    uses, added into the block sums scr[4:] (per output column). The last
    vector overlaps the one before; there the block sums of the columns
    done already are kept as they were (iota: the lanes' numbers). The
    same numbers as the loop form, bit for bit."""
    nl = lanes(x)
    if count < nl:
        return False
    out_w = scr.shape[1]
    zero = zeros(x)
    one = full(x, 1.0)
    two = full(x, 2.0)
    for b in range(0, count, nl):
        t = min(b, count - nl)
        o = i0 + 2 * t
        a0, a1 = load_pairs(x, o)
        a2, a3 = load_pairs(x, o + x.shape[3])
        g = load(gy, go + t)
        if any_lane(_any_nan4(a0, a1, a2, a3)):
            r0, r1, r2, r3 = _vector_ranks4(a0, a1, a2, a3, zero, one, True)
            v = _sort4(a0, a1, a2, a3)
        else:
            r0, r1, r2, r3 = _vector_ranks4(a0, a1, a2, a3, zero, one,
                                            False)
            v = _sort4_nan_free(a0, a1, a2, a3)
        w0 = _of_rank(r0, zero, one, two, p[0], p[1], p[2], p[3])
        w1 = _of_rank(r1, zero, one, two, p[0], p[1], p[2], p[3])
        w2 = _of_rank(r2, zero, one, two, p[0], p[1], p[2], p[3])
        w3 = _of_rank(r3, zero, one, two, p[0], p[1], p[2], p[3])
        store_pairs(gx, o, g * w0, g * w1)
        store_pairs(gx, o + x.shape[3], g * w2, g * w3)
        fresh = load(iota, 0) >= full(x, b - t)
        for r in range(4):
            j = (4 + r) * out_w + t
            s = load(scr, j)
            store(scr, j, select(fresh, s + g * v[r], s))
    return True


@njit(inline="always")
def _zero_plane(gp, h_lo, h_hi, w_lo):
    """gp[h_lo:h_hi, w_lo:] = 0 for one plane gp (H, W)."""
    z = gp.dtype.type(0.0)
    for h in range(h_lo, h_hi):
        r = gp[h]
        for j in range(w_lo, r.shape[0]):
            r[j] = z


@njit(inline="always")
def _add_column_totals(accv, dst, c, k):
    """dst[r, c] += the sum of accv[r] in order, for r < k: a plane's
    float64 weight-gradient sums per output column, added up in a fixed
    order."""
    for r in range(k):
        total = 0.0
        a = accv[r]
        for i in range(a.shape[0]):
            total += a[i]
        dst[r, c] += total


@njit(parallel=True, cache=True)
def _backward_nchw_2x2(x, gy, table, per_channel, k, gx, acc, vectors):
    """2x2 stride-2 backward of NCHW arrays whose windows all lie inside
    the input (no padding); the last row and column of an odd-sized input
    belong to no window and are zeroed. One task per (sample, channel)
    plane, so that each task reads and writes long contiguous runs;
    acc[n, k, r, c] gets the plane's weight-gradient partial sums, reduced
    from per-column float64 sums in a fixed order, so results do not
    depend on the thread count. Each column's products are summed in the
    input's dtype over blocks of at most _BLOCK output rows first."""
    channels = x.shape[1]
    height = x.shape[2]
    width = x.shape[3]
    out_h = gy.shape[2]
    out_w = gy.shape[3]
    zero = x.dtype.type(0.0)
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        tb = table[c if per_channel else 0]
        # Unkept ranks select weight 0 (the zero-padded table of the NHWC
        # kernel).
        p0 = tb[k, 0]
        p1 = tb[k, 1] if k >= 2 else zero
        p2 = tb[k, 2] if k >= 3 else zero
        p3 = tb[k, 3] if k >= 4 else zero
        pv = (full(x, p0), full(x, p1), full(x, p2), full(x, p3))
        iota = np.arange(lanes(x)).astype(x.dtype)
        scr = np.zeros((8, out_w), dtype=x.dtype)
        part = scr[4:]
        accv = np.zeros((k, out_w))
        xp = x[n, c]
        dp = gx[n, c]
        gp = gy[n, c]
        for oh in range(out_h):
            ha = 2 * (oh + _NCHW_ROWS_AHEAD)
            _prefetch_plane_rows(x, n, c, ha, 2, 1, False)
            _prefetch_plane_rows(gx, n, c, ha, 2, 1, True)
            _prefetch_plane_rows(gy, n, c, oh + _NCHW_ROWS_AHEAD, 1, 1,
                                 False)
            i0 = ((n * channels + c) * height + 2 * oh) * width
            if not (vectors and _bwd_row_2x2_nchw_simd(
                    x, i0, gy, ((n * channels + c) * out_h + oh) * out_w,
                    gx, scr, out_w, pv, iota)):
                _bwd_row_2x2_nchw(xp[2 * oh], xp[2 * oh + 1], gp[oh],
                                  dp[2 * oh], dp[2 * oh + 1], p0, p1, p2,
                                  p3, scr)
            if (oh + 1) % _BLOCK == 0 or oh + 1 == out_h:
                _flush_partials(part, accv, k)
        _zero_plane(dp, 0, 2 * out_h, 2 * out_w)
        _zero_plane(dp, 2 * out_h, height, 0)
        _add_column_totals(accv, acc[n, k], c, k)


@njit(inline="always")
def _bwd_row_3x3_nchw_simd(rows, r0, r1, r2, gy, go, s, so, part, sus,
                           count, p, f, k, iota, kk):
    """The windows of one output row of a 3x3 stride-2 backward on an NCHW
    plane, in explicit vectors of output columns (count >= lanes, the
    last vector overlapping the one before, as _row_3x3_nchw_simd): the
    values from the padded rows ``rows`` (as the forward's), g from
    gy.flat[go + t]. Window t's g * weight of position q (scan order) goes
    to s.flat[so + q * ws + t], or t + 1 for the third column (ws =
    sus.shape[0]), so that the two windows sharing a column add up
    element by element; g * the value of rank r is added into the block
    sums part[r, t]. Lanes whose kept values include -inf (an absent
    position is kept: a window with fewer positions than pool_range, or a
    tie with one) are marked in sus (1, else 0) and left out of the block
    sums, for the caller to redo; returns whether any lane was. p: the
    9 weight vectors (0 from rank k on), f[r] the vector of r, iota the
    lanes' numbers."""
    ws = sus.shape[0]
    nl = lanes(rows)
    zero = f[0]
    one = f[1]
    ninf = full(rows, -np.inf)
    marked = False
    for b in range(0, count, nl):
        t = min(b, count - nl)
        o = 2 * t
        a0, a1 = load_pairs(rows, r0 + o)
        a2, _ = load_pairs(rows, r0 + o + 2)
        a3, a4 = load_pairs(rows, r1 + o)
        a5, _ = load_pairs(rows, r1 + o + 2)
        a6, a7 = load_pairs(rows, r2 + o)
        a8, _ = load_pairs(rows, r2 + o + 2)
        g = load(gy, go + t)
        gw, v = _grads_3x3_simd((a0, a1, a2, a3, a4, a5, a6, a7, a8), g, p,
                                f, kk)
        for q in range(9):
            store(s, so + q * ws + t + (q % 3) // 2, gw[q])
        bad = v[k - 1] == ninf
        store(sus, t, select(bad, one, zero))
        marked |= any_lane(bad)
        keep = (load(iota, 0) >= full(rows, b - t)) & ~bad
        for r in range(kk):
            j = r * ws + t
            c = load(part, j)
            store(part, j, select(keep, c + g * v[r], c))
    return marked


@njit
def _redo_3x3_nchw(x, n, oh, ow, c, g, tb, k, geo, s, so, acc, top,
                   top_pos):
    """Window (oh, ow) of plane (n, c) by scalar insertion (_select_top),
    for the lanes _bwd_row_3x3_nchw_simd marks: its 9 entries of s (laid
    out as there) are overwritten, and g * the value of each rank goes
    into acc[n, m, r, c] for its m kept ranks."""
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    ws = (s.shape[0] // 18)
    m = _select_top(x, n, oh, ow, c, k, kh, kw, sh, sw, dh, dw, pt, pb, pl,
                    pr, has_pad, pad_value, top, top_pos)
    zero = x.dtype.type(0.0)
    for q in range(9):
        s[so + q * ws + ow + (q % 3) // 2] = zero
    for r in range(m):
        q = top_pos[r]
        s[so + q * ws + ow + (q % 3) // 2] = g * tb[m, r]
        acc[n, m, r, c] += g * top[r]


@njit(inline="always")
def _put_row_3x3_nchw(gx, n, c, h, pairs, pl, s, e0, e1, e2, e3, o0, o1,
                      four):
    """Row h of grad_x's plane (n, c),
    from the window entries in s (see _bwd_row_3x3_nchw_simd): padded
    column 2 u gets the sum of s.flat[e + u] over the rows e (((e0 + e1)
    + e2) + e3, or e2 + e3 where four is False), padded column 2 u + 1
    that of s.flat[o + u] (o0 + o1, or o1); column j of the row is padded
    column j + pl. Pairs of columns in explicit vectors (pairs = width //
    2 >= lanes, the last vector overlapping the one before), an odd last
    column on its own."""
    nl = lanes(s)
    width = gx.shape[3]
    base = ((n * gx.shape[1] + c) * gx.shape[2] + h) * width
    eo = (pl + 1) // 2
    oo = pl // 2
    for b in range(0, pairs, nl):
        t = min(b, pairs - nl)
        i = t + eo
        j = t + oo
        if four:
            e = (((load(s, e0 + i) + load(s, e1 + i)) + load(s, e2 + i))
                 + load(s, e3 + i))
            o = load(s, o0 + j) + load(s, o1 + j)
        else:
            e = load(s, e2 + i) + load(s, e3 + i)
            o = load(s, o1 + j)
        if pl % 2 == 0:
            store_pairs(gx, base + 2 * t, e, o)
        else:
            store_pairs(gx, base + 2 * t, o, e)
    last = 2 * pairs
    if last < width:
        u = (last + pl) // 2
        if (last + pl) % 2 == 0:
            if four:
                v = ((s[e0 + u] + s[e1 + u]) + s[e2 + u]) + s[e3 + u]
            else:
                v = s[e2 + u] + s[e3 + u]
        elif four:
            v = s[o0 + u] + s[o1 + u]
        else:
            v = s[o1 + u]
        gx[n, c, h, last] = v


@njit(cache=True)
def _bwd_plane_nchw_3x3(x, gy, n, c, tb, k, geo, gx, acc, kk):
    """One (sample, channel) plane of a 3x3 stride-2 backward without
    dilation (any padding, pad_value, ceil_mode), compiled for kk = 2
    (pool_range 1-2) and 4 (3-4: the weight of an unkept rank is 0, the
    ties checked one rank further, the same numbers). Per output row: its
    input rows in padded scratch rows (as the forward's; three slots, its
    first row is the previous output row's third, copied once), every
    window in explicit vectors (_bwd_row_3x3_nchw_simd) into per-window entries
    of a scratch row set (two sets, this row's and the previous one's),
    the windows it marks redone one by one (_redo_3x3_nchw), then the
    grad_x rows this output row completes stored from the entries: the
    row it shares with the previous output row (((previous row's third
    window row: two entries) + this row's first: two), the middle one,
    and after the last output row its third; rows below no window are
    zeroed. Needs at least a vector of output columns and of column
    pairs."""
    literally(kk)
    (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value) = geo
    height = x.shape[2]
    width = x.shape[3]
    out_h = gy.shape[2]
    out_w = gy.shape[3]
    channels = x.shape[1]
    pairs = width // 2
    span = 2 * out_w + 1
    rows = np.empty((3, span + 1), dtype=x.dtype)
    ws = max(out_w + 1, pairs + (pl + 1) // 2 + 1)
    s = np.zeros(18 * ws, dtype=x.dtype)
    sus = np.zeros(ws, dtype=x.dtype)
    part = np.zeros((9, ws), dtype=x.dtype)
    accv = np.zeros((k, ws))
    iota = np.arange(lanes(x)).astype(x.dtype)
    top = np.empty(k, dtype=x.dtype)
    top_pos = np.empty(k, dtype=np.int64)
    zero = zeros(x)
    f = (zero, full(x, 1.0), full(x, 2.0), full(x, 3.0), full(x, 4.0),
         full(x, 5.0), full(x, 6.0), full(x, 7.0), full(x, 8.0))
    # The weights as vectors, 0 from rank k on.
    wk = np.zeros(9, dtype=x.dtype)
    wk[:k] = tb[k]
    pv = (full(x, wk[0]), full(x, wk[1]), full(x, wk[2]), full(x, wk[3]),
          full(x, wk[4]), full(x, wk[5]), full(x, wk[6]), full(x, wk[7]),
          full(x, wk[8]))
    # The padded rows' scratch slots: an output row's first input row is
    # the previous one's third, copied once.
    lowest = 2
    for oh in range(out_h):
        h0 = 2 * oh - pt
        ha = h0 + 2 * _NCHW_ROWS_AHEAD
        _prefetch_plane_rows(x, n, c, ha + 1, 2, 1, False)
        _prefetch_plane_rows(gx, n, c, ha, 2, 1, True)
        _prefetch_plane_rows(gy, n, c, oh + _NCHW_ROWS_AHEAD, 1, 1, False)
        upper = lowest if oh > 0 else 0
        middle = (upper + 1) % 3
        lowest = (upper + 2) % 3
        if oh == 0:
            _padded_row(x, n, c, h0, pt, pb, pl, pr, has_pad, pad_value,
                        rows[upper])
        _padded_row(x, n, c, h0 + 1, pt, pb, pl, pr, has_pad, pad_value,
                    rows[middle])
        _padded_row(x, n, c, h0 + 2, pt, pb, pl, pr, has_pad, pad_value,
                    rows[lowest])
        cur = (oh % 2) * 9 * ws
        prev = 9 * ws - cur
        go = ((n * channels + c) * out_h + oh) * out_w
        stride = rows.shape[1]
        if _bwd_row_3x3_nchw_simd(rows, upper * stride, middle * stride,
                                  lowest * stride, gy, go, s, cur, part,
                                  sus, out_w, pv, f, k, iota, kk):
            for ow in range(out_w):
                if sus[ow] != 0:
                    _redo_3x3_nchw(x, n, oh, ow, c, gy[n, c, oh, ow], tb, k,
                                   geo, s, cur, acc, top, top_pos)
        if h0 >= 0 and h0 < height:
            if oh > 0:
                _put_row_3x3_nchw(gx, n, c, h0, pairs, pl, s,
                                  prev + 8 * ws, prev + 6 * ws,
                                  cur + 2 * ws, cur, prev + 7 * ws,
                                  cur + ws, True)
            else:
                _put_row_3x3_nchw(gx, n, c, h0, pairs, pl, s,
                                  0, 0, cur + 2 * ws, cur, 0, cur + ws,
                                  False)
        if h0 + 1 >= 0 and h0 + 1 < height:
            _put_row_3x3_nchw(gx, n, c, h0 + 1, pairs, pl, s,
                              0, 0, cur + 5 * ws, cur + 3 * ws, 0,
                              cur + 4 * ws, False)
        if (oh + 1) % _BLOCK == 0 or oh + 1 == out_h:
            _flush_partials(part, accv, k)
    h = 2 * out_h - pt
    if h >= 0 and h < height:
        last = ((out_h - 1) % 2) * 9 * ws
        _put_row_3x3_nchw(gx, n, c, h, pairs, pl, s, 0, 0,
                          last + 8 * ws, last + 6 * ws, 0, last + 7 * ws,
                          False)
    _zero_plane(gx[n, c], max(0, h + 1), height, 0)
    _add_column_totals(accv, acc[n, k], c, k)


@njit(parallel=True, cache=True)
def _backward_nchw_3x3(x, gy, table, per_channel, k, kh, kw, sh, sw, dh, dw,
                       pt, pb, pl, pr, has_pad, pad_value, gx, acc):
    """3x3 stride-2 backward without dilation of NCHW arrays, one task per
    (sample, channel) plane (_bwd_plane_nchw_3x3); acc[n, m, r, c] gets
    the plane's weight-gradient partial sums, so results do not depend on
    the thread count."""
    geo = (kh, kw, sh, sw, dh, dw, pt, pb, pl, pr, has_pad, pad_value)
    channels = x.shape[1]
    for t in prange(x.shape[0] * channels):
        n = t // channels
        c = t - n * channels
        tb = table[c if per_channel else 0]
        if k <= 2:
            _bwd_plane_nchw_3x3(x, gy, n, c, tb, k, geo, gx, acc, 2)
        else:
            _bwd_plane_nchw_3x3(x, gy, n, c, tb, k, geo, gx, acc, 4)


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
    kind = {(2, 2): 2, (3, 3): 3}.get((g.kernel_h, g.kernel_w), 0)
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


@njit(parallel=True, cache=True)
def _nchw_to_nhwc(src, dst):
    """dst[n, h, w, c] = src[n, c, h, w], one (sample, row) per task: reads
    run along W, the strided writes stay inside one (W, C) plane. Channels
    go 16 at a time, so that each column's stores fill whole cache lines
    (float32 16.9 -> 12.5 ms, float64 50 -> 23 ms for (32, 64, 112, 112)
    here, against one channel at a time); the remaining channels one at a
    time."""
    channels = src.shape[1]
    height = src.shape[2]
    width = src.shape[3]
    full = channels - channels % 16
    for t in prange(src.shape[0] * height):
        n = t // height
        h = t - n * height
        d = dst[n, h]
        for c in range(0, full, 16):
            s0 = src[n, c, h]
            s1 = src[n, c + 1, h]
            s2 = src[n, c + 2, h]
            s3 = src[n, c + 3, h]
            s4 = src[n, c + 4, h]
            s5 = src[n, c + 5, h]
            s6 = src[n, c + 6, h]
            s7 = src[n, c + 7, h]
            s8 = src[n, c + 8, h]
            s9 = src[n, c + 9, h]
            s10 = src[n, c + 10, h]
            s11 = src[n, c + 11, h]
            s12 = src[n, c + 12, h]
            s13 = src[n, c + 13, h]
            s14 = src[n, c + 14, h]
            s15 = src[n, c + 15, h]
            for col in range(width):
                dc = d[col]
                dc[c] = s0[col]
                dc[c + 1] = s1[col]
                dc[c + 2] = s2[col]
                dc[c + 3] = s3[col]
                dc[c + 4] = s4[col]
                dc[c + 5] = s5[col]
                dc[c + 6] = s6[col]
                dc[c + 7] = s7[col]
                dc[c + 8] = s8[col]
                dc[c + 9] = s9[col]
                dc[c + 10] = s10[col]
                dc[c + 11] = s11[col]
                dc[c + 12] = s12[col]
                dc[c + 13] = s13[col]
                dc[c + 14] = s14[col]
                dc[c + 15] = s15[col]
        for c in range(full, channels):
            s = src[n, c, h]
            for col in range(width):
                d[col, c] = s[col]


@njit(parallel=True, cache=True)
def _nhwc_to_nchw(src, dst):
    """dst[n, c, h, w] = src[n, h, w, c], one (sample, row) per task."""
    height = src.shape[1]
    width = src.shape[2]
    channels = src.shape[3]
    for t in prange(src.shape[0] * height):
        n = t // height
        h = t - n * height
        s = src[n, h]
        for c in range(channels):
            d = dst[n, c, h]
            for col in range(width):
                d[col] = s[col, c]


def _view(a: np.ndarray, layout: str, order: str) -> np.ndarray:
    """``a`` (in ``layout``) as a view with its axes in ``order``."""
    if layout == order:
        return a
    return a.transpose(0, 2, 3, 1) if layout == "NCHW" else \
        a.transpose(0, 3, 1, 2)


def _to(a: np.ndarray, layout: str, memory: str, dtype) -> np.ndarray:
    """``a`` (in ``layout``) as a C-contiguous array in ``memory`` order.
    Between the two C-contiguous orders the copy is a parallel Numba
    kernel (NumPy's transposing copy took 35-100 ms for 100 MB here, several
    times the pooling itself)."""
    source = _memory_layout(a, layout)
    if (source and source != memory and a.dtype == dtype and a.size
            and a.dtype in (np.float32, np.float64)):
        src = _view(a, layout, source)
        dst = np.empty(_view(a, layout, memory).shape, dtype)
        if source == "NCHW":
            _nchw_to_nhwc(src, dst)
        else:
            _nhwc_to_nchw(src, dst)
        return dst
    return np.ascontiguousarray(_view(a, layout, memory), dtype=dtype)


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


def _target(out: Optional[np.ndarray], layout: str,
            memory: str) -> Optional[np.ndarray]:
    """``out`` as the C-contiguous ``memory``-ordered array a kernel can
    write into, or None (no out, or out has other strides)."""
    if out is None:
        return None
    view = _view(out, layout, memory)
    return view if view.flags.c_contiguous else None


def _deliver(a: np.ndarray, memory: str, out: np.ndarray,
             layout: str) -> np.ndarray:
    """Copy a kernel's result (C-contiguous, ``memory`` order) into
    ``out``: by the parallel copy kernels when out is C-contiguous in the
    other order, else by NumPy."""
    other = "NCHW" if memory == "NHWC" else "NHWC"
    dst = _target(out, layout, other)
    if dst is not None and a.size:
        (_nhwc_to_nchw if memory == "NHWC" else _nchw_to_nhwc)(a, dst)
    else:
        out[...] = _from(a, memory, layout)
    return out


def _kernel_memory(x: np.ndarray, p: Problem) -> str:
    """Which forward kernels run: NCHW ones only for 2x2 and 3x3 on
    NCHW-ordered memory."""
    memory = _memory_layout(x, p.layout) or p.layout
    if memory == "NCHW" and (p.geometry.kernel_h,
                             p.geometry.kernel_w) not in ((2, 2), (3, 3)):
        return "NHWC"
    return memory


def _nhwc_table(table: np.ndarray, channels: int) -> np.ndarray:
    """table (Cw, k+1, k) as (k+1, k, C): the channel axis contiguous."""
    out = np.empty(table.shape[1:] + (channels,), table.dtype)
    out[...] = np.transpose(table, (1, 2, 0))  # broadcasts a shared row
    return out


def _tables(w: np.ndarray, p: Problem):
    """(table64, table, tblT) for w and p: the float64 softmax table, the
    same in the dtype of x, and as _nhwc_table. The last 8 are kept (keyed
    by w's bytes, dtype and shape, the weighting, the dtype and the channel
    count; a few KB each for shared weights), so that a backward finds the
    tables of its forward and repeated calls with the same weights skip
    the work. The kernels and the weight gradient only read them."""
    w = np.ascontiguousarray(w)
    return _tables_for(w.tobytes(), w.dtype.str, w.shape, p.weighting,
                       p.dtype.str, p.channels)


@functools.lru_cache(maxsize=8)
def _tables_for(w_bytes, w_dtype, w_shape, weighting, dtype, channels):
    w = np.frombuffer(w_bytes, dtype=w_dtype).reshape(w_shape)
    table64 = softmax_table(w, weighting)
    table = table64.astype(dtype)
    return table64, table, _nhwc_table(table, channels)


# The front door (sortpool_ref._api) passes checked out= arrays to this
# engine, which writes into them when their strides allow.
WRITES_INTO_OUT = True


# None: the choice of _forward_vectors; True or False forces one form (the
# tests run both; benchmarks can compare them in one process).
_FORWARD_VECTORS: Optional[bool] = None


# Whether the NCHW 2x2 stride-2 backward runs its rows in explicit vectors
# (_bwd_row_2x2_nchw_simd) or loops (the tests run both).
_BACKWARD_NCHW_VECTORS = True


def _forward_vectors() -> bool:
    """Whether the NHWC forward's register paths (and the NCHW forward by
    blocks, which runs them) use explicit vectors where the channels fill
    whole ones, or loops over channels, and whether the NCHW forwards'
    stride-2 rows run in explicit vectors of output columns: the same bits,
    only their speed differs. Explicit vectors: on the Intel Xeon machines
    of the earlier benchmarks they were faster (3x3, k = 1 / 2 / 4 / 9:
    1.15 / 1.19 / 1.32 / 1.52 times the floor against 1.20 / 1.39 / 1.61 /
    2.01), and on an AMD EPYC (LLVM's znver5), where the loops had been
    faster until the register paths prefetched, side by side in one process
    after that: 3x3 float32 k = 1 / 2 / 3 / 4 / 9 0.88-0.91 / 0.93-0.95 /
    0.94-0.95 / 1.03 / 1.07-1.10 against 0.96-0.97 / 1.00 / 1.05-1.08 /
    1.08-1.09 / 1.20-1.22, float64 1-3% faster, 2x2 the same, NCHW by
    blocks float32 k = 6 / 9 1.30 / 1.32 against 1.33 / 1.38, float64 k = 1
    / 4 / 9 1.11 / 1.19 / 1.32 against 1.23 / 1.30 / 1.41 (docs/
    performance.md, thirteenth round). A run-time argument of the kernels:
    either form runs without a new compile."""
    if _FORWARD_VECTORS is not None:
        return _FORWARD_VECTORS
    return True


# The NCHW 3x3 forward runs by blocks of channels (_nchw_forward_blocks)
# from this pool_range on, per item size, and per plane
# (_forward_nchw_3x3) below it. Measured side by side on the AMD EPYC,
# (32, 64, 112, 112), ratio to the floor: float64 k = 1 / 4 / 6 1.20 /
# 1.20 / 1.33 by blocks against 1.25 / 1.39 / 1.53 per plane; float32
# 1.30 / 1.42 / 1.52 against 1.19 / 1.31 / 1.48 (and k = 7-9 faster by
# blocks, on the Xeon). With the blocks' moves prefetching (float32 only),
# float32 k = 1 / 2 / 4 / 5 / 6 / 7 by blocks 1.38 / 1.34 / 1.40 / 1.41-1.44
# / 1.44-1.45 / 1.42 against 1.19 / 1.27 / 1.34 / 1.40-1.43 / 1.54-1.59 /
# 1.43 per plane (ratios to the NHWC floor): float32 by blocks from 6.
# Since the plane kernel runs rows of stride 2 without dilation in
# explicit vectors (_row_3x3_nchw_simd; with _forward_vectors, for rows
# of at least a vector of windows), those run per plane at every
# pool_range (the second key: rows in vectors; 10: never by blocks):
# side by side on the Intel Xeon, float32 k = 1 / 4 / 5 / 6 / 7 / 9
# 1.25 / 1.39 / 1.51 / 1.61 / 1.90 / 1.86 times the NCHW floor per plane
# against 1.28 / 1.56 (the plane's loops) and 1.74 / 2.19 / 1.88 / 1.92
# by blocks, float64 k = 1 / 4 / 5 / 6 / 7 / 9 0.87 / 1.03 / 1.01 / 1.06
# / 1.26 / 1.32 against 1.12 / 1.26 / 1.28 / 1.31 / 1.31 / 1.35 by
# blocks (docs/performance.md, fifteenth round).
_NCHW_BLOCKS_FROM = {(4, False): 6, (8, False): 1, (4, True): 10,
                     (8, True): 10}


def forward(x: np.ndarray, w: np.ndarray, p: Problem,
            out: Optional[np.ndarray] = None) -> np.ndarray:
    """y for checked arrays: x (float32/float64, p.layout), w (k,) or (C,
    k); written into ``out`` (checked: shape, dtype, no overlap) if given."""
    _, table, tblT = _tables(w, p)
    kind, oh_lo, oh_hi, ow_lo, ow_hi = _plan(p)
    memory = _kernel_memory(x, p)
    xm = _to(x, p.layout, memory, p.dtype)
    g = p.geometry
    y = _target(out, p.layout, memory)
    direct = y is not None
    if memory == "NHWC":
        if y is None:
            y = np.empty((p.batch, g.out_h, g.out_w, p.channels), p.dtype)
        if y.size:
            kernel = _nhwc_forward(kind, p.pool_range if kind else 0)
            vectors = _forward_vectors()
            kernel(xm, tblT, p.pool_range, *_geometry_args(p), oh_lo, oh_hi,
                   ow_lo, ow_hi, get_num_threads(), vectors, y)
    else:
        if y is None:
            y = np.empty((p.batch, p.channels, g.out_h, g.out_w), p.dtype)
        rows_in_vectors = ((g.stride_w, g.dilation_w) == (2, 1)
                           and _forward_vectors() and g.out_w
                           >= VECTOR_BYTES // p.dtype.itemsize)
        block = (_channel_block(p) if kind == 3 and p.pool_range
                 >= _NCHW_BLOCKS_FROM[p.dtype.itemsize, rows_in_vectors]
                 else 0)
        if y.size and block:
            kernel = _nchw_forward_blocks(kind, p.pool_range)
            kernel(xm, _blocked(tblT, block), p.pool_range,
                   *_geometry_args(p), oh_lo, oh_hi, ow_lo, ow_hi,
                   get_num_threads(),
                   _forward_vectors(), y)
        elif y.size:
            kernel = _forward_nchw_2x2 if kind == 2 else _forward_nchw_3x3
            kernel(xm, table, p.per_channel, p.pool_range,
                   *_geometry_args(p), oh_lo, oh_hi, ow_lo, ow_hi,
                   _forward_vectors(), y)
    if out is not None:
        return out if direct else _deliver(y, memory, out, p.layout)
    return _result(y, memory, x, p.layout)


# Scratch per array and worker for the NCHW backward by blocks of channels:
# of 16, 32 and 64 float32 channels of a 112 x 112 plane (0.8, 1.6 and 3.2
# MB), 32 ran fastest here (L2: 2 MB per core).
_SCRATCH_BYTES = 1 << 21
# Output rows per band of that backward: 16 ran 6% faster than whole planes
# (3x3 s2 p1, 56 output rows), 8 and 28 between the two.
_BAND_ROWS = 16


def _channel_block(p: Problem) -> int:
    """Channels per block for the NCHW backward by blocks (_nhwc_backward)
    and the forward (_nchw_forward_blocks): the most whole vectors that
    divide the channels and keep one plane of them within _SCRATCH_BYTES
    (at least one vector), or 0 when the channels do not fill whole
    vectors (or there are none)."""
    per_vector = VECTOR_BYTES // p.dtype.itemsize
    if p.channels % per_vector or not p.channels:
        return 0
    plane = p.geometry.height * p.geometry.width * p.dtype.itemsize
    vectors = p.channels // per_vector
    fits = [m for m in range(1, vectors + 1)
            if vectors % m == 0 and m * per_vector * plane <= _SCRATCH_BYTES]
    return per_vector * max(fits, default=1)


_CHUNKS = 256  # weight-gradient slots; fixed, so results do not depend on
# the number of threads


def backward(grad_y: np.ndarray, x: np.ndarray, w: np.ndarray,
             p: Problem, out=(None, None)):
    """(grad_x, grad_w) for checked arrays; grad_y has the output's shape.
    out: (grad_x, grad_w) arrays (checked) to write into, or None each."""
    table64, table, tblT = _tables(w, p)
    kind, oh_lo, oh_hi, ow_lo, ow_hi = _plan(p)
    g = p.geometry
    k = p.pool_range
    plain = not (g.overlapping_rows or g.stride_w
                 < (g.kernel_w - 1) * g.dilation_w + 1)
    # Windows that tile the input exactly, all on a register path, store
    # every element of grad_x once: it is never zeroed. Otherwise it is
    # zeroed (an out= array as well as a fresh one): by the kernel where
    # windows cover it, here elsewhere.
    tiles = (plain and kind > 0 and (oh_lo, oh_hi, ow_lo, ow_hi)
             == (0, g.out_h, 0, g.out_w)
             and (g.dilation_h, g.dilation_w) == (1, 1)
             and g.out_h * g.kernel_h == g.height
             and g.out_w * g.kernel_w == g.width)
    # NCHW memory runs a kernel of its own for 2x2 stride-2 windows that
    # all lie inside the input, and the NHWC rows by blocks of channels
    # (_nhwc_backward) where the channels fill whole vectors; every other
    # NCHW backward runs the NHWC kernels on a channels-last copy.
    memory = "NHWC"
    block = 0
    planes_3x3 = False
    if _memory_layout(x, p.layout) == "NCHW" and p.channels:
        memory = "NCHW"
        per_vector = VECTOR_BYTES // p.dtype.itemsize
        planes_3x3 = (_BACKWARD_NCHW_VECTORS and kind == 3 and k <= 4
                      and (g.stride_h, g.stride_w) == (2, 2)
                      and (g.dilation_h, g.dilation_w) == (1, 1)
                      and g.out_w >= per_vector
                      and g.width // 2 >= per_vector)
        if not (planes_3x3 or kind == 2
                and (g.stride_h, g.stride_w) == (2, 2)
                and (g.dilation_h, g.dilation_w) == (1, 1)
                and (oh_lo, oh_hi, ow_lo, ow_hi)
                == (0, g.out_h, 0, g.out_w)):
            block = _channel_block(p)
            if not block:
                memory = "NHWC"
    xm = _to(x, p.layout, memory, p.dtype)
    gym = _to(np.asarray(grad_y), p.layout, memory, p.dtype)
    gx = _target(out[0], p.layout, memory)
    direct = gx is not None
    if gx is None:
        gx = np.empty(xm.shape, dtype=p.dtype)
    # The rows of grad_x that no window covers: zeroed here, or (blocks of
    # channels) in the kernel's scratch; the kernel zeroes each row that
    # windows cover just before its first use (_rows_to_zero).
    uncovered = np.zeros(g.height, dtype=bool)
    if not tiles:
        # Row h is covered if the last window to start at or above it
        # reaches it (all windows have the same extent). A loop over the
        # output rows here took 30 us, a tenth of a small backward.
        ext = (g.kernel_h - 1) * g.dilation_h + 1
        h = np.arange(g.height)
        last = np.minimum((h + g.pad_top) // g.stride_h, g.out_h - 1)
        uncovered = (last < 0) | (last * g.stride_h - g.pad_top + ext <= h)
        if memory == "NHWC":
            gx[:, uncovered] = 0
    rows = p.batch * g.out_h
    rows_per_chunk = max(1, -(-rows // _CHUNKS))
    passes = 1
    if g.overlapping_rows:
        # Chunks two apart must not share input rows.
        need = -(-((g.kernel_h - 1) * g.dilation_h + 1) // g.stride_h)
        rows_per_chunk = max(rows_per_chunk, need)
        passes = 2
    n_chunks = -(-rows // rows_per_chunk) if rows else 0
    if memory == "NCHW":
        # Partial sums per (sample, channel).
        acc = np.zeros((p.batch, k + 1, k, p.channels))
    else:
        acc = np.zeros((n_chunks, k + 1, k, p.channels))
    if memory == "NCHW" and not block:
        if gx.size and rows and planes_3x3:
            _backward_nchw_3x3(xm, gym, table, p.per_channel, k,
                               *_geometry_args(p), gx, acc)
        elif gx.size and rows:
            _backward_nchw_2x2(xm, gym, table, p.per_channel, k, gx, acc,
                               _BACKWARD_NCHW_VECTORS)
    elif gx.size and rows:
        tpad = np.zeros((9, p.channels), p.dtype)
        if kind:  # register paths: k <= window size <= 9
            tpad[:k] = tblT[k]
        if block:
            tbls, tpads = _blocked(tblT, block), _blocked(tpad, block)
            workers = get_num_threads()
            # Bands of output rows; windows of a band's last row reach no
            # further than the next band's.
            rows_per_chunk = max(_BAND_ROWS, -(-((g.kernel_h - 1)
                                                 * g.dilation_h + 1)
                                               // g.stride_h))
        else:
            tbls, tpads, workers = tblT[None], tpad[None], 0
        prefetch = (xm.nbytes + gym.nbytes + gx.nbytes
                    >= _PREFETCH_FROM_BYTES)
        _BACKWARD_NHWC[kind](xm, gym, tbls, tpads, k, plain,
                             *_geometry_args(p), oh_lo, oh_hi, ow_lo, ow_hi,
                             rows_per_chunk, passes, not tiles, workers,
                             uncovered, prefetch, gx, acc)
    with np.errstate(invalid="ignore", over="ignore"):
        per_channel = acc.sum(axis=0)            # (k+1, k, C)
        if not p.per_channel:
            per_channel = per_channel.sum(axis=2, keepdims=True)
    partials = np.transpose(per_channel, (2, 0, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        grad_w = weight_grad_from_partials(table64, partials, p.weighting)
    grad_w = grad_w.reshape(w.shape).astype(p.weight_dtype)
    if out[1] is not None:
        out[1][...] = grad_w
        grad_w = out[1]
    if out[0] is None:
        return _result(gx, memory, x, p.layout), grad_w
    if not direct:
        _deliver(gx, memory, out[0], p.layout)
    return out[0], grad_w
