"""``cbnorm demo``: BatchNorm vs SCB-Norm vs UCB-Norm in about a minute on a CPU.

    cbnorm demo                                          # scikit-learn's digits: nothing to download
    cbnorm demo --dataset cifar10 --data-dir DATA        # any supported data set (5,000-image subset)

Trains Table IV's shallow CNN with each layer at conv3 (K = 3; SCB-Norm's clusters from the data
set's Gaussian mixture, UCB-Norm learning its own), prints the comparison and saves
``results/demo-<dataset>/demo.png``. Running it again reuses the finished runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .data import load_dataset
from .plots import curves_figure
from .train import TrainConfig, train

__all__ = ["DEMO_NORMS", "demo"]

DEMO_NORMS = (("BatchNorm", "batchnorm"), ("SCB-Norm", "scb"), ("UCB-Norm", "ucb"))
# (train images, test images, epochs, batch size, torch threads): digits whole, larger data sets a
# subset. 8 x 8 digits make ops so small that a second thread costs more than it brings.
_SIZES = {"digits": (0, 0, 8, 64, 1)}
_DEFAULT_SIZE = (5000, 1000, 3, 128, 0)


def demo(
    dataset: str = "digits",
    *,
    data_dir: Optional[str] = None,
    epochs: Optional[int] = None,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    out: Union[str, os.PathLike] = ".",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, list[dict]]:
    """Train the three models, print a table, save the curves; returns each model's history."""
    default_train, default_test, default_epochs, batch_size, threads = _SIZES.get(dataset, _DEFAULT_SIZE)
    data = load_dataset(dataset, data_dir)
    root = Path(out) / "results" / f"demo-{dataset}"
    histories, seconds = {}, {}
    for label, norm in DEMO_NORMS:
        print(f"\n{label}")
        config = TrainConfig(
            dataset=dataset, data_dir=data_dir, model="shallow_cnn", norm=norm, num_clusters=3,
            train_size=default_train if train_size is None else train_size,
            test_size=default_test if test_size is None else test_size,
            epochs=epochs or default_epochs, batch_size=batch_size, lr=1e-3, seed=seed, device=device,
            threads=threads, out=str(root / "runs" / norm), resume=True, progress=progress,
        )
        histories[label] = train(config, data)
        seconds[label] = sum(row["seconds"] for row in histories[label])
    path = root / "demo.png"
    curves_figure({"": {k: [h] for k, h in histories.items()}}, path, ("test_error", "train_loss"),
                  title=f"Demo: shallow CNN on {dataset}, seed {seed}")
    print(f"\n{'model':<10} | {'final test acc':>14} | {'best test acc':>13} | {'final train loss':>16} | {'time':>7}")
    print("-" * 73)
    for label, history in histories.items():
        final, best = history[-1]["test_acc"], max(row["test_acc"] for row in history)
        print(f"{label:<10} | {final:>14.2%} | {best:>13.2%} | {history[-1]['train_loss']:>16.4f} | {seconds[label]:>6.1f}s")
    print(f"\ncurves: {path}")
    return histories
