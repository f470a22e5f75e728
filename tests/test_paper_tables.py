"""Arithmetic on the paper's printed tables: numbers that no set of predictions can produce together.

Each row below is copied character for character from the paper's text
(``shared/paper/000_3230934d8c786be6.txt``; Table V writes some decimals with a comma);
:func:`test_rows_are_the_papers` checks that wherever that file is present. A printed value ``v``
with ``d`` decimals stands for anything in ``v ± 0.5 * 10^-d``; every bound below allows for it.
results/FINDINGS.md states what these tests find.
"""

import os
from pathlib import Path

import pytest

_NAME = "shared/paper/000_3230934d8c786be6.txt"
PAPER = next((p for p in (Path(os.environ.get("CBNORM_PAPER", _NAME)), Path(__file__).parents[1] / _NAME,
                          Path(__file__).parents[2] / _NAME, Path(__file__).parents[3] / _NAME) if p.is_file()),
             Path(_NAME))

# Table V: model, learning rate, test accuracy at 25/50/75/100 epochs.
TABLE5 = {
    "CIFAR-10": [
        "BN-1 0.001 84,34 86,49 86,41 86,90", "BN-2 0.005 83.44 84.39 85.65 85.65",
        "MN-1 0.001 84,45 86,60 86,6 87,07", "MN-2 0.005 83.47 84.60 85.68 85.80",
        "SCB-Norm-base-1 0.001 85,9 86,93 87,09 87,11", "SCB-Norm-base-2 0.005 83.65 85.09 86.28 86.41",
        "SCB-Norm-1 0.001 84.68 86.61 87.38 87.57", "SCB-Norm-2 0.005 84.85 86.54 87.07 87.07",
        "UCB-Norm-1 0.001 85.15 85.80 87.97 87.97", "UCB-Norm-2 0.005 86.04 86.04 87.49 87.49",
    ],
    "CIFAR-100": [
        "BN-1 0.001 57.41 59.74 59.82 59.82", "BN-2 0.005 55.64 56.97 56.29 56.29",
        "MN-1 0.001 56,90 59,80 59,80 60,10", "MN-2 0.005 55.80 55.80 56.56 57.09",
        "SCB-Norm-base-1 0.001 57,74 61,01 61,01 61,01", "SCB-Norm-base-2 0.005 55.47 57.06 57.06 57.60",
        "SCB-Norm-1 0.001 58.50 59.25 59.65 61.02", "SCB-Norm-2 0.005 55.81 57.68 57.68 57.68",
        "UCB-Norm-1 0.001 59.44 61.10 61.10 61.10", "UCB-Norm-2 0.005 58.31 60.29 60.29 60.29",
    ],
    "Tiny ImageNet": [
        "BN-1 0.001 37.17 37.17 37.17 37.17", "BN-2 0.005 34.11 34.11 34.11 34.11",
        "MN-1 0.001 38,18 38,17 38,5 38,5", "MN-2 0.005 34.56 34.99 35.12 35.27",
        "SCB-Norm-base-1 0.001 38.53 40.08 40.08 40.08", "SCB-Norm-base-2 0.005 34.78 35.44 35.44 36.71",
        "SCB-Norm-1 0.001 37.72 39.45 40.29 40.29", "SCB-Norm-2 0.005 37.97 38.31 38.31 38.31",
        "UCB-Norm-1 0.001 39.71 39.71 39.71 39.71", "UCB-Norm-2 0.005 35.78 37.03 37.03 37.03",
    ],
}
# Tables VI-VIII: accuracy, precision, recall, F1-score (%).
TABLE6 = {
    "MNIST": ["AdaMatch 97.36 87.33 79.39 78.09", "AdaMatch+SCB-Norm-base 99.26 99.20 99.32 99.26",
              "AdaMatch+SCB-Norm 98.92 98.93 98.92 98.92", "AdaMatch+UCB-Norm 98.9 98.5 98.90 98.95"],
    "SVHN": ["AdaMatch 25.08 31.64 20.46 24.73", "AdaMatch+SCB-Norm-base 43.10 53.83 43.10 47.46",
             "AdaMatch+SCB-Norm 54.70 59.74 54.70 54.55", "AdaMatch+UCB-Norm 33.4 43.83 40.28 42.87"],
}
TABLE7 = ["ViT+BN 55.63 8.96 90.09 54.24", "ViT+SCB-Norm-base 65.87 23.36 98.53 65.69",
          "ViT+SCB-Norm 67.38 22.93 99.00 67.13"]
TABLE8 = ["OxfordCNN base Epoch 80 63.12 50.23 80.11 69.23", "Epoch 113 66.55 53.11 84.2 72.15",
          "OxfordCNN+SCB-Norm-base Epoch 80 64.90 52.34 83.10 73.11", "Epoch 113 67.52 55.12 86.13 75.90",
          "OxfordCNN+SCB-Norm Epoch 80 67.92 54.24 89.11 80.12", "Epoch 113 73.61 69.12 92.34 90.11"]

# The MNIST test set's images per class (digits 0-9), as in the official t10k labels.
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


class Printed:
    """A printed number: its value and the half-unit of its last decimal."""

    def __init__(self, text: str):
        text = text.replace(",", ".")
        self.value = float(text)
        self.slack = 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0)

    @property
    def low(self):
        return self.value - self.slack

    @property
    def high(self):
        return self.value + self.slack


