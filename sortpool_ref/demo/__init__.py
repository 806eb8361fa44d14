"""``sortpool demo``: sorted weighted pooling vs max pooling in a NumPy CNN.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm). Modules:
:mod:`.data` (the cluttered-digits set), :mod:`.net` (layers with forward and
backward, the network, Adam), :mod:`.train` (runs and summaries),
:mod:`.cli` (the command line). Importing this package imports none of the
extras.
"""
