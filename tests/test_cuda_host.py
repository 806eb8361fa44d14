"""The CUDA engine's kernels and launch plan, executed on the CPU.

``gpu/sortpool_kernels.cu`` is compiled as host C++ with ``gpu/host_shim.h``
(a launch becomes a loop over blocks and threads) and called through ctypes
by the very launch plan the CUDA engine uses (``sortpool_ref.gpu._plan``),
with tiny blocks and grids so that small problems cross block and grid
boundaries. Results are compared with the float64 reference. The same test
bodies run on a GPU through CuPy where one is present (marked ``gpu``,
skipped visibly elsewhere).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sortpool_ref import reference
from sortpool_ref._api import prepare
from sortpool_ref._checks import make_geometry
from sortpool_ref._engines import engine_problem
from sortpool_ref.gpu import _plan
from sortpool_ref.testing import assert_close, tolerance_scale
from sortpool_ref.testing.strategies import array_of, pooling_cases

TINY = _plan.LaunchConfig(block=3, max_grid=4, grad_w_columns=5,
                          reduce_group=3)
OTHER_TINY = _plan.LaunchConfig(block=7, max_grid=2, grad_w_columns=5,
                                reduce_group=3)


def host_symbol(name_expression: str) -> str:
    return "sp_" + re.sub(r"\W+", "_", name_expression).strip("_")


@pytest.fixture(scope="session")
def host_library(tmp_path_factory):
    """The kernel source built as a host shared library, one C entry point
    per instantiation (``host_shim.h``'s SORTPOOL_HOST_ENTRY)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) on the PATH to build the host "
                    "kernels")
    build = tmp_path_factory.mktemp("sortpool_host")
    lines = [f'#include "{_plan.SOURCE_PATH.name}"']
    lines += [f"SORTPOOL_HOST_ENTRY({host_symbol(n)}, {n})"
              for n in _plan.all_name_expressions()]
    cpp = build / "sortpool_host.cpp"
    cpp.write_text("\n".join(lines) + "\n")
    lib = build / "sortpool_host.so"
    cmd = [compiler, "-std=c++17", "-O1", "-fPIC", "-shared",
           "-DSORTPOOL_HOST", "-include", str(_plan.HOST_SHIM_PATH),
           f"-I{_plan.SOURCE_PATH.parent}", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", str(cpp), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ctypes.CDLL(str(lib))


_CTYPES = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64,
           np.float32: ctypes.c_float, np.float64: ctypes.c_double}


class HostLauncher:
    """``launch`` for :class:`sortpool_ref.gpu._plan.Plan` that calls the
    host build; records every launch."""

    def __init__(self, lib):
        self.lib = lib
        self.launched = []

    def __call__(self, name, grid, block, args):
        self.launched.append(name)
        kinds = [kind for _, kind in
                 _plan.SIGNATURES[name.split("<")[0]]]
        assert len(kinds) == len(args)
        holders = []
        for kind, a in zip(kinds, args):
            if kind == "ptr":
                assert isinstance(a, np.ndarray), (name, kind, type(a))
                holders.append(ctypes.c_void_p(a.ctypes.data))
            else:
                # exactly the C type declared, never a Python int/float
                assert type(a) in _CTYPES, (name, kind, type(a))
                holders.append(_CTYPES[type(a)](a))
        params = (ctypes.c_void_p * len(holders))(
            *[ctypes.addressof(h) for h in holders])
        fn = getattr(self.lib, host_symbol(name))
        fn.restype = None
        fn(ctypes.c_uint(grid), ctypes.c_uint(block), params)


def _problem(x, w, grad_y=None, **kwargs):
    return prepare(x, w, grad_y, engine="reference", **kwargs)[4]


class HostRunner:
    name = "host"

    def __init__(self, lib):
        self.lib = lib

    def plan(self, problem, config, variant=None):
        launcher = HostLauncher(self.lib)
        plan = _plan.Plan(np, launcher, problem, config)
        if variant is not None:
            plan.variant = variant
        return plan, launcher

    def run(self, x, w, g, kwargs, config=TINY, variant=None):
        p = _problem(x, w, g, **kwargs)  # checks grad_y's shape too
        plan, launcher = self.plan(p, config, variant)
        self.launched = launcher.launched
        y = plan.forward(x, w)
        if g is None:
            return y, None, None
        gx, gw = plan.backward(g, x, w)
        return y, gx, gw


