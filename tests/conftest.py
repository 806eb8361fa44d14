import os

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
