"""Explicit SIMD vectors for the Numba engine.

A ``Vec`` is a vector of 64 bytes of a float dtype (16 float32 or 8 float64
lanes: one AVX-512 register; LLVM splits it into two or four registers on
machines with narrower vectors) and a ``Mask`` the result of comparing two
of them, one bit per lane. In ``@njit`` code they are made by ``load`` and
used with the operators ``<``, ``>=``, ``==``, ``!=``, ``+``, ``*``
(vectors) and ``|``, ``&``, ``~`` (masks), and with ``select``,
``any_lane``, ``store``;
``load_pairs`` loads twice as many elements split into even and odd ones,
``store_pairs`` stores them back interleaved;
``zeros`` and ``full`` make constant vectors, ``lanes`` gives their
width as a compile-time constant. ``transpose`` moves a square tile of
lanes x lanes elements between two arrays, transposed; ``prefetch`` and
``prefetch_write`` ask for a cache line ahead of its use.

Why not loops that LLVM vectorises, as elsewhere in the engine: a 3x3
window reads nine rows and writes nine, and LLVM gives up on proving that
many rows apart (see docs/performance.md). Written with these vectors, a
window's work over one block of channels is straight-line code in
registers, in the order written: no overlap checks, no scratch rows.
Every operation is one LLVM instruction with IEEE semantics (no fast-math
flags): ``a < b`` is an ordered comparison, false when either is NaN, and
``a != b`` an unordered one, true when either is NaN, as for Python
floats (``>=`` and ``==`` are ordered too).

``load`` and ``store`` index the flat data of a C-contiguous array, so
that the caller needs no array view per window (each view costs an
atomic reference-count increment and decrement).
"""

from __future__ import annotations

import operator

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, overload, register_model

VECTOR_BYTES = 64