class CudaRunner:
    name = "cuda"

    def run(self, x, w, g, kwargs, config=TINY, variant=None):
        import cupy

        from sortpool_ref.gpu import engine

        p = _problem(x, w, g, **kwargs)
        xd, wd = cupy.asarray(x), cupy.asarray(w)
        plan = engine._plan_for(xd, p, config)
        if variant is not None:
            module = engine._module(xd.device.id, p.dtype, variant)
            plan.launch = (lambda name, grid, block, args:
                           module.get_function(name)((grid,), (block,),
                                                     args))
            plan.variant = variant
        self.launched = []
        launch = plan.launch

        def record(name, grid, block, args):
            self.launched.append(name)
            launch(name, grid, block, args)

        plan.launch = record
        y = cupy.asnumpy(plan.forward(xd, wd))
        if g is None:
            return y, None, None
        gx, gw = plan.backward(cupy.asarray(g), xd, wd)
        return y, cupy.asnumpy(gx), cupy.asnumpy(gw)


def _cuda_param():
    reason = engine_problem("cuda")
    marks = [pytest.mark.gpu]
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"engine 'cuda': {reason}"))
    return pytest.param("cuda", marks=marks, id="cuda")


@pytest.fixture(scope="session",
                params=[pytest.param("host", id="host"), _cuda_param()])
def runner(request):
    """The kernels run on the CPU through the host shim, and on a GPU."""
    if request.param == "host":
        return HostRunner(request.getfixturevalue("host_library"))
    return CudaRunner()


def check_against_reference(runner, x, w, kwargs, seed=0, config=TINY,
                            variant=None):
    rng = np.random.default_rng(seed)
    dtype = x.dtype
    x64 = x.astype(np.float64)
    y0 = reference.sortpool2d(x64, w, **kwargs)
    g = rng.normal(size=y0.shape).astype(dtype)
    gx0, gw0 = reference.sortpool2d_backward(g.astype(np.float64), x64, w,
                                             **kwargs)
    y, gx, gw = runner.run(x, w, g, kwargs, config, variant)
    weighting = kwargs.get("weighting", "softmax")
    window = make_geometry(*(x.shape[1:3] if kwargs.get("layout", "NHWC")
                             == "NHWC" else x.shape[2:4]),
                           **{k: kwargs[k] for k in (
                               "kernel_size", "stride", "padding",
                               "dilation", "ceil_mode") if k in kwargs}
                           ).window_size
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == w.dtype
    pad_value = kwargs.get("pad_value")
    assert_close(y, y0, dtype, tolerance_scale(
        "y", x, w, weighting=weighting, pad_value=pad_value), "y")
    assert_close(gx, gx0, dtype, tolerance_scale(
        "grad_x", x, w, g, weighting=weighting, window_size=window),
        "grad_x")
    assert_close(gw, gw0, dtype, tolerance_scale(
        "grad_w", x, w, g, weighting=weighting, pad_value=pad_value),
        "grad_w")
    return y, gx, gw


# -- the contract, on Hypothesis cases --------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("values", ["distinct", "ties", "special"])
@given(data=st.data())
def test_matches_reference(runner, values, dtype, data):
    case = data.draw(pooling_cases(values=values, dtype=dtype))
    seed = data.draw(st.integers(0, 2**16))
    check_against_reference(runner, case.x, case.w, case.kwargs, seed)


def test_pad_value_only_window_in_float32(runner):
    # found by Hypothesis: x = 0 with padding at -1.5; the float32 result
    # rounds -0.49380124 and must be judged on the padding's scale
    x = np.zeros((1, 1, 1, 1), np.float32)
    w = np.array([[0.18905338, -0.52274844]])
    check_against_reference(runner, x, w, dict(
        kernel_size=(1, 2), padding=((0, 0), (0, 1)), pad_value=-1.5))


# -- every instantiation, on purpose ----------------------------------------

