"""Per-epoch metrics: the files a run writes (``metrics.csv``, ``metrics.json``), the progress table,
and the numbers the reproduction tables read back.

Each row holds ``epoch``, ``train_loss``, ``train_acc``, ``train_error``, ``test_loss``, ``test_acc``,
``test_error``, the test set's macro-averaged ``test_precision``, ``test_recall`` and ``test_f1`` (all as
fractions; :func:`macro_scores`), the learning rate ``lr`` of the epoch and its wall-clock ``seconds``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .data import atomic_write

__all__ = ["COLUMNS", "at_fraction", "confusion_matrix", "format_header", "format_row", "macro_scores", "mean_std",
           "read_metrics", "write_metrics"]

COLUMNS = ["epoch", "train_loss", "train_acc", "train_error", "test_loss", "test_acc", "test_error", "test_precision",
           "test_recall", "test_f1", "lr", "seconds"]

# The progress table: (column, header, width, format); percentages for the accuracies.
_TABLE = [
    ("epoch", "epoch", 5, "{:d}"),
    ("train_loss", "train loss", 10, "{:.4f}"),
    ("train_acc", "train acc", 9, "{:.2%}"),
    ("test_loss", "test loss", 9, "{:.4f}"),
    ("test_acc", "test acc", 8, "{:.2%}"),
    ("lr", "lr", 8, "{:.2e}"),
    ("seconds", "time", 7, "{:.1f}s"),
]


def format_header(table: Optional[Sequence[tuple]] = None) -> str:
    """The header of a progress table.

    ``table`` holds ``(column, header, width, format)`` entries; default: the classification loop's.
    """
    header = " | ".join(f"{title:>{width}}" for _, title, width, _ in table or _TABLE)
    return f"{header}\n{'-' * len(header)}"


def format_row(row: dict, table: Optional[Sequence[tuple]] = None) -> str:
    """One row of the progress table; a column missing from ``row`` stays blank."""
    cells = (f"{fmt.format(row[key]) if key in row else '':>{width}}" for key, _, width, fmt in table or _TABLE)
    return " | ".join(cells)


def write_metrics(run_dir: Union[str, os.PathLike], config: dict, history: Sequence[dict],
                  columns: Sequence[str] = COLUMNS) -> None:
    """Rewrite ``metrics.csv`` (``columns``; blank where a row has no value) and ``metrics.json`` from the
    whole history, each atomically."""
    run_dir = Path(run_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row.get(key, "") for key in columns} for row in history)
    atomic_write(run_dir / "metrics.csv", lambda f: f.write(text.getvalue().encode()))
    content = json.dumps({"config": config, "history": list(history)}, indent=1)
    atomic_write(run_dir / "metrics.json", lambda f: f.write(content.encode()))


def read_metrics(run_dir: Union[str, os.PathLike]) -> tuple[dict, list[dict]]:
    """``(config, history)`` of a run directory, from its ``metrics.json``."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: expected {path} (written by `cbnorm train`)")
    content = json.loads(path.read_text())
    return content["config"], content["history"]


def at_fraction(history: Sequence[dict], fraction: float, epochs: int, key: str = "test_acc") -> float:
    """``key`` at ``fraction`` of a run of ``epochs`` epochs (NaN if the run has not got there yet)."""
    epoch = max(1, round(fraction * epochs))
    return next((row[key] for row in history if row["epoch"] == epoch), math.nan)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite ``values``; NaNs if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


# -- classification scores ------------------------------------------------------------------------


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Counts ``(num_classes, num_classes)``, int64: entry ``[t, p]`` counts the samples of class ``t``
    predicted as ``p``. Confusion matrices of batches add up to the one of their union."""
    if predicted.shape != target.shape or predicted.dim() != 1:
        raise ValueError(f"expected predicted and target class ids of the same shape (N,), got "
                         f"{tuple(predicted.shape)} and {tuple(target.shape)}")
    for name, ids in (("predicted", predicted), ("target", target)):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"expected integer {name} class ids, got {ids.dtype}")
        if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < num_classes:
            raise ValueError(
                f"expected {name} class ids in [0, {num_classes}), got [{int(ids.min())}, {int(ids.max())}]"
            )
    flat = target.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def macro_scores(confusion: Tensor) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 of a confusion matrix (rows: true classes).

    Per class ``c``: precision ``tp / (tp + fp)``, recall ``tp / (tp + fn)``, F1 ``2 tp / (2 tp + fp + fn)``,
    each 0 where its denominator is 0. The macro averages are the plain means over the classes that
    occur among the targets or the predictions, which is what scikit-learn's
    ``precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)`` computes.
    Macro F1 is the mean of the per-class F1s, not the harmonic mean of macro precision and recall.
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"expected a square confusion matrix (C, C), got shape {tuple(confusion.shape)}")
    counts = confusion.double()
    total = counts.sum()
    if total == 0:
        raise ValueError("expected a confusion matrix of at least one sample, got all zeros")
    tp = counts.diagonal()
    predicted, actual = counts.sum(0), counts.sum(1)
    present = (predicted + actual) > 0
    ratio = lambda num, den: torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))  # noqa: E731
    per_class = {
        "precision": ratio(tp, predicted), "recall": ratio(tp, actual), "f1": ratio(2 * tp, predicted + actual)
    }
    scores = {"accuracy": float(tp.sum() / total)}
    scores.update({name: float(values[present].mean()) for name, values in per_class.items()})
    return scores
