import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from sortpool_ref._engines import engine_problem

# Numba compiles on first use: no deadlines. The CI profile is derandomised
# so that a CI run is reproducible.
settings.register_profile(
    "dev", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get(
    "HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ENGINES = ["reference", "numba", "cuda"]

# `python -m sortpool_ref` self-checks every engine, and with an empty Numba
# cache its subprocess spends minutes compiling (7 on a 2-core machine)
# while this process would wait. So it starts as soon as the suite is
# collected, compiles on one core while the other tests run on the other
# (Numba writes its cache files atomically, and each process uses what the
# other has written), and the test that reads its output runs last.
SELF_CHECK_TEST = ("tests/test_cli.py::"
                   "test_python_m_sortpool_ref_lists_engines_and_self_checks")
_self_check_key = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    last = [item for item in items if item.nodeid == SELF_CHECK_TEST]
    if not last or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in last] + last
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "sortpool_ref", "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    config.stash[_self_check_key] = (proc, log)


def pytest_unconfigure(config):
    proc, log = config.stash.get(_self_check_key, (None, None))
    if proc is not None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()


@pytest.fixture
def self_check_run(request):
    """(return code, output) of ``python -m sortpool_ref --quiet``, started
    at collection; waits for it (10 minutes at most). Run here if it was
    not started (the test collected under another node id)."""
    if _self_check_key not in request.config.stash:
        out = subprocess.run([sys.executable, "-m", "sortpool_ref",
                              "--quiet"], capture_output=True, text=True,
                             timeout=600)
        return out.returncode, out.stdout + out.stderr
    proc, log = request.config.stash[_self_check_key]
    returncode = proc.wait(timeout=600)
    log.seek(0)
    return returncode, log.read()


def engine_param(name):
    reason = engine_problem(name)
    marks = [pytest.mark.gpu] if name == "cuda" else []
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"engine {name!r}: {reason}"))
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[engine_param(e) for e in ENGINES])
def engine(request):
    """Every engine; those that cannot run here are skipped, visibly."""
    return request.param


@pytest.fixture(params=[engine_param(e) for e in ENGINES if e != "reference"])
def fast_engine(request):
    """Every engine but the reference."""
    return request.param


def to_engine(engine, a):
    """Move a host array to where ``engine`` runs."""
    if engine == "cuda":
        import cupy
        return cupy.asarray(a)
    return a


def to_host(a):
    if hasattr(a, "__cuda_array_interface__"):
        import cupy
        return cupy.asnumpy(a)
    return np.asarray(a)