def _variant_cases(variant):
    """(kernel_size, pool_ranges) pairs that a variant can rank."""
    win, kmax = variant
    if win == 4:
        return [((2, 2), (2, 3, 4)), ((1, 4), (2, 4)), ((4, 1), (3,))]
    if win == 9:
        return [((3, 3), (3, 5, 9))]
    if kmax == 0:
        return [((5, 5), (17, 25)), ((3, 7), (21,))]
    sizes = [(3, 3), (2, 3)] if kmax <= 4 else [(3, 3), (4, 4)]
    cases = []
    for kernel in sizes:
        window = kernel[0] * kernel[1]
        ks = tuple(k for k in {kmax // 2 + 1, kmax} if k <= window)
        if ks:
            cases.append((kernel, ks))
    return cases


GEOMETRY_FORMS = [
    dict(),
    dict(stride=1, padding="same", pad_value=0.0),
    dict(stride=(2, 1), padding=1, ceil_mode=True),
    dict(stride=1, dilation=2, padding=1, ceil_mode=True, pad_value=-1.5),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", _plan.VARIANTS,
                         ids=lambda v: f"WIN{v[0]}-KMAX{v[1]}")
def test_every_variant_matches_reference(runner, variant, dtype):
    seed = 0
    for kernel, pool_ranges in _variant_cases(variant):
        for form in GEOMETRY_FORMS:
            for layout in ("NHWC", "NCHW"):
                for k in pool_ranges:
                    kwargs = dict(form, kernel_size=kernel, layout=layout)
                    if "padding" in form and form["padding"] != "same":
                        kwargs["padding"] = tuple(
                            min(form["padding"], kk // 2) for kk in kernel)
                    shape = (2, 11, 14, 3) if layout == "NHWC" \
                        else (2, 3, 11, 14)
                    values = ("ties", "special", "distinct")[seed % 3]
                    x = array_of(values, shape, dtype, seed)
                    w = np.random.default_rng(seed).normal(
                        size=(3, k) if seed % 2 else (k,))
                    kwargs["weighting"] = ("softmax", "raw")[seed // 2 % 2]
                    seed += 1
                    check_against_reference(runner, x, w, kwargs, seed,
                                            variant=variant)


def test_variant_choice():
    assert _plan.variant_for(4, 1) == (0, 1)
    assert _plan.variant_for(9, 1) == (0, 1)
    assert _plan.variant_for(4, 3) == (4, 4)
    assert _plan.variant_for(9, 2) == (0, 2)
    assert _plan.variant_for(9, 3) == (0, 4)
    assert _plan.variant_for(9, 4) == (0, 4)
    assert _plan.variant_for(9, 5) == (9, 9)
    assert _plan.variant_for(25, 5) == (0, 8)
    assert _plan.variant_for(25, 16) == (0, 16)
    assert _plan.variant_for(25, 17) == (0, 0)


# -- the fixed-geometry kernels ---------------------------------------------

FIXED_FORMS = [
    dict(kernel_size=2),
    dict(kernel_size=2, stride=2, padding=1, pad_value=-0.5, ceil_mode=True),
    dict(kernel_size=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, pad_value=0.0, ceil_mode=True),
    dict(kernel_size=3, stride=2),
]


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("channels", [8, 6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fixed_geometry_kernels(runner, dtype, channels, layout,
                                monkeypatch):
    """2x2 s2 and 3x3 s2 windows run the kernels instantiated for them
    (with channel vectors where the channels are contiguous and their
    count allows), for every pool_range, with padding, pad_value and
    ceil_mode; they match the reference and give the bits of the kernels
    for any geometry."""
    seed = owned_seen = 0
    width = _plan.VECTOR_WIDTHS[np.dtype(dtype)]
    for form in FIXED_FORMS:
        size = form["kernel_size"]
        for k in range(1, size * size + 1):
            # 3x3 s2 p1 with ceil_mode overhangs the padding of a size-14
            # axis (a window tap beyond it is not part of the window)
            hw = (11, 14) if seed % 2 else (14, 11)
            shape = (2, *hw, channels) if layout == "NHWC" \
                else (2, channels, *hw)
            values = ("ties", "special", "distinct")[seed % 3]
            x = array_of(values, shape, dtype, seed)
            rng = np.random.default_rng(seed)
            w = rng.normal(size=(channels, k) if seed % 2 else (k,))
            kwargs = dict(form, layout=layout,
                          weighting=("softmax", "raw")[seed // 2 % 2])
            g = rng.normal(size=_problem(x, w, **kwargs).out_shape
                           ).astype(dtype)
            seed += 1
            monkeypatch.undo()
            check_against_reference(runner, x, w, kwargs, seed)
            got = runner.run(x, w, g, kwargs)
            fixed = [n for n in runner.launched if f", {size}, 2, " in n]
            vectors = layout == "NHWC" and channels % width == 0
            expect = _plan.ranking_width(
                _plan.variant_for(size * size, k), width) if vectors else 1
            assert {n.rsplit(", ", 1)[1] for n in fixed
                    if "forward" in n} == {f"{expect}>"}, runner.launched
            # the weight-gradient pass takes channel vectors only where
            # windows do not overlap
            grad_w_width = expect if size == 2 else 1
            assert {n.rsplit(", ", 1)[1] for n in fixed if "grad_w" in n} \
                == {f"{grad_w_width}>"}, runner.launched
            geometry = make_geometry(*hw, **{
                key: v for key, v in form.items() if key != "pad_value"})
            if _plan.windows_own_inputs(geometry):
                # dL/dx written by the weight-gradient pass
                assert not any("x_owned" in n or "x_gather" in n
                               for n in runner.launched), runner.launched
                owned_seen += 1
            else:
                cells = [n for n in fixed if "x_cells" in n]
                assert cells and cells[0].endswith(
                    f", {width if vectors else 1}>"), cells
            monkeypatch.setattr(_plan, "fixed_geometry", lambda geometry:
                                None)
            general = runner.run(x, w, g, kwargs)
            assert not any(f", {size}, 2, " in n for n in runner.launched)
            for a, b in zip(got, general):
                assert_same_bits(a, b, (form, k))
    assert owned_seen >= 8


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fixed_3x3_rankings_give_the_same_bits(runner, dtype, layout):
    """Every ranking instantiated for fixed 3x3 windows (network, insertion
    lists of 2 and 4 ranks) orders the same keys the same way, so each
    gives the bits of the others, for every pool_range it can hold."""
    for seed, k in enumerate(range(2, 5)):
        shape = (2, 13, 10, 8) if layout == "NHWC" else (2, 8, 13, 10)
        x = array_of(("ties", "special", "distinct")[seed % 3], shape,
                     dtype, seed)
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(8, k) if seed % 2 else (k,))
        kwargs = dict(kernel_size=3, stride=2, padding=1, layout=layout,
                      pad_value=(None, -0.25)[seed % 2], ceil_mode=True)
        g = rng.normal(size=_problem(x, w, **kwargs).out_shape
                       ).astype(dtype)
        runs = {}
        for variant in _plan.fixed_variants(3):
            capacity = variant[0] or variant[1]
            if capacity < k:
                continue
            runs[variant] = runner.run(x, w, g, kwargs, variant=variant)
            assert any(f"<{_plan.c_type(dtype)}, {variant[0]}, "
                       f"{variant[1]}, 3, 2," in n for n in runner.launched)
        assert len(runs) >= 2
        first = runs[(9, 9)]
        check_against_reference(runner, x, w, kwargs, seed)
        for variant, got in runs.items():
            for a, b in zip(first, got):
                assert_same_bits(a, b, (k, variant))


def assert_same_bits(a, b, what):
    """Bit for bit, but for the sign and payload of NaNs: which operand's
    NaN a sum passes on follows the compiler's order of operands (x86 keeps
    the first), which IEEE 754 leaves open."""
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b), err_msg=str(what))
    assert a[~nan].tobytes() == b[~nan].tobytes(), what


def test_vector_width_needs_contiguous_aligned_channels():
    def width(a, layout="NHWC"):
        return _plan.vector_width(a.dtype, a.shape[3 if layout == "NHWC"
                                                   else 1],
                                  [(a, _plan.element_strides(a, layout))])

    buffer = np.zeros(2 * 5 * 6 * 8 + 8, dtype=np.float32)
    x = buffer[:2 * 5 * 6 * 8].reshape(2, 5, 6, 8)
    assert x.ctypes.data % 16 == 0
    assert width(x) == 4
    assert width(x.astype(np.float64)) == 2
    # misaligned start, channels not contiguous, odd channel count or
    # strides: one channel per access
    assert width(buffer[1:1 + 2 * 5 * 6 * 8].reshape(2, 5, 6, 8)) == 1
    assert width(np.ascontiguousarray(np.moveaxis(x, 3, 1)), "NCHW") == 1
    # channels_last memory read as NCHW (torch's channels_last)
    assert width(np.moveaxis(x, 3, 1), "NCHW") == 4
    assert width(x[..., :6]) == 1
    assert width(np.zeros((2, 5, 6, 6), np.float32)) == 1
    assert width(np.zeros((2, 5, 6, 6), np.float64)) == 2
    assert width(x[..., ::2]) == 1
    assert width(x[:, :, 1:]) == 4
    assert _plan.ranking_width((4, 4), 4) == 4
    assert _plan.ranking_width((9, 9), 4) == 1
    assert _plan.ranking_width((0, 2), 2) == 2


@pytest.mark.parametrize("kwargs, fewest", [
    (dict(kernel_size=2), 4),
    (dict(kernel_size=3, stride=2, padding=1), 4),          # corners 2x2
    (dict(kernel_size=3, stride=2, padding=1, pad_value=0.0), 9),
    # ceil_mode: the last row of windows overhangs row 7 by one (2 x 3)
    (dict(kernel_size=3, stride=2, ceil_mode=True), 6),
    # and with padding, the padding row 8 by one
    (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
          pad_value=0.0), 6),
])
def test_fewest_window_positions(kwargs, fewest):
    x = np.zeros((1, 8, 9, 1))
    for k in (1, fewest, fewest + 1):
        if k > kwargs["kernel_size"] ** 2:
            continue
        p = _problem(x, np.zeros(k), **kwargs)
        assert _plan.fewest_window_positions(p) == fewest
        assert _plan.grad_w_first_row(p) == (k * k if k <= fewest else 0)


def test_fixed_geometry_choice():
    def fixed(h, w, **kwargs):
        return _plan.fixed_geometry(make_geometry(h, w, **kwargs))

    assert fixed(8, 8, kernel_size=2) == (2, 2)
    assert fixed(9, 9, kernel_size=3, stride=2, padding=1) == (3, 2)
    assert fixed(9, 9, kernel_size=3, stride=2, ceil_mode=True) == (3, 2)
    assert fixed(8, 8, kernel_size=3) is None           # stride 3
    assert fixed(8, 8, kernel_size=2, stride=1) is None
    assert fixed(8, 8, kernel_size=(2, 3), stride=2) is None
    assert fixed(8, 8, kernel_size=2, dilation=2) is None


# -- backward paths, determinism, strides -----------------------------------

@pytest.mark.parametrize("kwargs, owns", [
    (dict(kernel_size=2), True),               # 8x8, 2x2 s2
    (dict(kernel_size=2, stride=1, dilation=2), False),  # overlap rows 1-6
    (dict(kernel_size=(2, 1), stride=(2, 1)), True),
    (dict(kernel_size=3, stride=2, padding=1), False),
    (dict(kernel_size=3, stride=4), False),     # gaps between windows
    (dict(kernel_size=(1, 2), stride=(1, 1), dilation=(1, 2)), False),
])
def test_windows_own_inputs(kwargs, owns):
    g = make_geometry(8, 8, **kwargs)
    assert _plan.windows_own_inputs(g) is owns


def test_disjoint_dilated_windows_own_inputs():
    # windows {0, 2} and {1, 3} of a size-4 axis share nothing and cover all
    g = make_geometry(4, 4, kernel_size=2, stride=(1, 2), dilation=(2, 1))
    assert _plan.windows_own_inputs(g)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_owned_and_gather_backward_agree(host_library, dtype, monkeypatch):
    """The four ways to dL/dx of windows that own their inputs (the
    weight-gradient pass of the fixed 2x2 kernels, the owned kernel, the
    cells of the fixed kernels for overlapping windows, the gather) give
    the same bits."""
    x = array_of("ties", (2, 3, 8, 6), dtype, 3)
    w = np.array([0.3, -0.2, 0.1])
    kwargs = dict(kernel_size=2, layout="NCHW", pad_value=0.0)
    runner = HostRunner(host_library)
    p = _problem(x, w, **kwargs)
    g = np.random.default_rng(0).normal(size=p.out_shape).astype(dtype)
    results = {}

    def run(label, expect):
        plan, launcher = runner.plan(p, TINY)
        results[label] = plan.backward(g, x, w)
        assert [n for n in launcher.launched if expect in n], \
            launcher.launched
        if label == "fused":
            assert not [n for n in launcher.launched if "_x_" in n]

    run("fused", "sortpool_grad_w_partials<")
    with monkeypatch.context() as patch:
        patch.setattr(_plan, "fixed_geometry", lambda geometry: None)
        run("owned", "x_owned<")
    with monkeypatch.context() as patch:
        patch.setattr(_plan, "windows_own_inputs", lambda geometry: False)
        run("cells", "x_cells<" + _plan.c_type(dtype) + ", 2, 2")
        patch.setattr(_plan, "fixed_geometry", lambda geometry: None)
        run("gather", "x_gather<" + _plan.c_type(dtype) + ">")
    check_against_reference(runner, x, w, kwargs)
    # the same sums in the same order: bit for bit
    for label in ("owned", "cells", "gather"):
        for a, b in zip(results["fused"], results[label]):
            assert a.tobytes() == b.tobytes(), label


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bit_identical_runs_and_launch_geometries(runner, dtype):
    x = array_of("normal", (2, 11, 10, 5), dtype, 7)
    x[0, 3, 4, 1] = np.nan
    w = np.random.default_rng(1).normal(size=(5, 3))
    kwargs = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    shape = _problem(x, w, **kwargs).out_shape
    g = np.random.default_rng(2).normal(size=shape).astype(dtype)
    first = runner.run(x, w, g, kwargs, TINY)
    for config in (TINY, OTHER_TINY, _plan.LaunchConfig(
            grad_w_columns=TINY.grad_w_columns,
            reduce_group=TINY.reduce_group)):
        again = runner.run(x, w, g, kwargs, config)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_contiguous_inputs(runner, dtype):
    base = array_of("distinct", (3, 9, 14, 8), dtype, 5)
    # every axis strided, one reversed: NHWC view of a permuted buffer
    x = np.transpose(base, (0, 2, 1, 3))[::2, :, ::-1, 1::2]
    assert not x.flags.c_contiguous
    w = np.array([0.5, 0.1, -0.3, 0.2])
    check_against_reference(runner, x, w, dict(kernel_size=(2, 3),
                                               stride=(1, 2), padding=1))
    nchw = np.moveaxis(x, 3, 1)  # channels_last memory read as NCHW
    check_against_reference(runner, nchw, w, dict(
        kernel_size=2, layout="NCHW", weighting="raw"))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_order_keeps_the_bits(runner, dtype, per_channel):
    """The same values in C, Fortran and channels-first memory give the
    same bits. Neighbouring threads take neighbouring channels or
    neighbouring windows depending on the memory order (channels_inner);
    the weight gradient's partial sums must still land in the same columns
    (first seen on an H200: a Fortran-ordered input moved grad_w in the
    last bits)."""
    x = array_of("normal", (3, 14, 11, 8), dtype, 13)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 3) if per_channel else 3)
    kwargs = dict(kernel_size=3, stride=2, padding=1)
    g = rng.normal(size=_problem(x, w, **kwargs).out_shape).astype(dtype)
    # Several partial-sum columns per channel (Q = 5), so that the two
    # thread orders differ.
    config = _plan.LaunchConfig(block=3, max_grid=4, grad_w_columns=40,
                                reduce_group=3)
    want = runner.run(x, w, g, kwargs, config)
    channels_first = np.moveaxis(
        np.ascontiguousarray(np.moveaxis(x, 3, 1)), 1, 3)
    for other in (np.asfortranarray(x), channels_first):
        got = runner.run(other, w, g, kwargs, config)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)
            assert a.tobytes() == b.tobytes()


def test_grad_w_partials_reduce_over_several_levels(host_library):
    x = array_of("distinct", (3, 16, 16, 2), np.float64, 11)
    w = np.array([0.2, 0.4])
    runner = HostRunner(host_library)
    p = _problem(x, w)
    plan, launcher = runner.plan(p, _plan.LaunchConfig(
        block=5, max_grid=3, grad_w_columns=200, reduce_group=4))
    plan.backward(np.ones(p.out_shape), x, w)
    assert launcher.launched.count("sortpool_sum_columns") >= 3
    check_against_reference(runner, x, w, {}, config=_plan.LaunchConfig(
        block=5, max_grid=3, grad_w_columns=200, reduce_group=4))


def test_empty_batch(host_library):
    x = np.zeros((0, 4, 4, 2))
    w = np.zeros(2)
    y, gx, gw = HostRunner(host_library).run(x, w, np.zeros((0, 2, 2, 2)),
                                              {})
    assert y.shape == (0, 2, 2, 2) and gx.shape == x.shape
    assert gw.shape == (2,) and not gw.any()


# -- pure helpers ----------------------------------------------------------

def test_pack_args_uses_the_declared_c_types():
    values = {name: 1 for name, _ in _plan.SIGNATURES["sortpool_forward"]}
    values["pad_value"] = -1.5
    for dtype, scalar in ((np.float32, np.float32), (np.float64, np.float64)):
        args = _plan.pack_args("sortpool_forward", dtype, values)
        kinds = dict(_plan.SIGNATURES["sortpool_forward"])
        for (name, kind), a in zip(_plan.SIGNATURES["sortpool_forward"],
                                   args):
            expected = {"ptr": int, "int": np.int32, "i64": np.int64,
                        "T": scalar}[kind]
            assert type(a) is expected, (name, type(a))
        assert kinds["xs_n"] == "i64" and kinds["N"] == "int"
    values["N"] = 2**31
    with pytest.raises(OverflowError, match="N = 2147483648"):
        _plan.pack_args("sortpool_forward", np.float32, values)


def test_name_expressions():
    assert _plan.c_type(np.float32) == "float"
    assert _plan.c_type("float64") == "double"
    assert (_plan.name_expression("sortpool_forward", np.float32, (4, 4))
            == "sortpool_forward<float, 4, 4>")
    assert (_plan.name_expression("sortpool_backward_x_gather", np.float64)
            == "sortpool_backward_x_gather<double>")
    assert (_plan.name_expression("sortpool_forward", np.float32, (0, 1),
                                  (3, 2), 4)
            == "sortpool_forward<float, 0, 1, 3, 2, 4>")
    assert (_plan.name_expression("sortpool_backward_x_cells", np.float64,
                                  None, (3, 2), 2)
            == "sortpool_backward_x_cells<double, 3, 2, 2>")
    with pytest.raises(ValueError, match="fixed geometry"):
        _plan.name_expression("sortpool_forward", np.float32, (4, 4),
                              width=4)
    with pytest.raises(ValueError, match="needs a fixed geometry"):
        _plan.name_expression("sortpool_backward_x_cells", np.float32)
    with pytest.raises(ValueError, match="no fixed-geometry form"):
        _plan.name_expression("sortpool_backward_x_gather", np.float32,
                              None, (3, 2))
    names = _plan.all_name_expressions()
    assert len(names) == len(set(names))
    # per dtype: 3 kernels per variant and 2 per dtype, then per fixed
    # geometry and width (1 or the vector width) 3 kernels per variant it
    # uses and the cells backward; 2 plain kernels
    fixed = sum(2 * (3 * len(_plan.fixed_variants(size)) + 1)
                for size, _ in _plan.FIXED_GEOMETRIES)
    assert len(names) == 2 * (3 * len(_plan.VARIANTS) + 2 + fixed) + 2
    assert _plan.fixed_variants(2) == ((0, 1), (4, 4))
    assert _plan.fixed_variants(3) == ((0, 1), (0, 2), (0, 4), (9, 9))


def test_plan_imports_without_cupy():
    import sys
    code = ("import sys, sortpool_ref, sortpool_ref.gpu._plan; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_grid_for_caps_blocks():
    config = _plan.LaunchConfig(block=4, max_grid=3)
    assert _plan.grid_for(1, config) == 1
    assert _plan.grid_for(8, config) == 2
    assert _plan.grid_for(1000, config) == 3
    assert _plan.grid_for(0, config) == 1


# -- the one-command GPU check, the parts that run without a GPU -------------

def test_gpu_check_without_gpu_says_what_is_missing(capsys):
    from sortpool_ref.gpu import check

    reason = engine_problem("cuda")
    if reason is None:
        pytest.skip("a GPU is usable here: the check would run for real")
    assert check.main(["--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("sortpool_ref.gpu.check needs the CUDA engine: "
                           f"{reason}")


@pytest.mark.parametrize("kernel_size, stride, padding, k", [
    (2, 2, 0, 1), (2, 2, 0, 4), (3, 2, 1, 4), (3, 2, 1, 2)])
def test_naive_torch_baseline_matches_reference(kernel_size, stride,
                                                padding, k):
    torch = pytest.importorskip("torch")
    from sortpool_ref.gpu.check import naive_torch_sortpool

    x = array_of("distinct", (2, 3, 9, 10), np.float64, 4)
    w = np.random.default_rng(0).normal(size=k)
    y = naive_torch_sortpool(torch.from_numpy(x), torch.from_numpy(w),
                             kernel_size, stride, padding).numpy()
    kwargs = dict(kernel_size=kernel_size, stride=stride, padding=padding,
                  layout="NCHW")
    y0 = reference.sortpool2d(x, w, **kwargs)
    assert_close(y, y0, np.float64, tolerance_scale("y", x, w), "naive")


def test_benchmark_table_marks_targets():
    from sortpool_ref.gpu.check import benchmark_table

    row = {"layout": "NHWC", "case": "2x2 s2", "k": 2, "forward": 1.0,
           "floor forward": 0.5, "backward": 1.0, "floor backward": 0.5,
           "fwd+bwd": 2.0, "floor fwd+bwd": 1.0, "max_pool2d fwd": 1.5,
           "max_pool2d fwd+bwd": 2.5, "naive fwd+bwd": 50.0}
    line = benchmark_table([row])[-1]
    assert "1.000 (2.00x MISS)" in line       # forward over 1.3x floor
    assert "1.000 (2.00x PASS)" in line       # backward within 2.5x
    assert "1.500 / 2.500 PASS" in line
    assert "(25.0x PASS)" in line


def test_launch_table_times_each_kernel_alone(monkeypatch):
    from sortpool_ref.gpu import check

    launched = []
    monkeypatch.setattr(check, "_time_cupy", lambda fn, reps: (fn(), 0.5)[1])

    class Replay:
        launches = [("sortpool_forward<float, 0, 1>",
                     lambda grid, block, args: launched.append(
                         (grid, block, args)), (3,), (256,), (7,))]

    times = check._launch_times(Replay, 5)
    assert times == [("sortpool_forward<float, 0, 1>", 0.5)]
    assert launched == [((3,), (256,), (7,))]
    row = {"layout": "NHWC", "case": "2x2 s2", "k": 1,
           "launches forward": times,
           "launches backward": [("sortpool_sum_columns", 0.0125),
                                 ("sortpool_grad_w_finish", 0.006)]}
    assert check.launch_table([row])[-1] == (
        "| NHWC | 2x2 s2 | 1 | forward<float, 0, 1> 0.500 | "
        "sum_columns 0.013; grad_w_finish 0.006 |")
    assert check.launch_table([{"layout": "NHWC"}]) == []
    report = check.render_report(
        [("device", "none")], (True, "1 passed"), (1, []),
        ([dict(row, **{"forward": 1.0, "floor forward": 0.5,
                       "backward": 1.0, "floor backward": 0.5,
                       "fwd+bwd": 2.0, "floor fwd+bwd": 1.0})], 1e12,
         "no torch"), 1.0)
    assert "### Each kernel alone (ms)" in report
    assert "sum_columns 0.013; grad_w_finish 0.006" in report

