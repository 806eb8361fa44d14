"""A cluttered-digits set built from scikit-learn's handwritten digits.

Nothing is downloaded: the source is ``sklearn.datasets.load_digits`` (1797
images of 8x8 pixels, 16 grey levels, the UCI "optical recognition of
handwritten digits" test set), which ships inside scikit-learn.

How an example is made (all randomness from one generator seeded with
``data_seed``, so the set is the same on every machine):

1. The 1797 source digits are shuffled and split by *source image* into a
   train pool and a test pool, so no handwritten digit appears in both.
2. A digit is scaled up by bilinear interpolation to a random size between
   ``DIGIT_SIZE_RANGE`` pixels (square) and placed at a random position in a
   ``CANVAS`` x ``CANVAS`` canvas of zeros.
3. ``N_FRAGMENTS`` clutter fragments of ``FRAGMENT`` x ``FRAGMENT`` pixels
   are cut at random from other scaled-up digits *of the same pool* and
   pasted at random positions (pixel-wise maximum with what is there),
   possibly over the digit.
4. Values lie in [0, 1]; images are returned as float32 NHWC
   ``(N, CANVAS, CANVAS, 1)`` with integer labels.

Each source digit is rendered several times with different sizes,
positions and clutter, so the sets are larger than the source pools.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import numpy as np

CANVAS = 40
DIGIT_SIZE_RANGE = (20, 28)
FRAGMENT = 6
N_FRAGMENTS = 5
TEST_SOURCE_FRACTION = 0.3


@dataclass
class Digits:
    """Train and test images (float32 NHWC in [0, 1]) and labels (int64)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def describe(self) -> str:
        return (f"cluttered digits {CANVAS}x{CANVAS}: "
                f"{len(self.y_train)} train / {len(self.y_test)} test images")


def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix of 1-D bilinear resampling.

    Pixel centres are aligned as in image resizing (``align_corners=False``):
    output pixel ``i`` samples the input at ``(i + 0.5) * size_in / size_out
    - 0.5``, clamped to the edges.
    """
    pos = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    pos = np.clip(pos, 0.0, size_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = pos - lo
    m = np.zeros((size_out, size_in))
    m[np.arange(size_out), lo] += 1.0 - frac
    m[np.arange(size_out), hi] += frac
    return m


# Read-only copies for the renderer, which asks for the same few sizes often.
_cached_interpolation = functools.lru_cache(maxsize=None)(interpolation_matrix)


def scaled_digit(image: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (values in [0, 1]) resampled to ``size`` x ``size``."""
    a = _cached_interpolation(image.shape[0], size)
    b = _cached_interpolation(image.shape[1], size)
    return a @ image @ b.T


def render(sources: np.ndarray, index: int, rng: np.random.Generator
           ) -> np.ndarray:
    """One cluttered canvas showing ``sources[index]``; clutter is cut from
    other digits of ``sources``."""
    canvas = np.zeros((CANVAS, CANVAS))
    lo, hi = DIGIT_SIZE_RANGE
    size = int(rng.integers(lo, hi + 1))
    top, left = rng.integers(0, CANVAS - size + 1, size=2)
    canvas[top:top + size, left:left + size] = scaled_digit(
        sources[index], size)
    for _ in range(N_FRAGMENTS):
        other = int(rng.integers(len(sources) - 1))
        other += other >= index  # any digit but the one shown
        frag_size = int(rng.integers(lo, hi + 1))
        r, c = rng.integers(0, frag_size - FRAGMENT + 1, size=2)
        # only the rows and columns of the scaled digit that are cut out
        a = _cached_interpolation(sources.shape[1], frag_size)
        b = _cached_interpolation(sources.shape[2], frag_size)
        frag = (a[r:r + FRAGMENT] @ sources[other]
                @ b[c:c + FRAGMENT].T)
        y, x = rng.integers(0, CANVAS - FRAGMENT + 1, size=2)
        region = canvas[y:y + FRAGMENT, x:x + FRAGMENT]
        np.maximum(region, frag, out=region)
    return canvas


def _render_pool(sources: np.ndarray, labels: np.ndarray, count: int,
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    # Cycle through the pool in a shuffled order so every source digit is
    # used about equally often.
    reps = -(-count // len(sources))
    order = np.concatenate([rng.permutation(len(sources))
                            for _ in range(reps)])[:count]
    x = np.empty((count, CANVAS, CANVAS, 1), dtype=np.float32)
    for i, index in enumerate(order):
        x[i, :, :, 0] = render(sources, int(index), rng)
    return x, labels[order].astype(np.int64)


def cluttered_digits(n_train: int, n_test: int, data_seed: int = 0
                     ) -> Digits:
    """Build the cluttered-digits set deterministically.

    Parameters
    ----------
    n_train, n_test : int
        Number of rendered train and test images.
    data_seed : int, default 0
        Seed of the split, placements and clutter. The same seed gives the
        same images on every machine.

    Returns
    -------
    Digits

    Notes
    -----
    ``TEST_SOURCE_FRACTION`` of the 1797 source digits (539) feed the test
    set, the other 1258 the train set; see the module docstring for the
    rendering.
    """
    from sklearn.datasets import load_digits

    if n_train < 1 or n_test < 1:
        raise ValueError(
            f"n_train and n_test must be positive, got {n_train} and "
            f"{n_test}")
    digits = load_digits()
    images = digits.images / 16.0
    labels = digits.target
    rng = np.random.default_rng(data_seed)
    order = rng.permutation(len(images))
    n_test_sources = int(round(TEST_SOURCE_FRACTION * len(images)))
    test_idx, train_idx = order[:n_test_sources], order[n_test_sources:]
    x_train, y_train = _render_pool(images[train_idx], labels[train_idx],
                                    n_train, rng)
    x_test, y_test = _render_pool(images[test_idx], labels[test_idx],
                                  n_test, rng)
    return Digits(x_train, y_train, x_test, y_test)
