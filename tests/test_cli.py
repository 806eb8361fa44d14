"""The command line and what `import sortpool_ref` pulls in."""

import os
import shutil
import subprocess
import sys

import sortpool_ref
from sortpool_ref.__main__ import main, self_check


def test_python_m_sortpool_ref_lists_engines_and_self_checks(self_check_run):
    # The command runs in a subprocess started when the suite was collected
    # (see tests/conftest.py); this test runs last and reads what it wrote.
    returncode, out = self_check_run
    assert returncode == 0, out
    assert "reference available" in out
    assert "numba     available" in out
    assert "self-check of engine 'numba' against the reference: PASSED" \
        in out


def test_console_script_is_installed():
    script = shutil.which("sortpool", path=os.path.dirname(sys.executable))
    assert script is not None, "the 'sortpool' console script is missing"
    out = subprocess.run([script, "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == \
        sortpool_ref.__version__


def test_self_check_fails_when_an_engine_is_wrong(monkeypatch, capsys):
    """The self-check must be able to fail: the numba engine replaced by
    the reference with its forward 0.1% off (no compiling here: the
    self-check subprocess compiles the real engine meanwhile)."""
    from sortpool_ref import _numba_engine, reference

    monkeypatch.setattr(_numba_engine, "forward",
                        lambda x, w, p: reference.forward(x, w, p) * 1.001)
    monkeypatch.setattr(_numba_engine, "backward", reference.backward)
    assert self_check("numba") is False
    out = capsys.readouterr().out
    assert "FAIL" in out and "grad_x" not in out


def test_import_is_light():
    code = ("import sys, sortpool_ref; "
            "print(sorted(m for m in ('numba', 'cupy', 'torch', 'hypothesis')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_demo_subcommand_is_dispatched(capsys):
    # `sortpool demo --help` exits through argparse when the demo exists,
    # or returns 2 with an install hint when the extra is missing.
    try:
        rc = main(["demo", "--help"])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    assert rc in (0, 2)
    if rc == 2:
        assert "pip install 'sortpool_ref[demo]'" in out.err
    else:
        assert "usage" in out.out.lower()
