"""The benchmark's floor kernels (bench/floor.py) compute what they claim.

Every ratio in docs/performance.md is a time over the floor's, so a floor
that skipped work would flatter the engine. Checked here against NumPy max
pooling (padding ignored, as -inf) on the geometries the benchmark uses and
on odd sizes that exercise the border loops. Also the benchmark's
machinery around them: the memory probes of its machine table, and the
run with glibc's malloc keeping freed memory (--keep-freed-memory).
"""

import os
import platform
import subprocess
import sys

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


def test_kept_memory_results_have_their_own_section(tmp_path, monkeypatch):
    """`--update-docs` under --keep-freed-memory writes its own section of
    docs/performance.md (appended the first time, replaced after) and
    leaves the latest results alone, and the other way round."""
    from bench import run

    docs = tmp_path / "performance.md"
    docs.write_text(f"intro\n{run.BEGIN}\nold\n{run.END}\ntail\n")
    monkeypatch.setattr(run, "DOCS", docs)
    kept = f"{run.KEPT_BEGIN}\n%s\n{run.KEPT_END}"
    run.update_docs(kept % "first")
    run.update_docs(kept % "second")
    text = docs.read_text()
    assert text.startswith(f"intro\n{run.BEGIN}\nold\n{run.END}\ntail\n")
    assert text.count(run.KEPT_BEGIN) == 1 and "second" in text
    assert "first" not in text
    run.update_docs(f"{run.BEGIN}\nnew\n{run.END}")
    text = docs.read_text()
    assert "old" not in text and "\nnew\n" in text and "second" in text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reruns_with_the_tunables(monkeypatch):
    """--keep-freed-memory runs the benchmark again in a child process
    whose GLIBC_TUNABLES hold KEEP_FREED (added to any already there),
    with the other arguments; the child sees that it keeps freed memory
    and says so in the machine table and where the tables speak of fresh
    memory."""
    from bench import run

    calls = []

    def call(cmd, cwd, env):
        calls.append((cmd, env))
        return 0

    monkeypatch.setattr(run.subprocess, "call", call)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert not run.keeps_freed_memory()
    assert run.main(["--quick", "--keep-freed-memory", "--no-startup"]) == 0
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "bench", "--quick", "--no-startup"]
    assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:"
                                     + run.KEEP_FREED)
    assert "zeroes on first touch" in run.tables([])[0]
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
    assert run.keeps_freed_memory()
    assert "keeps freed memory" in run.machine()["malloc"]
    text = run.tables([])[0]
    assert "no page faults" in text and "zeroes" not in text


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_costs_no_page_faults():
    """What the tunables are for: a 64 MB array freed and allocated again
    faults in no pages with them, and some without them (the new mapping
    is zeroed page by page, 2 MB or 4 kB at a time)."""
    code = ("import resource, numpy as np\n"
            "a = np.ones(64 << 20, np.uint8)\n"
            "del a\n"
            "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "b = np.ones(64 << 20, np.uint8)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n")
    from bench import run

    faults = {}
    for kept in (False, True):
        env = dict(os.environ)
        env.pop("GLIBC_TUNABLES", None)
        if kept:
            env["GLIBC_TUNABLES"] = run.KEEP_FREED
        out = subprocess.run([sys.executable, "-c", code], env=env,
                             capture_output=True, text=True, check=True)
        faults[kept] = int(out.stdout)
    assert faults[True] < 16 <= faults[False], faults
