"""The benchmark's floor kernels (bench/floor.py) compute what they claim.

Every ratio in docs/performance.md is a time over the floor's, so a floor
that skipped work would flatter the engine. Checked here against NumPy max
pooling (padding ignored, as -inf) on the geometries the benchmark uses and
on odd sizes that exercise the border loops.
"""

import numpy as np
import pytest

from bench.floor import floor_maxpool, grad_floor


def _max_pool_nhwc(x, kernel, stride, padding):
    n, h, w, c = x.shape
    xp = np.full((n, h + 2 * padding, w + 2 * padding, c), -np.inf)
    xp[:, padding:padding + h, padding:padding + w] = x
    out_h = (h + 2 * padding - kernel) // stride + 1
    out_w = (w + 2 * padding - kernel) // stride + 1
    y = np.full((n, out_h, out_w, c), -np.inf)
    for i in range(kernel):
        for j in range(kernel):
            y = np.maximum(y, xp[:, i:i + stride * out_h:stride,
                                 j:j + stride * out_w:stride])
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("kernel,stride,padding", [
    (2, 2, 0), (3, 2, 1), (3, 2, 0), (2, 1, 0), (3, 1, 1), (2, 3, 0)])
@pytest.mark.parametrize("size", [(9, 11), (12, 12), (5, 40)])
def test_floor_is_max_pooling(size, kernel, stride, padding, layout, dtype):
    rng = np.random.default_rng(sum(size) + kernel + stride)
    x = rng.standard_normal((2,) + size + (3,)).astype(dtype)
    want = _max_pool_nhwc(x, kernel, stride, padding).astype(dtype)
    if layout == "NHWC":
        got = floor_maxpool(x, kernel, stride, padding, "NHWC")
    else:
        xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        got = floor_maxpool(xc, kernel, stride, padding, "NCHW")
        got = got.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("stride", [2, 3])
def test_grad_floor_writes_every_element(layout, stride):
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 8, 10, 3)).astype(np.float32)
    out_h, out_w = 8 // stride, 10 // stride
    gy = rng.standard_normal((2, out_h, out_w, 3)).astype(np.float32)
    rows = np.minimum(np.arange(8) // stride, out_h - 1)
    cols = np.minimum(np.arange(10) // stride, out_w - 1)
    want = x * gy[:, rows][:, :, cols]
    out = np.full_like(x, np.nan)
    if layout == "NHWC":
        got = grad_floor(x, gy, stride, "NHWC", out=out)
    else:
        got = grad_floor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)),
                         np.ascontiguousarray(gy.transpose(0, 3, 1, 2)),
                         stride, "NCHW", out=np.ascontiguousarray(
                             out.transpose(0, 3, 1, 2)))
        got = got.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)


def test_memory_probes_read_this_process():
    """The machine table's huge-page rows: the kernel's mode is read (or
    'unknown' off Linux), and the probe of the process's anonymous memory
    sees 64 MB allocated and touched (where /proc/self/smaps_rollup
    exists)."""
    import os

    from bench import run

    mode = run._huge_page_mode()
    assert mode == "unknown" or "NumPy madvise" in mode
    if not os.path.exists("/proc/self/smaps_rollup"):
        return
    _, before = run._anon_memory()
    block = np.ones(64 << 20, dtype=np.uint8)
    huge_after, after = run._anon_memory()
    assert after - before > 60, (before, after)
    assert 0 <= huge_after <= after
    del block
