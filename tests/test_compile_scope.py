"""What a first call compiles: the NHWC kernels are made per kind of window
(and the forward per pool_range), and the backward's 3x3 bodies sit behind
typing-time switches (see the comment above _fwd_row_nhwc in
sortpool_ref/_numba_engine.py). A regression here costs no correctness,
only minutes of compile time on first use, so it is checked directly: a
fresh process with an empty Numba cache runs one 2x2 forward and backward
and reports which of the engine's row functions got compiled."""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json
import numpy as np
from sortpool_ref import _numba_engine as E
from sortpool_ref._checks import make_problem
x = np.random.default_rng(0).standard_normal((1, 6, 6, 32)).astype(np.float32)
w = np.array([0.5, 0.2])
p = make_problem(x.shape, x.dtype, w.shape, w.dtype, kernel_size=2)
y = E.forward(x, w, p)
E.backward(np.ones_like(y), x, w, p)
names = ["_fwd_row_nhwc", "_bwd_rows_nhwc", "_bwd_row_3x3_simd",
         "_rank_rows_3x3", "_distinct_weights_3x3", "_weights_3x3"]
print(json.dumps({n: [[str(t) for t in sig]
                      for sig in getattr(E, n).signatures] for n in names}))
"""


def test_2x2_first_call_compiles_no_3x3_code(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    # One forward row function: kind 2, pool_range 2 (its last argument
    # but one; the last says which form of the register path runs).
    assert len(compiled["_fwd_row_nhwc"]) == 1
    assert compiled["_fwd_row_nhwc"][0][-2:] == ["Literal[int](2)", "bool"]
    # One backward row function, of kind 2, and none of the 3x3 bodies.
    assert len(compiled["_bwd_rows_nhwc"]) == 1
    for name in ("_bwd_row_3x3_simd", "_rank_rows_3x3",
                 "_distinct_weights_3x3", "_weights_3x3"):
        assert compiled[name] == [], name
