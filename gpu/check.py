"""The GPU check in one command.

From a repository checkout, installed or not (``sortpool_ref.gpu`` is the
folder ``gpu/``, mapped by setup.cfg's ``package_dir`` only when installed)::

    python gpu/check.py --out DIR

or, where the package is installed, ``python -m sortpool_ref.gpu.check``.

On a machine with CuPy and a CUDA GPU (nothing is downloaded), in one go and
within about five minutes:

1. the project's GPU tests (``pytest -m gpu`` on the repository's ``tests/``
   when it is a checkout);
2. a randomized sweep of the CUDA engine against the float64 reference
   (every geometry option, both dtypes and layouts, ties, NaN and inf,
   non-contiguous inputs, bit-identical repeats);
3. a benchmark on float32 (N, H, W, C) = (32, 112, 112, 64), NHWC and NCHW:
   forward, backward and forward+backward of 2x2 s2 with pool_range 1..4
   and 3x3 s2 p1, against the device's copy bandwidth measured in the same
   run, torch.nn.functional.max_pool2d (NCHW and channels_last) and a naive
   PyTorch implementation that sorts unfolded windows.

It writes a markdown report (device, driver, versions, commit, results) to
``--out`` (default: the current folder) and exits with 0 when the tests and
the sweep pass (speed targets are reported, not enforced), 1 when something
failed, 2 when there is no usable GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

GPU_DIR = Path(__file__).resolve().parent
REPO_ROOT = GPU_DIR.parents[0]


def _in_checkout() -> bool:
    return ((REPO_ROOT / "sortpool_ref" / "__init__.py").is_file()
            and (GPU_DIR / "sortpool_kernels.cu").is_file())


def ensure_gpu_package() -> str:
    """Make ``sortpool_ref.gpu`` importable; say where it comes from.

    Installed (or editable): nothing to do. In a checkout that is not
    installed, ``import sortpool_ref`` finds the repository's package but
    ``sortpool_ref.gpu`` does not exist (the folder ``gpu/`` becomes that
    package only through setup.cfg's ``package_dir`` at install time), so
    the folder of this file is registered as ``sortpool_ref.gpu``.
    """
    import sortpool_ref

    try:
        importlib.import_module("sortpool_ref.gpu")
        return "installed"
    except ModuleNotFoundError as exc:
        if exc.name != "sortpool_ref.gpu":
            raise
    spec = importlib.util.spec_from_file_location(
        "sortpool_ref.gpu", GPU_DIR / "__init__.py",
        submodule_search_locations=[str(GPU_DIR)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sortpool_ref.gpu"] = module
    spec.loader.exec_module(module)
    sortpool_ref.gpu = module  # type: ignore[attr-defined]
    return f"checkout folder {GPU_DIR} (not installed)"


if __name__ == "__main__" and not __package__:
    # Run as a script (python gpu/check.py): Python put gpu/ first on the
    # path, which would expose engine.py, _plan.py... as top-level modules;
    # use the checkout's root instead, so that its sortpool_ref is the one
    # checked.
    if sys.path and Path(sys.path[0] or ".").resolve() == GPU_DIR:
        sys.path.pop(0)
    if _in_checkout():
        sys.path.insert(0, str(REPO_ROOT))
    ensure_gpu_package()

import numpy as np  # noqa: E402

BENCH_SHAPE = (32, 112, 112, 64)  # N, H, W, C
BENCH_CASES = [("2x2 s2", dict(kernel_size=2, stride=2), k)
               for k in (1, 2, 3, 4)] + [
    ("3x3 s2 p1", dict(kernel_size=3, stride=2, padding=1), 1),
    ("3x3 s2 p1", dict(kernel_size=3, stride=2, padding=1), 4)]
TARGETS = {"forward": 1.3, "backward": 2.5}
NAIVE_SPEEDUP = 20.0


# -- the naive PyTorch baseline (also tested on the CPU) ---------------------

def naive_torch_sortpool(x: Any, w: Any, kernel_size: int, stride: int,
                         padding: int = 0) -> Any:
    """Sorted weighted pooling the obvious way in PyTorch, NCHW.

    Unfold the windows, sort each in decreasing order with ``torch.sort``,
    keep ``k = len(w)`` values and weight them by ``softmax(w)``. Padding is
    filled with -inf so it ranks last: equal to the contract for windows
    with at least ``k`` real positions (true for the benchmark geometries).
    """
    import torch
    import torch.nn.functional as F

    if padding:
        x = F.pad(x, (padding,) * 4, value=float("-inf"))
    cols = x.unfold(2, kernel_size, stride).unfold(3, kernel_size, stride)
    cols = cols.reshape(*cols.shape[:4], kernel_size * kernel_size)
    top = torch.sort(cols, dim=-1, descending=True, stable=True).values
    k = w.shape[-1]
    return (top[..., :k] * torch.softmax(w, dim=-1)).sum(dim=-1)


# -- environment -------------------------------------------------------------

def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> List[Tuple[str, str]]:
    import cupy

    import sortpool_ref

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)

    def cuda_version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    rows = [
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc)
         .strftime("%Y-%m-%d %H:%M")),
        ("device", f"{name} (device {dev.id}, compute capability "
                   f"{dev.compute_capability}, "
                   f"{props['totalGlobalMem'] / 2**30:.1f} GiB)"),
        ("driver (CUDA version it supports)",
         cuda_version(cupy.cuda.runtime.driverGetVersion())),
        ("CUDA runtime", cuda_version(cupy.cuda.runtime.runtimeGetVersion())),
        ("CuPy", cupy.__version__),
        ("NumPy", np.__version__),
        ("Python", platform.python_version()),
        ("sortpool_ref", sortpool_ref.__version__),
    ]
    try:
        import torch
        rows.append(("PyTorch", f"{torch.__version__} (CUDA "
                                f"{torch.version.cuda})"))
    except ImportError:
        rows.append(("PyTorch", "not installed"))
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        commit += " (uncommitted changes)" if dirty else ""
    rows.append(("commit", commit or "unknown (not a git checkout)"))
    return rows


# -- 1. GPU tests ------------------------------------------------------------

_PYTEST_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location("
    "'_sortpool_gpu_check', sys.argv[1])\n"
    "check = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(check)\n"
    "check.ensure_gpu_package()\n"
    "import pytest\n"
    "sys.exit(int(pytest.main(sys.argv[2:])))\n")


def run_gpu_tests(timeout: float) -> Tuple[bool, str]:
    tests = REPO_ROOT / "tests"
    if not tests.is_dir():
        return True, "skipped: no tests/ folder (not a repository checkout)"
    # pytest runs in a child process (for the timeout) that first maps
    # sortpool_ref.gpu exactly as this process did, installed or not.
    cmd = [sys.executable, "-c", _PYTEST_BOOT, str(Path(__file__).resolve()),
           str(tests), "-m", "gpu", "-q", "-rf", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-500:]
    # -rf lists each failed test ("FAILED test_id - message"): the report
    # names them, so that a failure says where to look.
    failed = [ln for ln in lines if ln.startswith("FAILED ")]
    if failed:
        summary += "\n\n" + "\n".join(f"- `{ln[7:][:300]}`"
                                      for ln in failed[:20])
    # 5: no tests collected
    return done.returncode in (0, 5), summary


# -- 2. randomized sweep -----------------------------------------------------

def _random_case(rng: np.random.Generator):
    from sortpool_ref._checks import make_geometry
    from sortpool_ref.testing.strategies import VALUE_KINDS, array_of

    while True:
        kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
        stride = None if rng.random() < 0.3 else tuple(
            int(v) for v in rng.integers(1, 4, size=2))
        dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
        form = rng.integers(0, 4)
        if form == 0:
            padding: Any = 0
        elif form == 1:
            padding = (int(rng.integers(0, kh // 2 + 1)),
                       int(rng.integers(0, kw // 2 + 1)))
        else:
            padding = ("same", "valid")[form - 2]
        ceil_mode = bool(rng.random() < 0.5)
        h, w_ = (int(v) for v in rng.integers(1, 14, size=2))
        try:
            g = make_geometry(h, w_, (kh, kw), stride, padding, dilation,
                              ceil_mode)
        except ValueError:
            continue
        break
    layout = ("NHWC", "NCHW")[rng.integers(0, 2)]
    dtype = (np.float32, np.float64)[rng.integers(0, 2)]
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 6))
    k = int(rng.integers(1, g.window_size + 1))
    shape = (n, h, w_, c) if layout == "NHWC" else (n, c, h, w_)
    values = VALUE_KINDS[rng.integers(0, len(VALUE_KINDS))]
    x = array_of(values, shape, dtype, int(rng.integers(0, 2**31)))
    weighting = ("softmax", "raw")[rng.integers(0, 2)]
    w = rng.normal(size=(c, k) if rng.random() < 0.5 else (k,))
    kwargs = dict(kernel_size=(kh, kw), stride=stride, padding=padding,
                  dilation=dilation, ceil_mode=ceil_mode, layout=layout,
                  weighting=weighting,
                  pad_value=(None, 0.0, -1.5)[rng.integers(0, 3)])
    return x, w, kwargs, g.window_size, values


def run_sweep(seconds: float, max_cases: int, seed: int = 0
              ) -> Tuple[int, List[str]]:
    """(cases run, failure messages)."""
    rng = np.random.default_rng(seed)
    failures: List[str] = []
    start = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # the float64 reference may warn on inf - inf; IEEE results are
        # what is compared
        warnings.simplefilter("ignore", RuntimeWarning)
        count = _sweep_loop(rng, failures, start, seconds, max_cases)
    return count, failures


def _sweep_loop(rng, failures, start, seconds, max_cases) -> int:
    import cupy

    from sortpool_ref import reference, sortpool2d, sortpool2d_backward
    from sortpool_ref.testing import assert_close, tolerance_scale

    count = 0
    while count < max_cases and time.perf_counter() - start < seconds:
        x, w, kwargs, window, values = _random_case(rng)
        count += 1
        g = rng.normal(size=reference.sortpool2d(x, w, **kwargs).shape)
        g = g.astype(x.dtype)
        xd, wd, gd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(g)
        if count % 4 == 0:  # a non-contiguous view of the same values
            big = cupy.zeros(x.shape[:3] + (2 * x.shape[3],), x.dtype)
            big[..., ::2] = xd
            xd = big[..., ::2]
        label = f"case {count} ({values}, {x.dtype}, {kwargs}, k={w.shape})"
        try:
            y = sortpool2d(xd, wd, engine="cuda", **kwargs)
            gx, gw = sortpool2d_backward(gd, xd, wd, engine="cuda", **kwargs)
            y2 = sortpool2d(xd, wd, engine="cuda", **kwargs)
            gx2, gw2 = sortpool2d_backward(gd, xd, wd, engine="cuda",
                                           **kwargs)
            for a, b, what in ((y, y2, "y"), (gx, gx2, "grad_x"),
                               (gw, gw2, "grad_w")):
                if cupy.asnumpy(a).tobytes() != cupy.asnumpy(b).tobytes():
                    raise AssertionError(f"{what} differs between two runs")
            x64 = x.astype(np.float64)
            y0 = reference.sortpool2d(x64, w, **kwargs)
            gx0, gw0 = reference.sortpool2d_backward(g.astype(np.float64),
                                                     x64, w, **kwargs)
            ws = kwargs["weighting"]
            pad = kwargs["pad_value"]
            assert_close(cupy.asnumpy(y), y0, x.dtype, tolerance_scale(
                "y", x, w, weighting=ws, pad_value=pad), "y")
            assert_close(cupy.asnumpy(gx), gx0, x.dtype, tolerance_scale(
                "grad_x", x, w, g, weighting=ws, window_size=window),
                "grad_x")
            assert_close(cupy.asnumpy(gw), gw0, x.dtype, tolerance_scale(
                "grad_w", x, w, g, weighting=ws, pad_value=pad), "grad_w")
        except Exception as exc:  # report every kind of failure
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    return count


# -- 3. benchmark ------------------------------------------------------------

def _time_cupy(fn: Callable[[], Any], reps: int) -> float:
    """Mean milliseconds per call on CuPy's current stream."""
    import cupy

    for _ in range(3):
        fn()
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        fn()
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / reps


def _time_torch(fn: Callable[[], Any], reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth(nbytes: int, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    ms = _time_cupy(lambda: dst.data.copy_from_device_async(
        src.data, src.nbytes), reps)
    return 2 * src.nbytes / (ms * 1e-3)


def _kernels_only(fwd: bool, args: tuple, opts: Dict[str, Any]
                  ) -> Callable[[], None]:
    """A callable that replays, launch for launch, the kernels of one
    forward (or backward) call with the arguments they had, and nothing
    else: no argument checks, no allocations, no Python between launches
    but the loop. Per-call timings of small problems measure host overhead
    when it exceeds the GPU's time; this measures the kernels."""
    from sortpool_ref._api import prepare
    from sortpool_ref.gpu import engine

    if fwd:
        _, x, w, _, problem = prepare(*args, engine="cuda", **opts)
    else:
        _, x, w, g, problem = prepare(args[1], args[2], args[0],
                                      engine="cuda", **opts)
    plan = engine._plan_for(x, problem, engine._plan.DEFAULT_CONFIG)
    launches: List[Tuple[str, int, int, tuple]] = []
    launch = plan.launch

    def record(name: str, grid: int, block: int, kargs: tuple) -> None:
        launches.append((name, grid, block, kargs))
        launch(name, grid, block, kargs)

    plan.launch = record
    with x.device:
        keep = plan.forward(x, w) if fwd else plan.backward(g, x, w)
    variant = plan.variant
    kernels = [(engine._kernel(x.device.id, problem.dtype, variant, name),
                (grid,), (block,), kargs)
               for name, grid, block, kargs in launches]

    def replay() -> None:
        for kernel, grid, block, kargs in kernels:
            kernel(grid, block, kargs)
    replay.keep = keep  # type: ignore[attr-defined]  # buffers stay alive
    replay.launches = [  # type: ignore[attr-defined]
        (name, kernel, grid, block, kargs) for (name, *_), (
            kernel, grid, block, kargs) in zip(launches, kernels)]
    return replay


def _launch_times(replay: Any, reps: int) -> List[Tuple[str, float]]:
    """Milliseconds of each launch of a replay, timed alone."""
    times = []
    for name, kernel, grid, block, kargs in replay.launches:
        times.append((name, _time_cupy(
            lambda: kernel(grid, block, kargs), reps)))
    return times


def run_benchmark(reps: int = 20) -> Tuple[List[Dict[str, Any]], float,
                                           Optional[str]]:
    """(rows, copy bandwidth, why torch comparisons are missing or None)."""
    import cupy

    from sortpool_ref import sortpool2d, sortpool2d_backward

    n, h, w_, c = BENCH_SHAPE
    bandwidth = copy_bandwidth(n * h * w_ * c * 4)
    torch_missing: Optional[str] = None
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            torch_missing = "PyTorch has no CUDA device"
    except ImportError:
        torch_missing = "PyTorch is not installed"

    rows: List[Dict[str, Any]] = []
    rng = cupy.random.default_rng(0)
    for layout in ("NHWC", "NCHW"):
        shape = (n, h, w_, c) if layout == "NHWC" else (n, c, h, w_)
        x = rng.standard_normal(shape, dtype=cupy.float32)
        if torch_missing is None:
            xt = torch.from_dlpack(x)  # same memory
            xt = xt.permute(0, 3, 1, 2) if layout == "NHWC" else xt
            xt_req = xt.detach().clone(
                memory_format=torch.channels_last if layout == "NHWC"
                else torch.contiguous_format).requires_grad_(True)
        for name, geom, k in BENCH_CASES:
            w = cupy.asarray(np.linspace(0.5, -0.5, k))
            opts = dict(geom, layout=layout)
            y = sortpool2d(x, w, engine="cuda", **opts)
            g = rng.standard_normal(y.shape, dtype=cupy.float32)
            bx, by = x.nbytes, y.nbytes
            row: Dict[str, Any] = dict(layout=layout, case=name, k=k)
            row["forward"] = _time_cupy(
                lambda: sortpool2d(x, w, engine="cuda", **opts), reps)
            row["backward"] = _time_cupy(
                lambda: sortpool2d_backward(g, x, w, engine="cuda", **opts),
                reps)
            row["fwd+bwd"] = _time_cupy(lambda: (
                sortpool2d(x, w, engine="cuda", **opts),
                sortpool2d_backward(g, x, w, engine="cuda", **opts)), reps)
            row["floor forward"] = (bx + by) / bandwidth * 1e3
            row["floor backward"] = (2 * bx + by) / bandwidth * 1e3
            row["floor fwd+bwd"] = (3 * bx + 2 * by) / bandwidth * 1e3
            try:
                fwd_replay = _kernels_only(True, (x, w), opts)
                bwd_replay = _kernels_only(False, (g, x, w), opts)
                row["kernels forward"] = _time_cupy(fwd_replay, reps)
                row["kernels backward"] = _time_cupy(bwd_replay, reps)
                row["launches forward"] = _launch_times(fwd_replay, reps)
                row["launches backward"] = _launch_times(bwd_replay, reps)
                del fwd_replay, bwd_replay
            except Exception as exc:  # informative only: never fail here
                row["kernels error"] = f"{type(exc).__name__}: {exc}"
            if torch_missing is None:
                ks, st = geom["kernel_size"], geom["stride"]
                pad = geom.get("padding", 0)
                gt = torch.from_dlpack(g)
                gt = gt.permute(0, 3, 1, 2) if layout == "NHWC" else gt
                row["max_pool2d fwd"] = _time_torch(
                    lambda: F.max_pool2d(xt_req.detach(), ks, st, pad), reps)

                def torch_fwd_bwd(fn):
                    def run():
                        out = fn()
                        torch.autograd.grad(out, xt_req, gt)
                    return run

                row["max_pool2d fwd+bwd"] = _time_torch(torch_fwd_bwd(
                    lambda: F.max_pool2d(xt_req, ks, st, pad)), reps)
                wt = torch.from_dlpack(w).float().requires_grad_(True)
                row["naive fwd+bwd"] = _time_torch(torch_fwd_bwd(
                    lambda: naive_torch_sortpool(xt_req, wt, ks, st, pad)),
                    max(2, reps // 5))
            rows.append(row)
            del y, g
    return rows, bandwidth, torch_missing


# -- report ------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def benchmark_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    head = ("| layout | case | k | forward ms (x floor) | backward ms "
            "(x floor) | fwd+bwd ms (x floor) | max_pool2d fwd / fwd+bwd ms "
            "| naive fwd+bwd ms (speed-up) | kernels only: forward / "
            "backward ms (x floor) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cells = [r["layout"], r["case"], str(r["k"])]
        for op in ("forward", "backward", "fwd+bwd"):
            ratio = r[op] / r[f"floor {op}"]
            target = TARGETS.get(op)
            mark = f" {_verdict(ratio <= target)}" if target else ""
            cells.append(f"{r[op]:.3f} ({ratio:.2f}x{mark})")
        if "max_pool2d fwd" in r:
            faster = (r["forward"] < r["max_pool2d fwd"]
                      and r["fwd+bwd"] < r["max_pool2d fwd+bwd"])
            cells.append(f"{r['max_pool2d fwd']:.3f} / "
                         f"{r['max_pool2d fwd+bwd']:.3f} "
                         f"{_verdict(faster)}")
            speedup = r["naive fwd+bwd"] / r["fwd+bwd"]
            cells.append(f"{r['naive fwd+bwd']:.3f} ({speedup:.1f}x "
                         f"{_verdict(speedup >= NAIVE_SPEEDUP)})")
        else:
            cells += ["n/a", "n/a"]
        if "kernels forward" in r:
            cells.append(
                f"{r['kernels forward']:.3f} "
                f"({r['kernels forward'] / r['floor forward']:.2f}x) / "
                f"{r['kernels backward']:.3f} "
                f"({r['kernels backward'] / r['floor backward']:.2f}x)")
        else:
            cells.append(" ".join(str(r.get("kernels error", "n/a"))
                                  .replace("|", "/").split())[:200])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def launch_table(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Each kernel of a forward and a backward, timed alone (ms)."""
    lines = ["| layout | case | k | forward launches | backward launches |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "launches forward" not in r:
            continue
        cells = [r["layout"], r["case"], str(r["k"])]
        for op in ("forward", "backward"):
            cells.append("; ".join(
                f"{name.replace('sortpool_', '')} {ms:.3f}"
                for name, ms in r[f"launches {op}"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def render_report(env: Sequence[Tuple[str, str]], tests: Tuple[bool, str],
                  sweep: Tuple[int, List[str]], bench: Optional[tuple],
                  seconds: float) -> str:
    ok_tests, test_summary = tests
    # The pytest summary line, then the failed tests as a list, if any.
    test_line, _, failed_tests = test_summary.partition("\n")
    count, failures = sweep
    out = ["# sortpool_ref GPU check", "", "## Environment", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in env]
    out += ["", "## GPU tests", "",
            f"{_verdict(ok_tests) if ok_tests else 'FAIL'}: "
            f"`{test_line}`", failed_tests, "",
            "## Randomized sweep against the float64 reference", "",
            f"{count} cases, {len(failures)} failed "
            f"({'PASS' if not failures and count else 'FAIL'}).", ""]
    out += [f"- {f}" for f in failures[:20]]
    out += ["", "## Benchmark", ""]
    if bench is None:
        out.append("not run")
    else:
        rows, bandwidth, torch_missing = bench
        n, h, w, c = BENCH_SHAPE
        out += [f"float32 (N, H, W, C) = {BENCH_SHAPE}; device copy "
                f"bandwidth {bandwidth / 1e9:.0f} GB/s (read + write). "
                "Floors: the bytes each pass must move at that bandwidth "
                "(forward: read x, write y; backward: read x and grad_y, "
                "write grad_x). Targets: forward <= "
                f"{TARGETS['forward']}x floor, backward <= "
                f"{TARGETS['backward']}x, faster than max_pool2d in the "
                "same memory format (NHWC vs channels_last), >= "
                f"{NAIVE_SPEEDUP:.0f}x faster than the naive sort.", ""]
        if torch_missing:
            out += [f"PyTorch comparisons skipped: {torch_missing}.", ""]
        out += benchmark_table(rows)
        launches = launch_table(rows)
        if launches:
            out += ["", "### Each kernel alone (ms)", "",
                    "The launches of one call replayed one at a time "
                    "(the sum exceeds the kernels-only column by the "
                    "launch gaps that a full replay overlaps).", ""]
            out += launches
    out += ["", f"Total time: {seconds:.0f} s.", ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python gpu/check.py",
        description="Run the GPU tests, a randomized sweep against the "
                    "reference and a benchmark; write a markdown report.")
    parser.add_argument("--out", default=".", help="report folder")
    parser.add_argument("--sweep-seconds", type=float, default=60.0)
    parser.add_argument("--sweep-cases", type=int, default=400)
    # The GPU tests compare against the Numba engine, whose first compile on
    # a fresh cache takes minutes (150 s was too short once the explicit-
    # vector kernels landed: stop 16's first run timed out, the second, with
    # the cache warm, took 20 s).
    parser.add_argument("--test-timeout", type=float, default=420.0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmark", action="store_true")
    args = parser.parse_args(argv)

    gpu_source = ensure_gpu_package()
    from sortpool_ref._engines import engine_problem

    reason = engine_problem("cuda")
    if reason is not None:
        print(f"sortpool_ref.gpu.check needs the CUDA engine: {reason}",
              file=sys.stderr)
        return 2

    start = time.perf_counter()
    env = environment() + [("sortpool_ref.gpu from", gpu_source)]
    print("environment:", dict(env))
    tests = ((True, "skipped (--skip-tests)") if args.skip_tests
             else run_gpu_tests(args.test_timeout))
    print("GPU tests:", tests[1])
    sweep = run_sweep(args.sweep_seconds, args.sweep_cases)
    print(f"sweep: {sweep[0]} cases, {len(sweep[1])} failed")
    bench = None if args.skip_benchmark else run_benchmark(args.reps)
    report = render_report(env, tests, sweep, bench,
                           time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.md"
    path.write_text(report)
    print(report)
    print(f"report written to {path}")
    return 0 if tests[0] and not sweep[1] and sweep[0] else 1


if __name__ == "__main__":
    sys.exit(main())
