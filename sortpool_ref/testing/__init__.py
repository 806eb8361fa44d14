"""Tools for checking an implementation of sorted weighted pooling.

``sortpool_ref.testing.strategies`` holds Hypothesis strategies (Hypothesis
must be installed to import it). The tolerance table below is the one every
test of this project uses to compare an engine with the float64 reference.
"""

from ._compare import TOLERANCES, assert_close, tolerance_scale

__all__ = ["TOLERANCES", "assert_close", "tolerance_scale"]
