"""``sortpool demo``: train the NumPy CNN with each pooling setting.

Trains :class:`sortpool_ref.demo.net.Network` on the cluttered-digits set of
:mod:`sortpool_ref.demo.data` for every setting (pool_range 1, 2, 3, 4 with
softmax weights and pool_range 3 with raw weights by default) and every
seed, prints a table of best and final test cross-entropy and accuracy
(mean ± sd over seeds), and writes ``results.json``, ``results.md`` and
``demo.png`` into the output folder, whose path it prints at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

DEFAULTS = dict(epochs=4, seeds=3, train_samples=3600, test_samples=600)
QUICK = dict(epochs=3, seeds=1, train_samples=800, test_samples=300)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sortpool demo",
        description="Train a small NumPy CNN whose pooling layers are "
                    "sortpool_ref.SortPool2d on a cluttered-digits set built "
                    "from scikit-learn's digits, for several pool_range "
                    "settings and seeds; print a table of test "
                    "cross-entropy and accuracy and save a plot and a JSON "
                    "of all numbers.")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke check in about a minute: {QUICK['epochs']} epochs, "
             f"{QUICK['train_samples']} train / {QUICK['test_samples']} "
             f"test images, 1 seed (explicit options still win)")
    parser.add_argument(
        "--epochs", type=int,
        help=f"training epochs per run (default {DEFAULTS['epochs']})")
    parser.add_argument(
        "--seeds", type=int,
        help=f"number of seeds, run as seeds 0..N-1 (default "
             f"{DEFAULTS['seeds']})")
    parser.add_argument(
        "--pool-ranges", type=int, nargs="+", default=[1, 2, 3, 4],
        metavar="K", help="pool_range values with softmax weights "
                          "(default 1 2 3 4)")
    parser.add_argument(
        "--raw-pool-ranges", type=int, nargs="*", default=[3], metavar="K",
        help="pool_range values also run with raw weights (default 3; "
             "give none to skip)")
    parser.add_argument(
        "--out", default="sortpool-demo",
        help="output folder, created if needed (default ./sortpool-demo)")
    parser.add_argument(
        "--train-samples", type=int,
        help=f"rendered training images (default "
             f"{DEFAULTS['train_samples']})")
    parser.add_argument(
        "--test-samples", type=int,
        help=f"rendered test images (default {DEFAULTS['test_samples']})")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="training batch size (default 64)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate (default 0.002)")
    parser.add_argument("--dense", type=int, default=128,
                        help="width of the hidden dense layer (default 128)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the data set (default 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars")
    return parser


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """The configuration: explicit options, else --quick, else defaults."""
    base = QUICK if args.quick else DEFAULTS
    config = {key: getattr(args, key) if getattr(args, key) is not None
              else value for key, value in base.items()}
    config.update(pool_ranges=list(args.pool_ranges),
                  raw_pool_ranges=list(args.raw_pool_ranges),
                  batch_size=args.batch_size, lr=args.lr, dense=args.dense,
                  data_seed=args.data_seed, quick=bool(args.quick))
    return config


def check_config(parser: argparse.ArgumentParser,
                 config: Dict[str, Any]) -> None:
    for key in ("epochs", "seeds", "train_samples", "test_samples",
                "batch_size", "dense"):
        if config[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive "
                         f"int, got {config[key]}")
    for k in config["pool_ranges"] + config["raw_pool_ranges"]:
        if not 1 <= k <= 4:
            parser.error(f"pool ranges must be in 1..4 for 2x2 windows, "
                         f"got {k}")
    if not config["pool_ranges"] and not config["raw_pool_ranges"]:
        parser.error("no setting to run")
    if config["lr"] <= 0:
        parser.error(f"--lr must be positive, got {config['lr']}")


def save_plot(path: str, runs: List[Dict[str, Any]],
              summary: List[Dict[str, Any]]) -> None:
    """Test CE per epoch (mean over seeds, band = min..max) and the learned
    rank weights of each pooling layer (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6),
                             gridspec_kw=dict(width_ratios=[1.3, 1, 1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, entry in enumerate(summary):
        label = entry["setting"]["label"]
        curves = np.array([r["test_ce"] for r in runs
                           if r["setting"]["label"] == label])
        epochs = np.arange(1, curves.shape[1] + 1)
        style = "--" if entry["setting"]["weighting"] == "raw" else "-"
        color = colors[i % len(colors)]
        ax.plot(epochs, curves.mean(axis=0), style, color=color,
                label=label, marker="o", markersize=3)
        if len(curves) > 1:
            ax.fill_between(epochs, curves.min(axis=0), curves.max(axis=0),
                            color=color, alpha=0.15, linewidth=0)
    n_seeds = len(summary[0]["seeds"])
    ax.set_title(f"test cross-entropy (mean of {n_seeds} seed"
                 f"{'s' if n_seeds > 1 else ''}"
                 f"{', band min..max' if n_seeds > 1 else ''})",
                 fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for layer in range(2):
        ax = axes[layer + 1]
        shown = [(i, e) for i, e in enumerate(summary)
                 if e["setting"]["pool_range"] > 1]
        width = 0.8 / max(len(shown), 1)
        for j, (i, entry) in enumerate(shown):
            weights = entry["rank_weights_mean"][layer]
            ranks = np.arange(1, len(weights) + 1)
            ax.bar(ranks + (j - (len(shown) - 1) / 2) * width, weights,
                   width, color=colors[i % len(colors)],
                   hatch="//" if entry["setting"]["weighting"] == "raw"
                   else None, label=entry["setting"]["label"])
        ax.set_title(f"pool {layer + 1}: learned rank weights (mean)",
                     fontsize=10)
        ax.set_ylabel("softmax(w); raw: w", fontsize=9)
        ax.set_xlabel("rank (1 = largest value)")
        ax.set_xticks([1, 2, 3, 4])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = resolve(args)
    check_config(parser, config)

    from .. import __version__
    from .data import cluttered_digits
    from .train import (rank_weights_table, results_table, settings_for,
                        summarize, train_run)

    start = time.perf_counter()
    data = cluttered_digits(config["train_samples"], config["test_samples"],
                            config["data_seed"])
    settings = settings_for(config["pool_ranges"], config["raw_pool_ranges"])
    seeds = list(range(config["seeds"]))
    print(f"sortpool demo: {data.describe()}; {len(settings)} settings x "
          f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} x "
          f"{config['epochs']} epochs, batch {config['batch_size']}, "
          f"Adam lr {config['lr']:g}", flush=True)
    runs = []
    for seed in seeds:
        for setting in settings:
            runs.append(train_run(
                data, setting, seed, epochs=config["epochs"],
                batch_size=config["batch_size"], lr=config["lr"],
                dense=config["dense"], progress=not args.no_progress))
    summary = summarize(runs)
    table = results_table(summary)
    weights = rank_weights_table(summary)
    elapsed = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    result = {
        "config": config, "data": data.describe(),
        "versions": {"sortpool_ref": __version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "wall_seconds": elapsed, "summary": summary, "runs": runs}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n\n" + weights + "\n")
    save_plot(os.path.join(out, "demo.png"), runs, summary)

    spread = "mean ± sd over seeds" if len(seeds) > 1 else "one seed"
    print(f"\nTest cross-entropy and accuracy ({spread}; best = best epoch, "
          f"final = epoch {config['epochs']}):\n")
    print(table)
    print("\nLearned rank weights (final epoch, mean over seeds):\n")
    print(weights)
    print(f"\nDone in {elapsed:.0f} s. Results (results.json, results.md, "
          f"demo.png) are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
