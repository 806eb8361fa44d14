"""The demo: its network's gradients, its data, determinism, and the CLI end
to end (``sortpool demo --quick``)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn "
                                      "(pip install '.[demo]')")
pytest.importorskip("matplotlib", reason="the demo needs matplotlib "
                                         "(pip install '.[demo]')")
pytest.importorskip("tqdm", reason="the demo needs tqdm "
                                   "(pip install '.[demo]')")

from sortpool_ref.__main__ import main as sortpool_main  # noqa: E402
from sortpool_ref.demo import cli  # noqa: E402
from sortpool_ref.demo.data import (CANVAS, cluttered_digits,  # noqa: E402
                                    interpolation_matrix)
from sortpool_ref.demo.net import (Adam, Network,  # noqa: E402
                                   softmax_cross_entropy)
from sortpool_ref.demo.train import Setting, train_run  # noqa: E402


def tiny_network(pool_range, weighting, engine="auto"):
    return Network(pool_range, weighting, seed=3, image_size=8,
                   channels=(2, 3), dense=5, classes=3, dtype=np.float64,
                   engine=engine)


@pytest.mark.parametrize("pool_range, weighting, engine", [
    (1, "softmax", "auto"),
    (2, "softmax", "auto"),
    (3, "softmax", "auto"),
    (3, "softmax", "reference"),
    (3, "raw", "auto"),
    (4, "softmax", "auto"),
])
def test_network_gradients_match_central_differences(pool_range, weighting,
                                                     engine):
    """Every parameter's analytic gradient (convolutions, BatchNorm in
    training mode, ReLU, SortPool2d weights, dense) against float64 central
    differences of the loss."""
    net = tiny_network(pool_range, weighting, engine)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 1))
    labels = np.array([0, 2, 1, 2])
    _, grads = net.loss_and_grads(x, labels)
    grads = [g.copy() for g in grads]
    h = 1e-6
    params = net.params()
    assert len(params) == len(grads) == 14
    for index, (p, g) in enumerate(zip(params, grads)):
        assert g.shape == p.shape
        numeric = np.empty_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up, _ = softmax_cross_entropy(net.forward(x), labels)
            p[i] = old - h
            down, _ = softmax_cross_entropy(net.forward(x), labels)
            p[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8,
                                   err_msg=f"parameter {index}")
    pool_grads = [layer.grad for layer in net.pools]
    if pool_range > 1:
        # the rank weights do receive gradient (softmax: zero sum)
        assert all(np.abs(g).max() > 1e-4 for g in pool_grads)


def test_raw_weights_start_at_the_softmax_of_the_same_logits():
    soft = tiny_network(3, "softmax")
    raw = tiny_network(3, "raw")
    for a, b in zip(soft.rank_weights(), raw.rank_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-15)
    for p, q in zip(soft.params(), raw.params()):
        if p.ndim > 1:  # convolution and dense weights are shared
            np.testing.assert_array_equal(p, q)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 1))
    np.testing.assert_allclose(soft.forward(x), raw.forward(x), rtol=1e-12)


def test_adam_step_matches_its_formula():
    p = np.array([1.0, -2.0])
    g = np.array([0.5, -0.25])
    opt = Adam([p], lr=0.1)
    opt.step([g])
    # first step of Adam: m_hat = g, v_hat = g^2, step = lr * sign(g)
    np.testing.assert_allclose(p, [1.0 - 0.1, -2.0 + 0.1], rtol=1e-6)


def test_interpolation_matrix():
    np.testing.assert_allclose(interpolation_matrix(8, 8), np.eye(8))
    m = interpolation_matrix(8, 21)
    assert m.shape == (21, 8)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    # a linear ramp is sampled exactly at the aligned pixel centres
    centres = np.clip((np.arange(21) + 0.5) * 8 / 21 - 0.5, 0, 7)
    np.testing.assert_allclose(m @ np.arange(8.0), centres, atol=1e-12)


def test_cluttered_digits_are_deterministic_and_well_formed():
    a = cluttered_digits(40, 20, data_seed=0)
    b = cluttered_digits(40, 20, data_seed=0)
    c = cluttered_digits(40, 20, data_seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (40, CANVAS, CANVAS, 1)
    assert a.x_test.shape == (20, CANVAS, CANVAS, 1)
    assert a.x_train.dtype == np.float32
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    assert set(a.y_train) <= set(range(10)) and len(set(a.y_train)) > 5
    # every canvas shows something, and no two are the same
    assert (a.x_train.reshape(40, -1).max(axis=1) > 0.5).all()
    assert len({img.tobytes() for img in a.x_train}) == 40


def test_cluttered_digits_rejects_empty_sets():
    with pytest.raises(ValueError, match="n_train and n_test must be "
                                         "positive, got 0 and 5"):
        cluttered_digits(0, 5)


@pytest.fixture(scope="module")
def small_data():
    return cluttered_digits(96, 48, data_seed=0)


def test_training_is_deterministic_and_learns(small_data):
    kw = dict(epochs=3, batch_size=16, progress=False, dense=16)
    first = train_run(small_data, Setting(3), 0, **kw)
    again = train_run(small_data, Setting(3), 0, **kw)
    other = train_run(small_data, Setting(3), 1, **kw)
    for key in ("train_ce", "test_ce", "test_acc", "rank_weights"):
        assert first[key] == again[key], key
    assert first["test_ce"] != other["test_ce"]
    assert len(first["test_ce"]) == 3
    # the training loss goes down and the rank weights move from the start
    assert first["train_ce"][-1] < first["train_ce"][0]
    start = Network(3, seed=0).rank_weights()
    assert not np.allclose(first["rank_weights"][-1][0], start[0],
                           atol=1e-4)


def check_outputs(out, n_runs, epochs, labels):
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    assert len(result["runs"]) == n_runs
    assert [e["setting"]["label"] for e in result["summary"]] == labels
    for run in result["runs"]:
        assert len(run["test_ce"]) == len(run["test_acc"]) == epochs
        assert all(np.isfinite(run["test_ce"]))
        best = min(run["test_ce"])
        entry = next(e for e in result["summary"]
                     if e["setting"]["label"] == run["setting"]["label"])
        assert best in entry["best_test_ce"]["values"]
    with open(os.path.join(out, "demo.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    for label in labels:
        assert f"| {label} |" in table
    return result


def test_cli_small_run_through_sortpool_main(tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = sortpool_main([
        "demo", "--epochs", "2", "--seeds", "2", "--train-samples", "48",
        "--test-samples", "24", "--pool-ranges", "1", "2",
        "--raw-pool-ranges", "2", "--dense", "16", "--out", out,
        "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    labels = ["pool_range 1 (max)", "pool_range 2", "pool_range 2 raw"]
    result = check_outputs(out, n_runs=6, epochs=2, labels=labels)
    assert "mean ± sd over seeds" in printed
    assert f"are in {os.path.abspath(out)}" in printed
    for label in labels:
        assert f"| {label} |" in printed
    # the paired difference is against the max-pooling run of the same seed
    summary = {e["setting"]["label"]: e for e in result["summary"]}
    assert summary["pool_range 1 (max)"]["paired_best_ce_vs_max"] is None
    diffs = summary["pool_range 2"]["paired_best_ce_vs_max"]["values"]
    mine = summary["pool_range 2"]["best_test_ce"]["values"]
    ref = summary["pool_range 1 (max)"]["best_test_ce"]["values"]
    np.testing.assert_allclose(diffs, np.subtract(mine, ref))


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--epochs", "0"])
    assert info.value.code == 2
    assert "--epochs must be a positive int, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--pool-ranges", "5"])
    assert ("pool ranges must be in 1..4 for 2x2 windows, got 5"
            in capsys.readouterr().err)


@pytest.mark.slow
def test_cli_quick_end_to_end(tmp_path, capsys):
    """The real ``sortpool demo --quick`` path (about a minute)."""
    out = str(tmp_path / "quick")
    assert cli.main(["--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    q = cli.QUICK
    labels = ["pool_range 1 (max)", "pool_range 2", "pool_range 3",
              "pool_range 4", "pool_range 3 raw"]
    result = check_outputs(out, n_runs=5, epochs=q["epochs"], labels=labels)
    assert result["config"]["quick"] is True
    assert result["config"]["train_samples"] == q["train_samples"]
    assert "one seed" in printed
