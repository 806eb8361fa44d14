"""A small CNN in NumPy with sorted weighted pooling, forward and backward.

Every layer has ``forward(x, train)`` and ``backward(grad_y) -> grad_x``
and lists its parameters and their gradients in the same order in
``params()`` and ``grads()``; :class:`Adam` updates the parameters in place.
Activations are NHWC, the layout :class:`sortpool_ref.SortPool2d` uses by
default. The pooling layers are the project's :class:`~sortpool_ref.SortPool2d`
with its own forward and backward; nothing here re-implements the pooling.

The network, as in the seed article's code but narrower::

    conv3x3(c1) + BN + ReLU -> pool -> conv3x3(c2) + BN + ReLU -> pool
    -> dense(d) + BN + ReLU -> dense(classes) -> softmax cross-entropy

Convolutions have no bias (each is followed by BatchNorm, whose shift makes
a bias redundant).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..layer import SortPool2d


def glorot_uniform(rng: np.random.Generator, shape: Tuple[int, ...],
                   fan_in: int, fan_out: int, dtype: Any) -> np.ndarray:
    """Glorot/Xavier uniform initial weights (TensorFlow's default)."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


class Conv2d:
    """3x3 (or any odd square kernel) convolution, stride 1, 'same' zero
    padding, no bias. Weights are ``(kh, kw, C_in, C_out)``.

    Notes
    -----
    The forward pass takes a windowed view of the padded input
    (``sliding_window_view``, no copy), lays it out as an
    ``(N*H*W, kh*kw*C_in)`` matrix and multiplies it by the weights; the
    matrix is kept for the weight gradient. The input gradient multiplies the
    output gradient by the transposed weights and adds the ``kh*kw`` shifted
    slices back into place.
    """

    def __init__(self, c_in: int, c_out: int, rng: np.random.Generator,
                 kernel: int = 3, dtype: Any = np.float32,
                 input_grad: bool = True) -> None:
        self.kernel = kernel
        self.weight = glorot_uniform(rng, (kernel, kernel, c_in, c_out),
                                     kernel * kernel * c_in,
                                     kernel * kernel * c_out, dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.input_grad = input_grad
        self._cols: Optional[np.ndarray] = None
        self._shape: Optional[Tuple[int, ...]] = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        n, h, w, c = x.shape
        k = self.kernel
        p = k // 2
        xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        # (N, H, W, C, kh, kw) view -> (N, H, W, kh, kw, C) to match weights
        windows = sliding_window_view(xp, (k, k), axis=(1, 2))
        cols = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w,
                                                           k * k * c)
        y = cols @ self.weight.reshape(k * k * c, -1)
        if train:
            self._cols, self._shape = cols, x.shape
        return y.reshape(n, h, w, -1)

    def backward(self, grad_y: np.ndarray) -> Optional[np.ndarray]:
        n, h, w, c = self._shape
        k = self.kernel
        p = k // 2
        g = grad_y.reshape(n * h * w, -1)
        self.grad_weight = (self._cols.T @ g).reshape(self.weight.shape)
        self._cols = None
        if not self.input_grad:
            return None
        grad_cols = (g @ self.weight.reshape(k * k * c, -1).T).reshape(
            n, h, w, k, k, c)
        grad_xp = np.zeros((n, h + 2 * p, w + 2 * p, c), dtype=grad_y.dtype)
        for i in range(k):
            for j in range(k):
                grad_xp[:, i:i + h, j:j + w, :] += grad_cols[:, :, :, i, j, :]
        return grad_xp[:, p:p + h, p:p + w, :]

    def params(self) -> List[np.ndarray]:
        return [self.weight]

    def grads(self) -> List[np.ndarray]:
        return [self.grad_weight]


class BatchNorm:
    """Batch normalisation over every axis but the last (channels).

    Training uses the batch's mean and biased variance and updates running
    averages, ``running = momentum * running + (1 - momentum) * batch``;
    evaluation uses the running averages.
    """

    def __init__(self, features: int, dtype: Any = np.float32,
                 momentum: float = 0.9, eps: float = 1e-3) -> None:
        self.gamma = np.ones(features, dtype=dtype)
        self.beta = np.zeros(features, dtype=dtype)
        self.grad_gamma = np.zeros_like(self.gamma)
        self.grad_beta = np.zeros_like(self.beta)
        self.running_mean = np.zeros(features, dtype=dtype)
        self.running_var = np.ones(features, dtype=dtype)
        self.momentum = momentum
        self.eps = eps
        self._cache = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        # Channel sums through einsum on an (M, C) view: much faster than
        # reductions over the leading axes of an NHWC array.
        x2 = x.reshape(-1, x.shape[-1])
        count = x2.shape[0]
        if train:
            mean = np.einsum("ij->j", x2) / count
            centred = x2 - mean
            var = np.einsum("ij,ij->j", centred, centred) / count
            m = self.momentum
            self.running_mean = (m * self.running_mean
                                 + (1 - m) * mean).astype(x.dtype)
            self.running_var = (m * self.running_var
                                + (1 - m) * var).astype(x.dtype)
        else:
            centred = x2 - self.running_mean
            var = self.running_var
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype)
        x_hat = centred * inv_std
        if train:
            self._cache = (x_hat, inv_std)
        return (x_hat * self.gamma + self.beta).reshape(x.shape)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        x_hat, inv_std = self._cache
        self._cache = None
        g = grad_y.reshape(x_hat.shape)
        count = x_hat.shape[0]
        self.grad_beta = np.einsum("ij->j", g)
        self.grad_gamma = np.einsum("ij,ij->j", g, x_hat)
        # dL/dx = gamma / std * (g - mean(g) - x_hat * mean(g * x_hat))
        grad_x = (self.gamma * inv_std) * (
            g - self.grad_beta / count - x_hat * (self.grad_gamma / count))
        return grad_x.reshape(grad_y.shape)

    def params(self) -> List[np.ndarray]:
        return [self.gamma, self.beta]

    def grads(self) -> List[np.ndarray]:
        return [self.grad_gamma, self.grad_beta]


