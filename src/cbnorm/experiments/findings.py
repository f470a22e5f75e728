r"""The verdicts of results/FINDINGS.md, computed from the committed results, never typed by hand.

    python -m cbnorm.experiments.findings results      # prints the claims table (Markdown)

For each claim of the paper that a committed results folder measures, the per-seed numbers are read
back from its runs' ``metrics.csv``, the layer is paired with the baseline under the same seeds
(:func:`~cbnorm.experiments.stats.paired`), and the interval of the gain is held against the paper's
gain (:func:`~cbnorm.experiments.stats.claim_verdict`): ``confirmed``, ``refuted`` or
``inconclusive (±W)``. A claim the paper makes without a number (faster convergence, a figure) gets
a direction verdict: ``confirmed`` / ``refuted`` when the interval excludes 0, else ``inconclusive (±W)``.
A control, which the paper does not have, gets the tables' ``better`` / ``worse`` /
``no difference detected (±W)``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .metrics import read_metrics
from .reproduce import first_epoch_reaching
from .stats import Interval, claim_verdict, paired, verdict
from .train import best_val_row

__all__ = ["Finding", "findings", "markdown"]


@dataclass
class Finding:
    claim: str  # C1 ... C11
    what: str  # the comparison
    paper: str  # the paper's number
    scale: str  # what we ran
    gain: Optional[Interval]  # ours: the paired gain (points; for errors and FID, baseline minus layer)
    verdict: str
    source: str  # the results folder


def _history(run: Path) -> Optional[list]:
    return read_metrics(run)[1] if (run / "metrics.json").is_file() else None


def _per_seed(folder: Path, name: Callable[[int], str], value: Callable[[list], float], seeds) -> dict:
    out = {}
    for seed in seeds:
        history = _history(folder / "runs" / name(seed))
        if history:
            out[seed] = value(history)
    return out


def _gain(layer: dict, baseline: dict, lower_is_better: bool = False) -> Interval:
    seeds = sorted(set(layer) & set(baseline))
    sign = -1 if lower_is_better else 1
    return paired([sign * layer[s] for s in seeds], [sign * baseline[s] for s in seeds])


def direction_verdict(gain: Interval) -> str:
    """A claim of a gain without a size: ``confirmed``/``refuted`` when the interval excludes 0, else inconclusive."""
    if gain.n < 2 or not math.isfinite(gain.half_width):
        return f"inconclusive (no interval: {gain.n} seed{'s' * (gain.n != 1)})"
    if gain.low > 0:
        return "confirmed"
    if gain.high < 0:
        return "refuted"
    return f"inconclusive (±{gain.half_width:.2f})"


def _final(metric: str, scale: float = 100.0) -> Callable[[list], float]:
    return lambda history: scale * history[-1][metric]


SEEDS = range(10)
MIN_SEEDS = 3
CONVERGE_SCALE = ("2,500 CIFAR-10 training images (2,250 after a 10% validation hold-out) / 1,000 test, 30 epochs "
                  "(270 steps)")
# Table V to a plateau: the 7-seed run holds the 3-seed one's runs (reused as they were) and four seeds more.
CONVERGE_FOLDERS = ("table5-cifar10/converge-7seeds", "table5-cifar10/converge")
# Results that answer a claim at a scale of their own: a verdict against the paper's number holds there.
SMALLER_REGIME = {
    **dict.fromkeys(CONVERGE_FOLDERS, "2,500 CIFAR-10 training images, 30 epochs; the paper: all 50,000, 100 epochs"),
    "superclass-controls-oxford_cnn-cifar10/small": "CIFAR-10, 4 epochs, 45-48% accuracy; the paper: Oxford-IIIT Pet, "
                                                    "epoch 113 of 200",
    "adamatch-mnist-digits/small-4seeds": "digits as target, 192 steps of WRN-10-2; the paper: SVHN, 10 epochs of "
                                          "WRN-28-2",
}
# Committed results that run too short to answer the paper's claim (issue 14): their verdicts are shown
# for what they measured, never as an answer.
TOO_SHORT = {
    "table5-cifar10/small": "40 steps, 27-42% accuracy; the paper's rows are 84-88% after 100 epochs",
    "densenet40-cifar10/small": "80 steps on 1,280 images",
    "densenet100-cifar10/small": "16 steps on 256 images",
    "dcgan-cifar10/small": "2 epochs, FID 310-340 against a floor of 99",
}


def findings(results: Path) -> list[Finding]:
    """Every finding the folders under ``results`` hold (a folder that is absent gives none)."""
    out: list[Finding] = []

    def add(claim, what, paper, scale, gain, verdict, source):
        folder = Path(source).relative_to(results).as_posix()
        if folder in TOO_SHORT:
            verdict = f"not testable here ({TOO_SHORT[folder]}); at this scale: {verdict}"
        elif gain is not None and gain.n < MIN_SEEDS:
            verdict = f"not testable here ({gain.n} seeds, fewer than {MIN_SEEDS}); at this scale: {verdict}"
        elif folder in SMALLER_REGIME and paper != "(no such row)":
            verdict = f"{verdict} at this scale ({SMALLER_REGIME[folder]})"
        out.append(Finding(claim, what, paper, scale, gain, verdict, source))

    # C1: Table V, CIFAR-10, the layers against BN at each learning rate (paper: 100 epochs, full data).
    folder = results / "table5-cifar10" / "small"
    paper = {("scb_base", 0.001): 0.21, ("scb_base", 0.005): 0.76,
             ("scb", 0.001): 0.67, ("scb", 0.005): 1.42, ("ucb", 0.001): 1.07, ("ucb", 0.005): 1.84}
    if folder.is_dir():
        for (norm, lr), claimed in paper.items():
            acc = {n: _per_seed(folder, lambda s, n=n, lr=lr: f"{n}-lr{lr:g}-seed{s}", _final("test_acc"), SEEDS)
                   for n in (norm, "batchnorm")}
            gain = _gain(acc[norm], acc["batchnorm"])
            add("C1", f"{norm} vs BN, lr {lr:g}, test accuracy", f"+{claimed:.2f} (CIFAR-10, 100 epochs)",
                "2,560 train / 1,000 test CIFAR-10 images, 4 epochs (40 steps)", gain,
                claim_verdict(gain, claimed), str(folder))
    # C1 to a plateau (issue 14): Table V's lr-0.005 layers on a fixed subset, several seeds, best-val.
    converge = next((results / name for name in CONVERGE_FOLDERS if (results / name).is_dir()), None)
    if converge is not None:
        folder = converge
        layers = {"scb": ("SCB-Norm", 1.42), "ucb": ("UCB-Norm (moving_average)", 1.84),
                  "ucb-weight": ("UCB-Norm (weight)", 1.84)}
        runs = {key: (lambda s, key=key: f"{key}-lr0.005-seed{s}") for key in ("batchnorm", *layers)}
        for selection, row in (("the best-validation epoch", best_val_row), ("the last epoch", lambda h: h[-1])):
            acc = {key: _per_seed(folder, run, lambda h, row=row: 100 * row(h)["test_acc"], SEEDS)
                   for key, run in runs.items()}
            for key, (label, claimed) in layers.items():
                gain = _gain(acc[key], acc["batchnorm"])
                add("C1", f"{label} vs BN, lr 0.005, test accuracy at {selection}",
                    f"+{claimed:.2f} (CIFAR-10, 100 epochs)", CONVERGE_SCALE, gain, claim_verdict(gain, claimed),
                    str(folder))
        final = _per_seed(folder, runs["batchnorm"], _final("test_acc"), SEEDS)
        if final:
            target = sum(final.values()) / len(final)
            reach = {key: _per_seed(folder, run, lambda h: first_epoch_reaching(h, target / 100) or len(h) + 1, SEEDS)
                     for key, run in runs.items()}
            for key, (label, _) in layers.items():
                gain = _gain(reach[key], reach["batchnorm"], lower_is_better=True)
                add("C1", f"{label} vs BN, epochs to reach BN's mean final test accuracy ({target:.2f}%; never: the "
                    "epochs + 1) (gain = fewer epochs)", "faster convergence (no number)", CONVERGE_SCALE, gain,
                    direction_verdict(gain), str(folder))
    # C4: DenseNet-BC, the layer as the initial layer; the paper: error 38 -> 36 (DenseNet-40), 30 -> 28 (-100).
    for depth, claimed in ((40, 2.0), (100, 2.0)):
        folder = results / f"densenet{depth}-cifar10" / "small"
        if not folder.is_dir():
            continue
        error = {n: _per_seed(folder, lambda s, n=n: f"{n}-lr0.1-seed{s}", _final("test_error"), SEEDS)
                 for n in ("none", "scb_base", "scb", "ucb")}
        for norm in ("scb_base", "scb", "ucb"):
            gain = _gain(error[norm], error["none"], lower_is_better=True)
            add("C4", f"DenseNet-{depth} + {norm} vs plain, test error (gain = lower error)",
                f"-{claimed:.0f} points of error (CIFAR-100, 200 epochs)",
                "CIFAR-10 subset, 4 epochs" + (" (16 steps)" if depth == 100 else ""), gain,
                claim_verdict(gain, claimed), str(folder))
    # C5: DCGAN, lower FID with UCB-Norm (Figure 10 has no number).
    folder = results / "dcgan-cifar10" / "small"
    if folder.is_dir():
        fid = {n: _per_seed(folder, lambda s, n=n: f"{n}-seed{s}", lambda h: h[-1]["fid"], SEEDS)
               for n in ("batchnorm", "ucb")}
        gain = _gain(fid["ucb"], fid["batchnorm"], lower_is_better=True)
        add("C5", "UCB-Norm vs BN in the generator, FID at the last epoch (gain = lower FID)", "curves only",
            "2,560 CIFAR-10 images, 2 epochs, FID of 250 samples (floor 98.6)", gain, direction_verdict(gain),
            str(folder))
    # C6, C7: AdaMatch MNIST -> digits (the paper: MNIST -> SVHN).
    folder = results / "adamatch-mnist-digits" / "small-4seeds"
    if folder.is_dir():
        target = {n: _per_seed(folder, lambda s, n=n: f"{n}-seed{s}", _final("target_acc"), SEEDS)
                  for n in ("none", "scb", "scb_base", "ucb", "dsbn")}
        for norm, claimed in (("scb", 29.62), ("scb_base", 18.02), ("ucb", 8.32)):
            if target[norm]:
                gain = _gain(target[norm], target["none"])
                add("C6", f"AdaMatch + {norm} vs AdaMatch, target accuracy", f"+{claimed:.2f} (SVHN)",
                    f"digits as target, {len(target[norm])} seeds", gain, claim_verdict(gain, claimed), str(folder))
        if target["dsbn"]:
            gain = _gain(target["dsbn"], target["none"])
            add("C6 control", "AdaMatch + domain-specific BatchNorm vs AdaMatch, target accuracy", "(no such row)",
                f"digits as target, {gain.n} seeds", gain, verdict(gain), str(folder))
        if target["dsbn"] and target["scb"]:
            gain = _gain(target["scb"], target["dsbn"])
            add("C6 control", "AdaMatch + scb vs AdaMatch + domain-specific BatchNorm, target accuracy",
                "(no such row)", f"digits as target, {gain.n} seeds", gain, verdict(gain), str(folder))
        for domain in ("source", "target"):
            key = f"grad_var_{domain}_max"
            variance = {n: _per_seed(folder, lambda s, n=n: f"{n}-seed{s}",
                                     lambda h, key=key: math.log10(max(r[key] for r in h)), SEEDS)
                        for n in ("none", "scb")}
            if variance["scb"]:
                gain = _gain(variance["scb"], variance["none"], lower_is_better=True)
                add("C7", f"SCB-Norm vs plain, log10 of the largest {domain} gradient variance (gain = lower)",
                    "Figure 12, curves only", "AdaMatch runs above", gain, direction_verdict(gain), str(folder))
    # C8: Table VII, ViT with SCB-Norm given the superclass: +11.75 accuracy over ViT+BN (CIFAR-100).
    folder = results / "superclass-vit-cifar10" / "small"
    if folder.is_dir():
        acc = {n: _per_seed(folder, lambda s, n=n: f"{n}-lr0.001-seed{s}", _final("test_acc"), SEEDS)
               for n in ("batchnorm", "scb", "scb_base")}
        for norm, claimed in (("scb", 11.75), ("scb_base", 10.24)):
            gain = _gain(acc[norm], acc["batchnorm"])
            add("C8", f"ViT + {norm} (superclass given) vs ViT + BN, test accuracy", f"+{claimed:.2f} (CIFAR-100)",
                "2,500 CIFAR-10 images, 2 superclasses, 6 epochs", gain, claim_verdict(gain, claimed), str(folder))
    # C10: Table VIII, OxfordCNN with SCB-Norm given the superclass: +7.06 at epoch 113 (Oxford-IIIT Pet).
    for name in ("superclass-controls-oxford_cnn-cifar10", "superclass-oxford_cnn-cifar10"):
        folder = results / name / "small"
        if not folder.is_dir():
            continue
        acc = {n: _per_seed(folder, lambda s, n=n: f"{n}-lr0.0001-seed{s}", _final("test_acc"), SEEDS)
               for n in ("none", "scb", "scb_base", "scb-shuffled-superclass", "cluster_bias")}
        seeds = len(acc["none"])
        for norm, claimed in (("scb", 7.06), ("scb_base", 0.97)):
            if acc[norm]:
                gain = _gain(acc[norm], acc["none"])
                add("C10", f"OxfordCNN + {norm} (superclass given) vs plain, test accuracy",
                    f"+{claimed:.2f} (Oxford-IIIT Pet, epoch 113)", f"CIFAR-10, 2 superclasses, {seeds} seeds "
                    f"({name})", gain, claim_verdict(gain, claimed), str(folder))
        for norm, what in (("cluster_bias", "plain + learned superclass bias (label injection)"),
                           ("scb-shuffled-superclass", "SCB-Norm with shuffled superclass ids")):
            if acc[norm]:
                gain = _gain(acc[norm], acc["none"])
                add("C10 control", f"{what} vs plain, test accuracy", "(no such row)",
                    f"CIFAR-10, 2 superclasses, {seeds} seeds", gain, verdict(gain), str(folder))
        if acc["cluster_bias"] and acc["scb"]:
            gain = _gain(acc["scb"], acc["cluster_bias"])
            add("C10 control", "SCB-Norm (superclass given) vs label injection, test accuracy", "(no such row)",
                f"CIFAR-10, 2 superclasses, {seeds} seeds", gain, verdict(gain), str(folder))
    # Claims without a number to compare, or without a run here.
    add_static = lambda claim, what, paper, why: out.append(  # noqa: E731
        Finding(claim, what, paper, "—", None, f"not testable here ({why})", ""))
    if converge is None:
        add_static("C1", "BN, SCB-Norm, UCB-Norm (both updates) to a plateau, lr 0.005, best-val", "+1.42 / +1.84",
                   "the `converge` scale has not run")
    add_static("C2", "activations closer to normal (Figure 2)", "histograms only", "the paper gives no statistic")
    add_static("C3", "t-SNE clusters sharpen (Figures 1, 9)", "pictures only", "the paper gives no statistic")
    add_static("C9", "superclasses separate in PCA (Figure 14)", "a scatter plot", "the paper gives no statistic")
    out.sort(key=lambda f: int(f.claim.split()[0][1:]))
    # C11: the layers' wall time against BatchNorm2d, from the benchmark table (one run, no interval).
    bench = results.parent / "benchmarks" / "latest.md"
    if bench.is_file():
        for line in bench.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if (len(cells) > 6 and cells[0] in ("UCBNorm", "UCBNorm(weight)", "SCBNorm") and cells[2] == "3"
                    and cells[1] == "(256, 128, 8, 8)"):  # the shallow CNN's conv3 (Table V)
                ratio = float(cells[6].rstrip("x"))
                out.append(Finding("C11", f"{cells[0]} (K = 3) {cells[3]} time against BatchNorm2d", "Table I: 0 "
                                   "estimation cost (BN: O(d))", f"{cells[1]}, one benchmark run", None,
                                   f"{'refuted' if ratio > 1 else 'confirmed'} ({ratio:g}x BatchNorm2d; one run, "
                                   "no interval)", str(bench)))
    return out


def markdown(rows: Sequence[Finding]) -> str:
    lines = ["| claim | comparison | paper | what we ran | our gain (95% interval) | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for f in rows:
        ours = "—" if f.gain is None else (f"{f.gain.mean:+.2f} [{f.gain.low:+.2f}, {f.gain.high:+.2f}], "
                                            f"{f.gain.n} seeds" if f.gain.n > 1 else f"{f.gain.mean:+.2f}, 1 seed")
        lines.append(f"| {f.claim} | {f.what} | {f.paper} | {f.scale} | {ours} | {f.verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown(findings(Path(sys.argv[1] if len(sys.argv) > 1 else "results"))), end="")
