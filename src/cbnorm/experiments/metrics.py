"""Per-epoch metrics: the files a run writes (``metrics.csv``, ``metrics.json``), the progress table,
and the numbers the reproduction tables read back.

Each row holds ``epoch``, ``train_loss``, ``train_acc``, ``train_error``, ``test_loss``, ``test_acc``,
``test_error`` (accuracies and errors as fractions), the learning rate ``lr`` of the epoch and its wall-clock ``seconds``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .data import atomic_write

__all__ = ["COLUMNS", "at_fraction", "format_header", "format_row", "macro_scores", "mean_std", "read_metrics",
           "write_metrics"]

COLUMNS = ["epoch", "train_loss", "train_acc", "train_error", "test_loss", "test_acc", "test_error", "lr", "seconds"]

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
    """The header of a progress table (``(column, header, width, format)`` entries; default: the classification loop's)."""
    header = " | ".join(f"{title:>{width}}" for _, title, width, _ in table or _TABLE)
    return f"{header}\n{'-' * len(header)}"


def format_row(row: dict, table: Optional[Sequence[tuple]] = None) -> str:
    """One row of the progress table; a column missing from ``row`` stays blank."""
    return " | ".join(f"{fmt.format(row[key]) if key in row else '':>{width}}" for key, _, width, fmt in table or _TABLE)


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


def macro_scores(predicted, labels) -> dict:
    """Accuracy and the macro-averaged precision, recall and F1 of class predictions ``(N,)`` against
    ``labels`` ``(N,)``, as scikit-learn's ``precision_recall_fscore_support(average="macro",
    zero_division=0)``: per class ``c`` (every class that occurs in ``labels`` or ``predicted``),
    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2PR / (P + R)``, each 0 where
    its denominator is 0; then the unweighted mean over those classes. Fractions, not percentages."""
    import torch

    predicted, labels = torch.as_tensor(predicted).long().cpu(), torch.as_tensor(labels).long().cpu()
    if predicted.shape != labels.shape or predicted.dim() != 1 or not len(labels):
        raise ValueError(f"macro_scores: expected two non-empty (N,) tensors, got shapes {tuple(predicted.shape)} "
                         f"and {tuple(labels.shape)}")
    classes = torch.cat([predicted, labels]).unique()
    tp = torch.stack([((predicted == c) & (labels == c)).sum() for c in classes]).double()
    predicted_count = torch.stack([(predicted == c).sum() for c in classes]).double()
    true_count = torch.stack([(labels == c).sum() for c in classes]).double()
    precision = torch.where(predicted_count > 0, tp / predicted_count.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_count > 0, tp / true_count.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(tp))
    return {"acc": float((predicted == labels).double().mean()), "precision": float(precision.mean()),
            "recall": float(recall.mean()), "f1": float(f1.mean())}