def numbers(row: str, count: int = 4) -> list:
    """The last ``count`` numbers of a printed row."""
    return [Printed(t) for t in row.split()[-count:]]


def all_rows():
    yield from (row for rows in TABLE5.values() for row in rows)
    yield from (row for rows in TABLE6.values() for row in rows)
    yield from TABLE7
    yield from TABLE8


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is not here")
def test_rows_are_the_papers():
    lines = set(PAPER.read_text().splitlines())
    assert [row for row in all_rows() if row not in lines] == []


def f1_above_mean(row: str) -> bool:
    """Whether the printed macro F1 exceeds the mean of the printed macro precision and recall by more than
    rounding allows. Each class's F1 is a harmonic mean, at most the arithmetic mean of its precision and
    recall, so macro F1 <= (macro precision + macro recall) / 2 whatever the predictions."""
    _, precision, recall, f1 = numbers(row)
    return f1.low > (precision.high + recall.high) / 2


def test_macro_f1_above_the_mean_of_precision_and_recall():
    flagged = [row for row in all_rows() if row not in sum(TABLE5.values(), []) and f1_above_mean(row)]
    assert flagged == [TABLE6["MNIST"][3], TABLE6["SVHN"][3], *TABLE7, *TABLE8]
    assert (43.83 + 40.28) / 2 < 42.87  # Table VI's UCB-Norm on SVHN: the mean is 42.06


def min_macro_recall(accuracy: Printed, counts) -> float:
    """The smallest macro recall (%) that any predictions with this printed accuracy can have: the most
    errors the accuracy allows, all in the smallest classes (each error costs 1/(K n_c) of macro recall)."""
    errors = int((1 - accuracy.low / 100) * sum(counts))  # the most whole errors consistent with the printed value
    lost = 0.0
    for n in sorted(counts):
        taken = min(errors, n)
        lost += taken / n
        errors -= taken
    return 100 * (1 - lost / len(counts))


def test_mnist_recall_impossible_at_that_accuracy():
    accuracy, _, recall, _ = numbers(TABLE6["MNIST"][0])
    bound = min_macro_recall(accuracy, MNIST_TEST_COUNTS)
    assert bound == pytest.approx(97.04, abs=0.01)
    assert recall.high < bound - 17  # 79.39 printed, at least 97.04 possible


def test_mnist_counts(data_root):
    from cbnorm.experiments.data import load_dataset

    labels = load_dataset("mnist", str(data_root)).test.labels
    assert tuple(labels.bincount().tolist()) == MNIST_TEST_COUNTS


def test_cifar100_recall_is_accuracy():
    """CIFAR-100's test set has 100 images per class, so macro recall is the accuracy; the table's are 31.6-34.5
    points above it."""
    gaps = []
    for row in TABLE7:
        accuracy, _, recall, _ = numbers(row)
        assert recall.low - accuracy.high > 30
        gaps.append(recall.value - accuracy.value)
    assert [round(g, 2) for g in gaps] == [34.46, 32.66, 31.62]


def table5_rows(dataset):
    return {row.split()[0]: [p.value for p in numbers(row)] for row in TABLE5[dataset]}


def test_table5_rows_constant_while_others_decrease():
    constant = {(d, m) for d in TABLE5 for m, v in table5_rows(d).items() if len(set(v)) == 1}
    decreasing = {(d, m) for d in TABLE5 for m, v in table5_rows(d).items() if any(b < a for a, b in zip(v, v[1:]))}
    assert constant == {("Tiny ImageNet", "BN-1"), ("Tiny ImageNet", "BN-2"), ("Tiny ImageNet", "UCB-Norm-1")}
    assert decreasing == {("CIFAR-10", "BN-1"), ("CIFAR-100", "BN-2"), ("Tiny ImageNet", "MN-1")}


def mean_gain(dataset: str, lr_tag: str) -> float:
    """The mean over SCB-Norm-base, SCB-Norm and UCB-Norm of their 100-epoch accuracy minus BN's, in points."""
    rows = table5_rows(dataset)
    cb = [rows[f"{m}-{lr_tag}"][-1] for m in ("SCB-Norm-base", "SCB-Norm", "UCB-Norm")]
    return sum(cb) / 3 - rows[f"BN-{lr_tag}"][-1]


def test_text_gains_exceed_the_tables():
    """The text: "an average accuracy improvement of 2% on CIFAR-10, 3% on CIFAR-100, and 4% on Tiny ImageNet"."""
    gains = {d: (round(mean_gain(d, "1"), 2), round(mean_gain(d, "2"), 2)) for d in TABLE5}
    assert gains == {"CIFAR-10": (0.65, 1.34), "CIFAR-100": (1.22, 2.23), "Tiny ImageNet": (2.86, 3.24)}
    for dataset, claimed in (("CIFAR-10", 2), ("CIFAR-100", 3), ("Tiny ImageNet", 4)):
        assert max(gains[dataset]) < claimed
    best_cifar10 = max(table5_rows("CIFAR-10")[f"{m}-{t}"][-1] - table5_rows("CIFAR-10")[f"BN-{t}"][-1]
                       for m in ("SCB-Norm-base", "SCB-Norm", "UCB-Norm", "MN") for t in "12")
    assert round(best_cifar10, 2) == 1.84  # no row of CIFAR-10 gains 2 points on BN
