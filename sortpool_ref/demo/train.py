"""Training runs and their summaries.

One *setting* is a pool_range and a weighting; one *run* trains the network
of :mod:`sortpool_ref.demo.net` for one setting and one seed and records the
test cross-entropy and accuracy after every epoch.

Runs with the same seed share the initial convolution and dense weights and
the batch order, whatever the setting, so settings can be compared seed by
seed (paired differences). The same seed gives the same numbers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .data import Digits
from .net import Adam, Network, softmax_cross_entropy


@dataclass(frozen=True)
class Setting:
    """A pooling configuration: ``pool_range`` and ``weighting``."""

    pool_range: int
    weighting: str = "softmax"

    @property
    def label(self) -> str:
        name = f"pool_range {self.pool_range}"
        if self.pool_range == 1:
            return name + " (max)"
        if self.weighting != "softmax":
            return name + f" {self.weighting}"
        return name


def settings_for(pool_ranges: Sequence[int], raw_pool_ranges: Sequence[int]
                 ) -> List[Setting]:
    """Softmax settings for ``pool_ranges``, then raw ones."""
    return ([Setting(k) for k in pool_ranges]
            + [Setting(k, "raw") for k in raw_pool_ranges])


def evaluate(net: Network, x: np.ndarray, y: np.ndarray,
             batch_size: int = 500) -> Dict[str, float]:
    """Mean cross-entropy and accuracy in evaluation mode."""
    total, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = net.forward(x[start:start + batch_size], train=False)
        labels = y[start:start + batch_size]
        loss, _ = softmax_cross_entropy(logits, labels)
        total += loss * len(labels)
        correct += int((logits.argmax(axis=1) == labels).sum())
    return {"ce": total / len(y), "acc": correct / len(y)}


def train_run(data: Digits, setting: Setting, seed: int, *, epochs: int,
              batch_size: int = 64, lr: float = 2e-3, dense: int = 128,
              channels: Sequence[int] = (16, 16), progress: bool = True,
              dtype: Any = np.float32) -> Dict[str, Any]:
    """Train one network and return its per-epoch record.

    Returns
    -------
    dict
        ``setting`` (label, pool_range, weighting), ``seed``, per-epoch lists
        ``train_ce`` (mean of the batch losses), ``test_ce``, ``test_acc``,
        ``rank_weights`` (per epoch, per pooling layer), and ``seconds``.
    """
    from tqdm.auto import tqdm

    image_size = data.x_train.shape[1]
    net = Network(setting.pool_range, setting.weighting, seed=seed,
                  image_size=image_size, channels=channels, dense=dense,
                  classes=int(max(data.y_train.max(), data.y_test.max())) + 1,
                  dtype=dtype)
    opt = Adam(net.params(), lr=lr)
    order_rng = np.random.default_rng([seed, 2000])
    n = len(data.y_train)
    n_batches = -(-n // batch_size)
    record: Dict[str, Any] = {
        "setting": {"label": setting.label,
                    "pool_range": setting.pool_range,
                    "weighting": setting.weighting},
        "seed": seed, "train_ce": [], "test_ce": [], "test_acc": [],
        "rank_weights": []}
    start = time.perf_counter()
    bar = tqdm(total=epochs * n_batches, desc=f"{setting.label}, seed {seed}",
               unit="batch", disable=not progress, file=sys.stderr,
               leave=True, dynamic_ncols=True)
    try:
        for _ in range(epochs):
            order = order_rng.permutation(n)
            losses = []
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                loss, grads = net.loss_and_grads(data.x_train[idx],
                                                 data.y_train[idx])
                opt.step(grads)
                losses.append(loss)
                bar.update(1)
            test = evaluate(net, data.x_test, data.y_test)
            record["train_ce"].append(float(np.mean(losses)))
            record["test_ce"].append(test["ce"])
            record["test_acc"].append(test["acc"])
            record["rank_weights"].append(
                [w.tolist() for w in net.rank_weights()])
            bar.set_postfix(test_ce=f"{test['ce']:.3f}",
                            test_acc=f"{test['acc']:.3f}")
    finally:
        bar.close()
    record["seconds"] = time.perf_counter() - start
    return record


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else None,
            "min": float(a.min()), "max": float(a.max()),
            "values": a.tolist()}


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per setting: best and final test CE and accuracy over seeds.

    ``best`` is the minimum over epochs of the test cross-entropy (the
    number the seed article reports) and the best test accuracy, each taken
    separately; ``final`` is the last epoch. ``paired_best_ce_vs_max`` is
    the per-seed difference of best test CE from the max-pooling run with
    the same seed (negative: better than max pooling), when there is one.
    """
    by_label: Dict[str, List[Dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(run["setting"]["label"], []).append(run)
    max_best = {run["seed"]: min(run["test_ce"]) for run in runs
                if run["setting"]["pool_range"] == 1}
    summary = []
    for label, group in by_label.items():
        best_ce = [min(r["test_ce"]) for r in group]
        entry = {
            "setting": group[0]["setting"],
            "seeds": [r["seed"] for r in group],
            "best_test_ce": _stats(best_ce),
            "best_epoch": [int(np.argmin(r["test_ce"])) + 1 for r in group],
            "final_test_ce": _stats([r["test_ce"][-1] for r in group]),
            "best_test_acc": _stats([max(r["test_acc"]) for r in group]),
            "final_test_acc": _stats([r["test_acc"][-1] for r in group]),
            "rank_weights_mean": [
                np.mean([r["rank_weights"][-1][layer] for r in group],
                        axis=0).tolist()
                for layer in range(len(group[0]["rank_weights"][-1]))],
            "paired_best_ce_vs_max": None,
        }
        if group[0]["setting"]["pool_range"] != 1 and all(
                r["seed"] in max_best for r in group):
            entry["paired_best_ce_vs_max"] = _stats(
                [min(r["test_ce"]) - max_best[r["seed"]] for r in group])
        summary.append(entry)
    return summary


def _fmt(stats: Optional[Dict[str, Any]], digits: int = 3,
         signed: bool = False) -> str:
    if stats is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{stats['mean']:{sign}.{digits}f}"
    if stats["sd"] is not None:
        text += f" ± {stats['sd']:.{digits}f}"
    return text


def results_table(summary: List[Dict[str, Any]]) -> str:
    """The results as a Markdown table: mean ± sd over seeds."""
    head = ("| setting | best test CE | final test CE | best test acc "
            "| final test acc | best CE minus max pooling (paired) |")
    lines = [head, "|" + "---|" * 6]
    for entry in summary:
        lines.append(
            f"| {entry['setting']['label']} "
            f"| {_fmt(entry['best_test_ce'])} "
            f"| {_fmt(entry['final_test_ce'])} "
            f"| {_fmt(entry['best_test_acc'])} "
            f"| {_fmt(entry['final_test_acc'])} "
            f"| {_fmt(entry['paired_best_ce_vs_max'], signed=True)} |")
    return "\n".join(lines)


def rank_weights_table(summary: List[Dict[str, Any]]) -> str:
    """Learned rank weights (mean over seeds, final epoch) per layer."""
    lines = ["| setting | pool 1 rank weights | pool 2 rank weights |",
             "|---|---|---|"]
    for entry in summary:
        cells = [" ".join(f"{v:.3f}" for v in layer)
                 for layer in entry["rank_weights_mean"]]
        lines.append(f"| {entry['setting']['label']} | {cells[0]} "
                     f"| {cells[1]} |")
    return "\n".join(lines)
