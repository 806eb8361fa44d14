"""``python -m sortpool_ref`` and the ``sortpool`` console script.

``sortpool`` (or ``sortpool check``) lists the engines usable on this machine
and checks each against the float64 reference on random data. ``sortpool
demo`` runs the demo (see its ``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import io
import platform
import sys
import time
from typing import List, Optional

import numpy as np

from . import __version__
from ._engines import available_engines

# Geometries the self-check runs: (description, keyword arguments, pool_range).
CHECK_CASES = [
    ("2x2 s2", dict(), 3),
    ("3x3 s2 p1", dict(kernel_size=3, stride=2, padding=1), 4),
    ("3x3 s1 same, pad_value=0", dict(kernel_size=3, stride=1,
                                      padding="same", pad_value=0.0), 2),
    ("2x3 dilation 2 ceil_mode", dict(kernel_size=(2, 3), dilation=2,
                                      ceil_mode=True), 5),
]


def _host(a):
    if hasattr(a, "__cuda_array_interface__"):
        import cupy
        return cupy.asnumpy(a)
    return np.asarray(a)


def self_check(engine: str, seed: int = 0, out=None) -> bool:
    """Compare ``engine`` with the reference on random data; True if all
    agree within the tolerance table of :mod:`sortpool_ref.testing`."""
    from . import reference, sortpool2d, sortpool2d_backward
    from .testing import assert_close, tolerance_scale

    out = sys.stdout if out is None else out
    rng = np.random.default_rng(seed)
    ok = True
    for dtype in (np.float64, np.float32):
        for layout in ("NHWC", "NCHW"):
            for name, kw, k in CHECK_CASES:
                shape = (2, 9, 10, 3) if layout == "NHWC" else (2, 3, 9, 10)
                x = rng.normal(size=shape).astype(dtype)
                x[0, 0, 0, 0] = np.nan
                for per_channel in (False, True):
                    w = rng.normal(size=(3, k) if per_channel else (k,))
                    opts = dict(kw, layout=layout)
                    xe, we = x, w
                    if engine == "cuda":
                        import cupy
                        xe, we = cupy.asarray(x), cupy.asarray(w)
                    label = (f"{engine:9s} {np.dtype(dtype).name:7s} "
                             f"{layout} {name}"
                             f"{' per-channel' if per_channel else ''}")
                    try:
                        y = _host(sortpool2d(xe, we, engine=engine, **opts))
                        g = rng.normal(size=y.shape).astype(dtype)
                        ge = g if engine != "cuda" else cupy.asarray(g)
                        gx, gw = sortpool2d_backward(ge, xe, we,
                                                     engine=engine, **opts)
                        x64 = x.astype(np.float64)
                        y0 = reference.sortpool2d(x64, w, **opts)
                        gx0, gw0 = reference.sortpool2d_backward(
                            g.astype(np.float64), x64, w, **opts)
                        window = int(np.prod(np.broadcast_to(
                            kw.get("kernel_size", 2), (2,))))
                        assert_close(y, y0, dtype,
                                     tolerance_scale("y", x, w), "y")
                        assert_close(_host(gx), gx0, dtype, tolerance_scale(
                            "grad_x", x, w, g, window_size=window), "grad_x")
                        assert_close(_host(gw), gw0, dtype, tolerance_scale(
                            "grad_w", x, w, g), "grad_w")
                    except AssertionError as exc:
                        ok = False
                        print(f"  FAIL {label}: {exc}", file=out)
                    else:
                        print(f"  ok   {label}", file=out)
    return ok


def check(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sortpool check",
        description="List usable engines and check each against the "
                    "float64 reference on random data.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true",
                        help="print only the summary")
    args = parser.parse_args(argv)
    print(f"sortpool_ref {__version__} on Python "
          f"{platform.python_version()}, NumPy {np.__version__}")
    engines = available_engines()
    for name, reason in engines.items():
        print(f"  {name:9s} {'available' if reason is None else reason}")
    all_ok = True
    for name, reason in engines.items():
        if reason is not None or name == "reference":
            continue
        start = time.perf_counter()
        sink = io.StringIO() if args.quiet else sys.stdout
        ok = self_check(name, seed=args.seed, out=sink)
        elapsed = time.perf_counter() - start
        print(f"self-check of engine {name!r} against the reference: "
              f"{'PASSED' if ok else 'FAILED'} ({elapsed:.1f} s, first "
              f"call includes compilation)")
        all_ok &= ok
    return 0 if all_ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        try:
            demo = importlib.import_module("sortpool_ref.demo.cli")
        except ImportError as exc:
            print(f"sortpool demo is not available: {exc}. Install it with "
                  f"pip install 'sortpool_ref[demo]'", file=sys.stderr)
            return 2
        return demo.main(argv[1:])
    if argv and argv[0] == "check":
        argv = argv[1:]
    if argv and argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    return check(argv)


if __name__ == "__main__":
    sys.exit(main())
