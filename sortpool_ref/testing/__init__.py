"""Tools for checking an implementation of sorted weighted pooling.

``sortpool_ref.testing.strategies`` holds Hypothesis strategies (Hypothesis
must be installed to import it). The tolerance table below is the one every
test of this project uses to compare an engine with the float64 reference.

:func:`assert_matches_reference` is the conformance kit: it checks another
implementation against the reference on generated problems (Hypothesis is
imported when it is called); :func:`from_torch` wraps a PyTorch
implementation for it.
"""

from ._compare import TOLERANCES, assert_close, tolerance_scale
from ._kit import ConformanceError, assert_matches_reference, from_torch

__all__ = ["ConformanceError", "TOLERANCES", "assert_close",
           "assert_matches_reference", "from_torch", "tolerance_scale"]