class Vec(types.Type):
    """VECTOR_BYTES of one float dtype."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES * 8 // dtype.bitwidth
        super().__init__(name=f"Vec({dtype} x {self.lanes})")


class Mask(types.Type):
    """One bit per lane of a Vec."""

    def __init__(self, lanes):
        self.lanes = lanes
        super().__init__(name=f"Mask({lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        lane = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(lane, fe_type.lanes))


@register_model(Mask)
class _MaskModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type,
                         ir.VectorType(ir.IntType(1), fe_type.lanes))


def _c_float_array(arr):
    return (isinstance(arr, types.Array) and arr.layout == "C"
            and isinstance(arr.dtype, types.Float))


def _lane_pointer(context, builder, sig, args):
    """Pointer to element args[1] of the flat data of array args[0], as a
    pointer to a vector."""
    a = context.make_array(sig.args[0])(context, builder, args[0])
    ptr = builder.gep(a.data, [args[1]], inbounds=True)
    vec = ir.VectorType(context.get_value_type(sig.args[0].dtype),
                        Vec(sig.args[0].dtype).lanes)
    return builder.bitcast(ptr, vec.as_pointer())


@intrinsic
def load(typingctx, arr, i):
    """arr.flat[i:i + lanes] (arr C-contiguous; i + lanes <= arr.size is
    the caller's to ensure: nothing is checked)."""
    if not (_c_float_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_lane_pointer(context, builder, sig, args),
                            align=1)
    return Vec(arr.dtype)(arr, i), codegen


@intrinsic
def load_pairs(typingctx, arr, i):
    """(arr.flat[i:i + 2 * lanes:2], arr.flat[i + 1:i + 2 * lanes:2]):
    two vectors loaded and split into their even and odd elements (one
    two-register shuffle each), the left and right columns of lanes
    windows of stride 2 along a row (nothing is checked, as for load)."""
    if not (_c_float_array(arr) and isinstance(i, types.Integer)):
        return None
    vt = Vec(arr.dtype)

    def codegen(context, builder, sig, args):
        lo = _lane_pointer(context, builder, sig, args)
        hi = builder.gep(lo, [ir.Constant(ir.IntType(64), 1)],
                         inbounds=True)
        a = builder.load(lo, align=1)
        b = builder.load(hi, align=1)
        mask = ir.VectorType(ir.IntType(32), vt.lanes)
        even = builder.shuffle_vector(
            a, b, ir.Constant(mask, list(range(0, 2 * vt.lanes, 2))))
        odd = builder.shuffle_vector(
            a, b, ir.Constant(mask, list(range(1, 2 * vt.lanes, 2))))
        return context.make_tuple(builder, sig.return_type, (even, odd))
    return types.UniTuple(vt, 2)(arr, i), codegen


@intrinsic
def store(typingctx, arr, i, v):
    """arr.flat[i:i + lanes] = v."""
    if not (_c_float_array(arr) and isinstance(i, types.Integer)
            and isinstance(v, Vec) and v.dtype == arr.dtype):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _lane_pointer(context, builder, sig, args),
                      align=1)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def store_pairs(typingctx, arr, i, even, odd):
    """arr.flat[i:i + 2 * lanes:2] = even, arr.flat[i + 1:i + 2 * lanes:2]
    = odd: the inverse of load_pairs (two shuffles, two stores)."""
    if not (_c_float_array(arr) and isinstance(i, types.Integer)
            and isinstance(even, Vec) and even == odd
            and even.dtype == arr.dtype):
        return None

    def codegen(context, builder, sig, args):
        n = even.lanes
        lo = _lane_pointer(context, builder, sig, args)
        hi = builder.gep(lo, [ir.Constant(ir.IntType(64), 1)],
                         inbounds=True)
        mask = ir.VectorType(ir.IntType(32), n)
        order = [q // 2 + (n if q % 2 else 0) for q in range(2 * n)]
        for half, ptr in ((order[:n], lo), (order[n:], hi)):
            v = builder.shuffle_vector(args[2], args[3],
                                       ir.Constant(mask, half))
            builder.store(v, ptr, align=1)
        return context.get_dummy_value()
    return types.none(arr, i, even, odd), codegen


def _prefetch(write):
    def prefetch(typingctx, arr, i):
        if not (_c_float_array(arr) and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            a = context.make_array(sig.args[0])(context, builder, args[0])
            # Not inbounds: i may point past the array (a prefetch never
            # faults).
            ptr = builder.bitcast(builder.gep(a.data, [args[1]]),
                                  ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty,
                                                "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(write), i32(3), i32(1)])
            return context.get_dummy_value()
        return types.none(arr, i), codegen
    return prefetch


prefetch = intrinsic(_prefetch(0))
prefetch.__doc__ = """Ask for the cache line of arr.flat[i] to be read
into the caches (a hint: nothing is loaded, nothing can fault)."""
prefetch_write = intrinsic(_prefetch(1))


@intrinsic
def transpose(typingctx, src, i, src_step, dst, j, dst_step):
    """dst.flat[j + b * dst_step + a] = src.flat[i + a * src_step + b] for
    a, b in range(lanes): lanes vectors loaded, transposed in registers and
    stored (both arrays C-contiguous, of one dtype; nothing is checked).

    The transposition swaps one bit of the row index with the same bit of
    the lane index per stage (lanes 1, 2, 4, ... apart): each stage is a
    two-vector shuffle per vector with a constant mask, log2(lanes) stages
    in all (64 shuffles for 16 float32 lanes), where element by element
    every value costs a load and a store of its own."""
    ints = all(isinstance(t, types.Integer)
               for t in (i, src_step, j, dst_step))
    if not (ints and _c_float_array(src) and _c_float_array(dst)
            and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        lanes = Vec(sig.args[0].dtype).lanes
        intp = context.get_value_type(types.intp)
        i0, si, j0, sj = (context.cast(builder, args[a], sig.args[a],
                                       types.intp) for a in (1, 2, 4, 5))
        vec = ir.VectorType(context.get_value_type(sig.args[0].dtype),
                            lanes)
        src_a = context.make_array(sig.args[0])(context, builder, args[0])
        dst_a = context.make_array(sig.args[3])(context, builder, args[3])

        def row(arr, start, step, r):
            at = builder.add(start, builder.mul(step, ir.Constant(intp, r)))
            ptr = builder.gep(arr.data, [at], inbounds=True)
            return builder.bitcast(ptr, vec.as_pointer())

        rows = [builder.load(row(src_a, i0, si, r), align=1)
                for r in range(lanes)]
        mask = ir.VectorType(ir.IntType(32), lanes)
        bit = 1
        while bit < lanes:
            # Rows r and r + bit (bit clear in r) trade the lanes with the
            # bit set in the first for those with it clear in the second.
            low = [q if not q & bit else lanes + q - bit
                   for q in range(lanes)]
            high = [q + bit if not q & bit else lanes + q
                    for q in range(lanes)]
            swapped = list(rows)
            for r in range(lanes):
                if not r & bit:
                    a, b = rows[r], rows[r + bit]
                    swapped[r] = builder.shuffle_vector(
                        a, b, ir.Constant(mask, low))
                    swapped[r + bit] = builder.shuffle_vector(
                        a, b, ir.Constant(mask, high))
            rows = swapped
            bit *= 2
        for r in range(lanes):
            builder.store(rows[r], row(dst_a, j0, sj, r), align=1)
        return context.get_dummy_value()
    return types.none(src, i, src_step, dst, j, dst_step), codegen


@intrinsic
def lanes(typingctx, arr):
    """The lanes of a vector of the dtype of arr, as a compile-time
    constant: VECTOR_BYTES // arr.itemsize reads the item size from the
    array at run time, and a loop stepping by it divides to find its trip
    count (an integer division per window in the vector backwards)."""
    if not _c_float_array(arr):
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, Vec(arr.dtype).lanes)
    return types.intp(arr), codegen


@intrinsic
def zeros(typingctx, arr):
    """A vector of +0.0 of the dtype of arr."""
    if not _c_float_array(arr):
        return None
    vt = Vec(arr.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)
    return vt(arr), codegen


@intrinsic
def full(typingctx, arr, value):
    """A vector of the dtype of arr with every lane value (converted)."""
    if not (_c_float_array(arr) and isinstance(value, types.Number)):
        return None
    vt = Vec(arr.dtype)

    def codegen(context, builder, sig, args):
        lane = context.cast(builder, args[1], sig.args[1], sig.args[0].dtype)
        vec = context.get_value_type(vt)
        v = builder.insert_element(ir.Constant(vec, ir.Undefined), lane,
                                   ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(
            v, ir.Constant(vec, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), None))
    return vt(arr, value), codegen


@intrinsic
def any_lane(typingctx, m):
    """Whether any lane of the mask is set."""
    if not isinstance(m, Mask):
        return None

    def codegen(context, builder, sig, args):
        bits = ir.IntType(sig.args[0].lanes)
        return builder.icmp_unsigned(
            "!=", builder.bitcast(args[0], bits), ir.Constant(bits, 0))
    return types.boolean(m), codegen


@intrinsic
def _select(typingctx, m, a, b):
    if not (isinstance(m, Mask) and isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(args[0], args[1], args[2])
    return a(m, a, b), codegen


def select(s, a, b):
    """``a if s else b``, lane by lane when s is a Mask."""
    return a if s else b


@overload(select)
def _select_overload(s, a, b):
    if isinstance(s, Mask):
        return lambda s, a, b: _select(s, a, b)
    return lambda s, a, b: a if s else b


def _compare(op, ordered):
    @intrinsic
    def compare(typingctx, a, b):
        if not (isinstance(a, Vec) and a == b):
            return None

        def codegen(context, builder, sig, args):
            if ordered:
                return builder.fcmp_ordered(op, args[0], args[1])
            return builder.fcmp_unordered(op, args[0], args[1])
        return Mask(a.lanes)(a, b), codegen
    return compare


def _binary(name, cls):
    """The IR builder's operation name on two values of one type of cls
    (Vec: fadd, fmul; Mask: or_, and_)."""
    @intrinsic
    def binary(typingctx, a, b):
        if not (isinstance(a, cls) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])
        return a(a, b), codegen
    return binary


_mask_or = _binary("or_", Mask)


@intrinsic
def _mask_not(typingctx, a):
    if not isinstance(a, Mask):
        return None

    def codegen(context, builder, sig, args):
        return builder.not_(args[0])
    return a(a), codegen


@overload(operator.invert)
def _invert(a):
    if isinstance(a, Mask):
        return lambda a: _mask_not(a)


def _register(op, intr, cls):
    @overload(op)
    def _operator(a, b):
        if isinstance(a, cls) and a == b:
            return lambda a, b: intr(a, b)


# Python's float comparisons: <, >=, == ordered (false with NaN), !=
# unordered (true with NaN).
_register(operator.lt, _compare("<", True), Vec)
_register(operator.ge, _compare(">=", True), Vec)
_register(operator.eq, _compare("==", True), Vec)
_register(operator.ne, _compare("!=", False), Vec)
_register(operator.add, _binary("fadd", Vec), Vec)
_register(operator.mul, _binary("fmul", Vec), Vec)
_register(operator.or_, _mask_or, Mask)
_register(operator.ior, _mask_or, Mask)
_register(operator.and_, _binary("and_", Mask), Mask)
