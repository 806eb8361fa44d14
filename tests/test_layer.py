"""SortPool2d, the layer object for NumPy pipelines."""

import re

import numpy as np
import pytest

import sortpool_ref
from sortpool_ref import SortPool2d


def test_forward_backward_match_the_functions():
    rng = np.random.default_rng(0)
    pool = SortPool2d(3, kernel_size=3, stride=2, padding=1, channels=4,
                      seed=1)
    assert pool.weights.shape == (4, 3) and pool.pool_range == 3
    x = rng.normal(size=(2, 9, 9, 4))
    y = pool.forward(x)
    np.testing.assert_array_equal(y, sortpool_ref.sortpool2d(
        x, pool.weights, kernel_size=3, stride=2, padding=1))
    g = rng.normal(size=y.shape)
    gx = pool.backward(g)
    gx2, gw2 = sortpool_ref.sortpool2d_backward(
        g, x, pool.weights, kernel_size=3, stride=2, padding=1)
    np.testing.assert_array_equal(gx, gx2)
    np.testing.assert_array_equal(pool.grad, gw2)


def test_grad_is_overwritten_not_accumulated():
    pool = SortPool2d(2, init="uniform")
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 2))
    y = pool(x)
    pool.backward(np.ones_like(y))
    first = pool.grad.copy()
    pool.backward(np.ones_like(y))
    np.testing.assert_array_equal(pool.grad, first)


def test_inits():
    normal = SortPool2d(4, seed=0).weights
    assert normal.shape == (4,) and 0.0 < normal.std() < 0.3
    np.testing.assert_array_equal(SortPool2d(4, seed=0).weights, normal)
    np.testing.assert_array_equal(SortPool2d(4, init="uniform").weights,
                                  np.zeros(4))
    np.testing.assert_array_equal(
        SortPool2d(4, init="uniform", weighting="raw").weights,
        np.full(4, 0.25))
    given = np.array([1.0, 2.0])
    pool = SortPool2d(2, init=given)
    given[0] = 5.0  # the layer holds its own copy
    np.testing.assert_array_equal(pool.weights, [1.0, 2.0])
    np.testing.assert_allclose(SortPool2d(2, init=[0.0, 0.0]).rank_weights(),
                               [0.5, 0.5])


def test_uniform_softmax_layer_is_average_pooling_and_k1_is_max_pooling():
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 3))
    avg = x.reshape(2, 3, 2, 3, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(SortPool2d(4, init="uniform")(x), avg,
                               rtol=1e-12)
    mx = x.reshape(2, 3, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(SortPool2d(1)(x), mx)


def test_sgd_steps_reduce_a_loss():
    """Learning the rank weights: push the output towards the window mean
    from a max-like start; the loss must fall."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 8, 8, 2))
    target = x.reshape(8, 4, 2, 4, 2, 2).min(axis=(2, 4))
    pool = SortPool2d(4, init=[2.0, 0.0, 0.0, 0.0])
    losses = []
    for _ in range(30):
        y = pool(x)
        losses.append(0.5 * np.mean((y - target) ** 2))
        pool.backward((y - target) / y.size)
        pool.weights -= 50.0 * pool.grad
    assert losses[-1] < 0.5 * losses[0]
    # The weight moves to the last rank (the window minimum).
    assert np.argmax(pool.rank_weights()) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(pool_range=0), "pool_range must be a positive int, got 0"),
    (dict(pool_range=2.0), "pool_range must be a positive int, got 2.0"),
    (dict(pool_range=2, channels=0),
     "channels must be None or a positive int, got 0"),
    (dict(pool_range=2, init="xavier"),
     "init must be 'normal', 'uniform' or an array, got 'xavier'"),
    (dict(pool_range=2, init=[1.0, 2.0, 3.0]),
     "init has shape (3,) but pool_range=2 and channels=None need (2,)"),
    (dict(pool_range=2, weighting="sum"),
     "weighting must be 'softmax' or 'raw', got 'sum'"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SortPool2d(**kwargs)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="backward\\(\\) called before "
                                           "forward\\(\\)"):
        SortPool2d(2).backward(np.zeros((1, 1, 1, 1)))


def test_pool_range_larger_than_window_is_caught_at_forward():
    pool = SortPool2d(5)
    with pytest.raises(ValueError, match="pool_range"):
        pool(np.zeros((1, 4, 4, 1)))