class ReLU:
    def __init__(self) -> None:
        self._mask = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        y = np.maximum(x, 0)
        if train:
            self._mask = y > 0
        return y

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        grad_x = grad_y * self._mask
        self._mask = None
        return grad_x

    def params(self) -> List[np.ndarray]:
        return []

    def grads(self) -> List[np.ndarray]:
        return []


class Pool:
    """Adapter giving :class:`sortpool_ref.SortPool2d` the layer protocol
    of this module; its learnable rank weights are ``pool.weights`` (float64,
    updated in place by the optimiser)."""

    def __init__(self, pool: SortPool2d) -> None:
        self.pool = pool

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        return self.pool.forward(x)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        return self.pool.backward(grad_y)

    def params(self) -> List[np.ndarray]:
        return [self.pool.weights]

    def grads(self) -> List[np.ndarray]:
        return [self.pool.grad]


class Flatten:
    def __init__(self) -> None:
        self._shape = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        return grad_y.reshape(self._shape)

    def params(self) -> List[np.ndarray]:
        return []

    def grads(self) -> List[np.ndarray]:
        return []


class Dense:
    """``x @ weight + bias``; weights ``(in, out)``."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator,
                 dtype: Any = np.float32) -> None:
        self.weight = glorot_uniform(rng, (n_in, n_out), n_in, n_out, dtype)
        self.bias = np.zeros(n_out, dtype=dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self._x = None

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        if train:
            self._x = x
        return x @ self.weight + self.bias

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        self.grad_weight = self._x.T @ grad_y
        self.grad_bias = grad_y.sum(axis=0)
        self._x = None
        return grad_y @ self.weight.T

    def params(self) -> List[np.ndarray]:
        return [self.weight, self.bias]

    def grads(self) -> List[np.ndarray]:
        return [self.grad_weight, self.grad_bias]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray
                          ) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy of integer ``labels`` and its gradient with
    respect to ``logits``."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_p = z - log_sum
    n = logits.shape[0]
    loss = -float(log_p[np.arange(n), labels].astype(np.float64).mean())
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


def initial_rank_logits(seed: int, layer: int, pool_range: int
                        ) -> np.ndarray:
    """The seed code's initial logits, N(0, 0.1^2), one vector per layer.

    Drawn from their own generator so that settings with the same seed share
    every other initial weight and the batch order.
    """
    return np.random.default_rng([seed, 1000 + layer]).normal(
        0.0, 0.1, size=pool_range)


class Network:
    """The demo CNN: see the module docstring.

    Parameters
    ----------
    pool_range : int
        Ranks kept by each pooling layer (1 is max pooling).
    weighting : {'softmax', 'raw'}
        How the pooling layers' weights become rank weights. Raw weights
        start at the softmax of the logits the softmax variant starts with,
        so both variants start from the same rank weights.
    seed : int
        Seed of every initial weight.
    image_size : int
        Height and width of the (square, one-channel) input; divisible by 4.
    channels : (int, int)
        Output channels of the two convolutions.
    dense : int
        Width of the hidden dense layer.
    classes : int
        Number of outputs.
    dtype : float32 or float64
        Dtype of the parameters and activations (pooling weights are float64
        whatever this is).
    engine : str
        Engine of the pooling layers (see :func:`sortpool_ref.sortpool2d`).
    """

    def __init__(self, pool_range: int, weighting: str = "softmax", *,
                 seed: int = 0, image_size: int = 40,
                 channels: Sequence[int] = (16, 16), dense: int = 128,
                 classes: int = 10, dtype: Any = np.float32,
                 engine: str = "auto") -> None:
        if image_size % 4:
            raise ValueError(
                f"image_size must be divisible by 4, got {image_size}")
        rng = np.random.default_rng(seed)
        c1, c2 = channels
        self.pools = []
        for layer in range(2):
            logits = initial_rank_logits(seed, layer, pool_range)
            init = logits if weighting == "softmax" else np.exp(
                logits) / np.exp(logits).sum()
            self.pools.append(SortPool2d(pool_range, weighting=weighting,
                                         init=init, engine=engine))
        flat = (image_size // 4) ** 2 * c2
        self.layers = [
            Conv2d(1, c1, rng, dtype=dtype, input_grad=False),
            BatchNorm(c1, dtype), ReLU(), Pool(self.pools[0]),
            Conv2d(c1, c2, rng, dtype=dtype), BatchNorm(c2, dtype), ReLU(),
            Pool(self.pools[1]), Flatten(),
            Dense(flat, dense, rng, dtype), BatchNorm(dense, dtype), ReLU(),
            Dense(dense, classes, rng, dtype),
        ]
        self.dtype = np.dtype(dtype)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """Logits of a batch of NHWC images."""
        x = np.asarray(x, dtype=self.dtype)
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, grad_logits: np.ndarray) -> None:
        """Fill every layer's gradients from dL/dlogits (after a training
        forward pass)."""
        g = np.asarray(grad_logits, dtype=self.dtype)
        for layer in reversed(self.layers):
            g = layer.backward(g)

    def params(self) -> List[np.ndarray]:
        return [p for layer in self.layers for p in layer.params()]

    def grads(self) -> List[np.ndarray]:
        return [g for layer in self.layers for g in layer.grads()]

    def loss_and_grads(self, x: np.ndarray, labels: np.ndarray
                       ) -> Tuple[float, List[np.ndarray]]:
        """Training-mode loss of a batch; gradients in :meth:`params` order."""
        loss, grad = softmax_cross_entropy(self.forward(x, train=True),
                                           labels)
        self.backward(grad)
        return loss, self.grads()

    def rank_weights(self) -> List[np.ndarray]:
        """Each pooling layer's rank weights (softmax(w), or w if raw)."""
        return [pool.rank_weights() for pool in self.pools]


class Adam:
    """Adam (Kingma and Ba) with bias correction, updating in place."""

    def __init__(self, params: List[np.ndarray], lr: float = 1e-3,
                 beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.params = params
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: List[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        scale = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= (scale * m / (np.sqrt(v) + self.eps)).astype(p.dtype)
