"""sortpool_ref.torch: the PyTorch layer on the project's engines."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from hypothesis import settings  # noqa: E402

import sortpool_ref  # noqa: E402
import sortpool_ref.testing  # noqa: E402
from sortpool_ref import _numba_engine, reference  # noqa: E402
from sortpool_ref._engines import engine_problem  # noqa: E402
from sortpool_ref.testing import (ConformanceError,  # noqa: E402
                                  assert_close, assert_matches_reference,
                                  from_torch, tolerance_scale)
from sortpool_ref.testing.strategies import (distinct_array,  # noqa: E402
                                             tied_array)
from sortpool_ref.torch import SortPool2d, sortpool2d  # noqa: E402

FIXED = settings(derandomize=True, database=None)
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def nhwc_to_nchw(a):
    return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------
# Optional dependency


def test_import_sortpool_ref_does_not_import_torch():
    code = ("import sys, sortpool_ref, sortpool_ref.testing; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------
# Agreement with the reference, through the conformance kit


def test_functional_matches_reference_through_the_kit():
    assert_matches_reference(*from_torch(sortpool2d), max_examples=30,
                             settings=FIXED)


def test_functional_matches_reference_in_float32_through_the_kit():
    assert_matches_reference(*from_torch(sortpool2d), dtype=np.float32,
                             max_examples=20, settings=FIXED)


def test_channels_last_input_matches_reference_through_the_kit():
    def channels_last(x, w, **kwargs):
        if kwargs["layout"] == "NCHW":
            x = x.contiguous(memory_format=torch.channels_last)
        return sortpool2d(x, w, **kwargs)

    assert_matches_reference(*from_torch(channels_last), layouts=("NCHW",),
                             max_examples=20, settings=FIXED)


# ---------------------------------------------------------------------------
# Zero-copy hand-over to the Numba engine


@pytest.fixture
def engine_calls(monkeypatch):
    """Records the arrays the Numba engine receives and returns."""
    calls = []
    forward, backward = _numba_engine.forward, _numba_engine.backward

    def spy_forward(x, w, problem):
        y = forward(x, w, problem)
        calls.append(("forward", x, w, problem, y))
        return y

    def spy_backward(grad_y, x, w, problem):
        gx, gw = backward(grad_y, x, w, problem)
        calls.append(("backward", x, w, problem, gx))
        return gx, gw

    monkeypatch.setattr(_numba_engine, "forward", spy_forward)
    monkeypatch.setattr(_numba_engine, "backward", spy_backward)
    return calls


def test_cpu_tensors_reach_the_engine_without_a_copy(engine_calls):
    x = t(distinct_array((2, 3, 6, 5)), grad=True)
    w = t([0.3, -0.2, 0.1], grad=True)
    y = sortpool2d(x, w, kernel_size=3, stride=2, padding=1)
    _, xa, wa, problem, ya = engine_calls[-1]
    assert problem.layout == "NCHW"
    assert xa.ctypes.data == x.data_ptr() and xa.shape == tuple(x.shape)
    assert wa.ctypes.data == w.data_ptr()
    assert y.data_ptr() == ya.ctypes.data
    y.backward(torch.ones_like(y))
    _, xa, _, _, gxa = engine_calls[-1]
    assert xa.ctypes.data == x.data_ptr()
    assert x.grad.data_ptr() == gxa.ctypes.data


def test_channels_last_goes_as_an_nhwc_view_and_stays_channels_last(
        engine_calls):
    base = t(distinct_array((2, 3, 6, 5)))
    x = base.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = t(np.array([[0.3, -0.2], [0.0, 0.5], [1.0, 0.1]]), grad=True)
    y = sortpool2d(x, w, kernel_size=2, padding=1, ceil_mode=True)
    _, xa, _, problem, _ = engine_calls[-1]
    assert problem.layout == "NHWC"
    assert xa.ctypes.data == x.data_ptr() and xa.flags.c_contiguous
    assert xa.shape == (2, 6, 5, 3)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y0 = sortpool2d(base, w, kernel_size=2, padding=1, ceil_mode=True)
    assert torch.equal(y, y0)
    g = t(distinct_array(y.shape, seed=1))
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    bx = base.clone().requires_grad_()
    gx0, gw0 = torch.autograd.grad(
        sortpool2d(bx, w, kernel_size=2, padding=1, ceil_mode=True), (bx, w),
        g)
    assert torch.equal(gx, gx0) and torch.equal(gw, gw0)


def test_non_contiguous_input_and_gradient():
    big = t(distinct_array((2, 4, 9, 8)), grad=True)
    x = big[:, ::2, 1::2, :]          # strided view, no copy
    w = t([0.5, 0.2], grad=True)
    y = sortpool2d(x, w, kernel_size=2)
    xc = x.detach().contiguous()
    assert torch.equal(y, sortpool2d(xc, w, kernel_size=2))
    y.sum().backward()                # an expanded (stride 0) grad_y
    gx, gw = reference.sortpool2d_backward(
        np.ones(tuple(y.shape)), xc.numpy(), w.detach().numpy(),
        kernel_size=2, layout="NCHW")
    assert_close(big.grad[:, ::2, 1::2, :], gx, np.float64,
                 tolerance_scale("grad_x", xc, w.detach(), np.ones(1),
                                 window_size=4), "grad_x")
    assert_close(w.grad, gw, np.float64, tolerance_scale(
        "grad_w", xc, w.detach(), np.ones(tuple(y.shape))), "grad_w")


def test_nhwc_layout():
    x = distinct_array((2, 5, 6, 3))
    w = np.array([0.2, -0.4, 0.9])
    y = sortpool2d(t(x), t(w), kernel_size=3, stride=1, layout="NHWC")
    expected = reference.sortpool2d(x, w, kernel_size=3, stride=1)
    assert_close(y, expected, np.float64, tolerance_scale("y", x, w))


def test_inputs_are_not_modified():
    x = t(tied_array((1, 2, 5, 5)), grad=True)
    w = t([0.1, 0.2, 0.3], grad=True)
    x0, w0 = x.detach().clone(), w.detach().clone()
    sortpool2d(x, w, kernel_size=3, padding=1, pad_value=-1.0).sum() \
        .backward()
    assert torch.equal(x.detach(), x0) and torch.equal(w.detach(), w0)


def test_mixed_dtypes_give_gradients_in_each_tensors_dtype():
    x = t(distinct_array((1, 2, 4, 4), dtype=np.float32), grad=True)
    w = t(np.array([0.1, 0.7]), grad=True)
    y = sortpool2d(x, w)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float64


# ---------------------------------------------------------------------------
# Gradients: gradcheck, max pooling, average pooling

GRADCHECK_CASES = [
    ("NCHW", dict(kernel_size=2)),
    ("NCHW", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("NHWC", dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1))),
    ("NHWC", dict(kernel_size=2, weighting="raw", ceil_mode=True)),
    ("channels_last", dict(kernel_size=3, padding="same", pad_value=0.05)),
    ("channels_last", dict(kernel_size=3, stride=2, padding=1,
                           ceil_mode=True)),
    ("per_channel", dict(kernel_size=3, stride=1, padding=1)),
    ("per_channel", dict(kernel_size=2, weighting="raw", padding=1,
                         pad_value=-0.33)),
]


@pytest.mark.parametrize(
    "form, options", GRADCHECK_CASES,
    ids=[f"{f}-" + ",".join(f"{k}={v}" for k, v in o.items())
         for f, o in GRADCHECK_CASES])
def test_gradcheck_float64(form, options):
    # Pairwise gaps of 0.1 (and pad values off that grid) are far above
    # gradcheck's step of 1e-6, so no perturbation reorders a window.
    shape = (1, 5, 6, 2) if form == "NHWC" else (1, 2, 5, 6)
    x = t(distinct_array(shape, seed=3))
    if form == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    k = 3
    w_shape = (2, k) if form == "per_channel" else (k,)
    w = t(np.random.default_rng(4).normal(size=w_shape), grad=True)
    layout = "NHWC" if form == "NHWC" else "NCHW"
    assert torch.autograd.gradcheck(
        lambda x, w: sortpool2d(x, w, layout=layout, **options), (x, w))


def test_second_derivatives_are_refused_clearly():
    x = t(distinct_array((1, 1, 4, 4)), grad=True)
    w = t([0.1, 0.2], grad=True)
    y = sortpool2d(x, w)
    with pytest.raises(RuntimeError) as info:
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
    assert str(info.value) == (
        "sortpool_ref.torch.sortpool2d has no second derivative: its "
        "backward pass cannot be differentiated (create_graph=True)")
    # Without create_graph the same graph differentiates once.
    (gx,) = torch.autograd.grad((y * y).sum(), x)
    assert gx.abs().sum() > 0


MAXPOOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2)),
    dict(kernel_size=2, stride=3, ceil_mode=True),
]


@pytest.mark.parametrize("options", MAXPOOL_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_range_1_is_max_pool2d(options, channels_last):
    # Ties everywhere (and signed zeros): both send the gradient to the
    # first maximum in scan order.
    x0 = t(tied_array((2, 3, 7, 8), seed=5))
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    g = t(distinct_array((2, 3, 7, 8), seed=6))
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    w = t([0.7], grad=True)
    ya = sortpool2d(xa, w, **options)
    yb = F.max_pool2d(xb, **options)
    assert torch.equal(ya, yb)
    gy = g[..., :ya.shape[2], :ya.shape[3]]
    (ga,) = torch.autograd.grad(ya, xa, gy)
    (gb,) = torch.autograd.grad(yb, xb, gy)
    kernel = np.broadcast_to(options["kernel_size"], 2)
    stride = np.broadcast_to(options.get("stride", kernel), 2)
    dilation = np.broadcast_to(options.get("dilation", 1), 2)
    if np.all(stride >= (kernel - 1) * dilation + 1):
        # Each input is in at most one window: one term, bit-exact.
        assert torch.equal(ga, gb)
    else:
        # Overlapping windows add several terms; PyTorch and the engine
        # may add them in different orders (last-ulp differences). The
        # routing is what this test is about: same positions, same sums.
        assert torch.equal(ga != 0, gb != 0)
        assert_close(ga.numpy(), gb.numpy(), np.float64,
                     tolerance_scale("grad_x", x0.numpy(), np.zeros(1),
                                     gy.numpy(), window_size=int(
                                         np.prod(kernel))))


def test_pool_range_1_propagates_nan_like_max_pool2d():
    x = t(distinct_array((1, 2, 6, 6), seed=7))
    with torch.no_grad():
        x[0, 0, 1, 1] = float("nan")
        x[0, 1, 4, 5] = float("nan")
    y = sortpool2d(x, t([0.0]), kernel_size=3, stride=1, padding=1)
    torch.testing.assert_close(
        y, F.max_pool2d(x, 3, stride=1, padding=1), rtol=0, atol=0,
        equal_nan=True)
    assert torch.isnan(y).sum() == 9 + 6


AVGPOOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1), ceil_mode=True),
]


@pytest.mark.parametrize("options", AVGPOOL_CASES)
def test_uniform_weights_are_avg_pool2d_without_padding(options):
    x0 = t(np.random.default_rng(8).normal(size=(2, 3, 7, 6)))
    kh, kw = np.broadcast_to(options["kernel_size"], (2,))
    xa, xb = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    ya = sortpool2d(xa, torch.zeros(kh * kw, dtype=torch.float64), **options)
    yb = F.avg_pool2d(xb, count_include_pad=False, **options)
    assert_close(ya.detach(), yb.detach(), np.float64,
                 tolerance_scale("y", x0, np.zeros(1)), "y")
    g = t(np.random.default_rng(9).normal(size=tuple(ya.shape)))
    (ga,) = torch.autograd.grad(ya, xa, g)
    (gb,) = torch.autograd.grad(yb, xb, g)
    assert_close(ga, gb, np.float64, tolerance_scale(
        "grad_x", x0, np.zeros(1), g, window_size=int(kh * kw)), "grad_x")


# ---------------------------------------------------------------------------
# The module


def test_module_weights_are_a_parameter_and_train():
    torch.manual_seed(0)
    pool = SortPool2d(3, kernel_size=3, stride=2, padding=1, channels=4,
                      dtype=torch.float64)
    assert isinstance(pool.weights, torch.nn.Parameter)
    assert pool.weights.shape == (4, 3) and pool.pool_range == 3
    assert [name for name, _ in pool.named_parameters()] == ["weights"]
    x = t(distinct_array((2, 4, 7, 7)), grad=True)
    w0 = pool.weights.detach().clone()
    y = pool(x)
    g = t(np.random.default_rng(1).normal(size=tuple(y.shape)))
    y.backward(g)
    gx, gw = sortpool_ref.sortpool2d_backward(
        g.numpy(), x.detach().numpy(), w0.numpy(), kernel_size=3, stride=2,
        padding=1, layout="NCHW")
    np.testing.assert_array_equal(x.grad.numpy(), gx)
    np.testing.assert_array_equal(pool.weights.grad.numpy(), gw)
    torch.optim.SGD(pool.parameters(), lr=0.5).step()
    np.testing.assert_array_equal(pool.weights.detach().numpy(),
                                  w0.numpy() - 0.5 * gw)


def test_module_init():
    torch.manual_seed(3)
    a = SortPool2d(4).weights.detach().clone()
    torch.manual_seed(3)
    b = SortPool2d(4).weights.detach().clone()
    c = SortPool2d(4).weights.detach()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.get_default_dtype()
    assert torch.equal(SortPool2d(3, init="uniform").weights.detach(),
                       torch.zeros(3))
    raw = SortPool2d(4, init="uniform", weighting="raw",
                     dtype=torch.float64)
    assert torch.equal(raw.weights.detach(),
                       torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(SortPool2d(2, init="uniform").rank_weights(),
                               torch.tensor([0.5, 0.5]))


def test_module_is_max_pooling_with_pool_range_1_and_repr():
    pool = SortPool2d(1, kernel_size=3, stride=2, padding=1)
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1))
    assert repr(pool) == (
        "SortPool2d(pool_range=1, weights_shape=(1,), kernel_size=3, "
        "stride=2, padding=1, dilation=1, ceil_mode=False, layout='NCHW', "
        "weighting='softmax', pad_value=None, engine='auto')")


def test_module_in_a_sequential_on_channels_last_float32():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                              SortPool2d(2, channels=4), torch.nn.ReLU())
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = net(x)
    assert y.shape == (2, 4, 4, 4)
    y.square().mean().backward()
    assert net[1].weights.grad is not None
    assert torch.isfinite(net[1].weights.grad).all()


# ---------------------------------------------------------------------------
# Errors, word for word


def test_tensor_argument_errors():
    x = torch.zeros(1, 1, 4, 4)
    w = torch.zeros(2)
    cases = [
        ((np.zeros((1, 1, 4, 4)), w), TypeError,
         "x must be a torch.Tensor, got ndarray"),
        ((x, [0.0, 1.0]), TypeError, "w must be a torch.Tensor, got list"),
        ((x.half(), w.half()), TypeError,
         "x must have dtype torch.float32 or torch.float64, got "
         "torch.float16"),
        ((x, w.to(torch.bfloat16)), TypeError,
         "w must have dtype torch.float32 or torch.float64, got "
         "torch.bfloat16"),
        ((x, w.to("meta")), ValueError,
         "x and w must be on the same device, got x on cpu and w on meta"),
        ((x.to("meta"), w.to("meta")), ValueError,
         "x must be a CPU or CUDA tensor, got a tensor on meta"),
    ]
    for args, error, message in cases:
        with pytest.raises(error) as info:
            sortpool2d(*args)
        assert str(info.value) == message


def test_shared_validator_errors_reach_torch_users():
    x = torch.zeros(1, 4, 6, 6)
    with pytest.raises(ValueError) as info:
        sortpool2d(x, torch.zeros(2, 3))
    assert str(info.value) == (
        "w has shape (2, 3): per-channel weights need one row per channel "
        "of x, i.e. shape (4, pool_range)")
    with pytest.raises(ValueError) as info:
        sortpool2d(x, torch.zeros(2), layout="CHW")
    assert str(info.value) == "layout must be 'NHWC' or 'NCHW', got 'CHW'"
    with pytest.raises(ValueError) as info:
        sortpool2d(x, torch.zeros(5))
    assert str(info.value) == (
        "pool_range (the last dimension of w) must be between 1 and "
        "kernel_h * kernel_w = 4, got 5")
    with pytest.raises(ValueError) as info:
        sortpool2d(x, torch.zeros(2), engine="cuda")
    assert str(info.value).startswith("engine 'cuda' needs CUDA arrays")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(pool_range=0), ValueError, "pool_range must be a positive int, "
     "got 0"),
    (dict(pool_range=2.0), ValueError, "pool_range must be a positive int, "
     "got 2.0"),
    (dict(pool_range=2, channels=0), ValueError,
     "channels must be None or a positive int, got 0"),
    (dict(pool_range=2, init="zeros"), ValueError,
     "init must be 'normal' or 'uniform', got 'zeros'"),
    (dict(pool_range=2, weighting="max"), ValueError,
     "weighting must be 'softmax' or 'raw', got 'max'"),
    (dict(pool_range=2, layout="NWHC"), ValueError,
     "layout must be 'NHWC' or 'NCHW', got 'NWHC'"),
])
def test_module_argument_errors(kwargs, error, message):
    with pytest.raises(error) as info:
        SortPool2d(**kwargs)
    assert str(info.value) == message


# ---------------------------------------------------------------------------
# CUDA tensors: through DLPack to the CUDA engine


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return engine_problem("cuda")


@pytest.mark.skipif(engine_problem("cuda") is None,
                    reason="the CUDA engine is usable here")
def test_cuda_tensors_without_the_cuda_engine_raise_before_any_work():
    # Creating a CUDA tensor needs a GPU; the refusal comes before any
    # tensor is touched, so the bridge is asked directly.
    from sortpool_ref import EngineUnavailableError
    from sortpool_ref.torch import _Bridge

    with pytest.raises(EngineUnavailableError) as info:
        _Bridge(torch.device("cuda", 0))
    assert str(info.value) == (
        "CUDA tensors run on the CUDA engine, which is not available: "
        + engine_problem("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_skip_reason() is not None,
                    reason=f"CUDA tensors: {_cuda_skip_reason()}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_tensors_run_on_the_cuda_engine(channels_last):
    x = t(distinct_array((2, 3, 9, 8)))
    w = t(np.array([[0.3, 0.1, -0.2]] * 3))
    xc = x.cuda()
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
    xc.requires_grad_()
    wc = w.cuda().requires_grad_()
    y = sortpool2d(xc, wc, kernel_size=3, stride=2, padding=1)
    assert y.is_cuda
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (xc, wc), g)
    ex = reference.sortpool2d(x.numpy(), w.numpy(), kernel_size=3,
                              stride=2, padding=1, layout="NCHW")
    egx, egw = reference.sortpool2d_backward(
        g.cpu().numpy(), x.numpy(), w.numpy(), kernel_size=3, stride=2,
        padding=1, layout="NCHW")
    assert_close(y.detach().cpu(), ex, np.float64,
                 tolerance_scale("y", x, w), "y")
    assert_close(gx.cpu(), egx, np.float64, tolerance_scale(
        "grad_x", x, w, g.cpu(), window_size=9), "grad_x")
    assert_close(gw.cpu(), egw, np.float64,
                 tolerance_scale("grad_w", x, w, g.cpu()), "grad_w")


# ---------------------------------------------------------------------------
# The worked example of docs/conformance.md runs as written


def _named_blocks(page):
    text = (DOCS / page).read_text()
    return dict(re.findall(
        r"```\{code-block\} python\n:name: ([\w-]+)\n\n(.*?)```", text,
        flags=re.S))


def test_docs_worked_example_runs(monkeypatch):
    blocks = _named_blocks("conformance.md")
    assert {"naive-torch", "check-naive-torch", "naive-bug"} <= set(blocks)
    # The page's calls, with fewer examples so that the suite stays quick.
    original = sortpool_ref.testing.assert_matches_reference

    def quick(*args, **kwargs):
        kwargs.update(max_examples=30, settings=FIXED)
        return original(*args, **kwargs)

    monkeypatch.setattr(sortpool_ref.testing, "assert_matches_reference",
                        quick)
    namespace = {}
    exec(blocks["naive-torch"], namespace)
    exec(blocks["check-naive-torch"], namespace)
    with pytest.raises(ConformanceError,
                       match="softmax not renormalised in partial windows"):
        exec(blocks["naive-bug"], namespace)


def test_docs_torch_example_runs():
    blocks = _named_blocks("torch.md")
    assert "torch-train" in blocks
    exec(blocks["torch-train"], {})
