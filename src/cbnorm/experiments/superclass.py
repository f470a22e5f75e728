"""Reproduce IV-F: superclasses as SCB-Norm's prior clusters (Tables VII and VIII, Figures 13 and 14).

    cbnorm reproduce superclass --model vit --scale smoke          # CI: well under a minute on CPU
    cbnorm reproduce superclass --model vit --scale small --threads 1          # about 25 minutes on 2 CPU cores
    cbnorm reproduce superclass --model oxford_cnn --scale small --threads 1   # about 15 minutes on 2 CPU cores
    cbnorm reproduce superclass --model vit --scale paper          # the paper's protocol, for a GPU

Each sample's superclass is its cluster: CIFAR-100's 20 coarse labels, Oxford-IIIT Pet's cat and dog,
or, where neither data set is present, CIFAR-10's vehicle and animal (see ``data.CIFAR10_SUPERCLASSES``).
Table VII puts BN, SCB-Norm-base or SCB-Norm as the initial layer of the Keras example's ViT
(``models/vit.py``); Table VIII puts SCB-Norm-base or SCB-Norm before the last linear layer of
OxfordCNN (``models/oxford_cnn.py``), against the plain network. Written to
``<--out, default .>/results/superclass-<model>-<dataset>/<scale>/``:

    runs/<norm>-lr<lr>-seed<seed>/  each run: metrics.csv/.json (test accuracy and macro precision,
                                    recall and F1 every epoch), config.json, checkpoint.pt
    table.md                        ours beside the paper's Table VII / VIII, and the command
    summary.json                    every number of the table
    figure13.png / curves.png       train and test loss and test accuracy per epoch (Figure 13)
    figure14-<norm>.png / pca-...   PCA of the final model's outputs on test images, by superclass (Figure 14)

SCB layers get each test image's true superclass, which is how we read the paper (the layer needs a
cluster and the paper names no other source); that hands the model part of the label that BN never
sees. So the table also evaluates the same final weights with the superclass withheld, under each of
the layer's unknown-cluster rules (SPEC.md). Numbers are at fixed epochs, never chosen on the test
set: the paper's early stopping needs a validation split it does not describe. Running the command
again resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

import cbnorm

from .data import Dataset, Loader, available, load_dataset
from .metrics import mean_std
from .plots import _load_run, curves_figure, pca_figure
from .reproduce import Scale, _run_name
from .runs import clustered, command_line, resolve_device, results_folder, run_each, write_results
from .train import TrainConfig, evaluate, train

__all__ = ["EXPERIMENTS", "SCALES", "SuperclassExperiment", "default_dataset", "evaluate_unknown",
           "reproduce_superclass", "run_outputs"]

SCORES = ("test_acc", "test_precision", "test_recall", "test_f1")
PCA_POINTS = 500  # test images in Figure 14 (a fixed random batch, the same for every model)


@dataclass(frozen=True)
class SuperclassExperiment:
    """One of IV-F's two experiments: the models compared, the training protocol, the paper's numbers."""

    name: str
    title: str
    model: str
    norms: tuple[tuple[str, str], ...]  # (label, registry name); "none": the plain network
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    paper_epochs: int  # the paper's training length (its rows at earlier epochs map to the same fractions of ours)
    paper_rows: tuple[Optional[int], ...]  # the paper's epochs reported; None: its final (early-stopped) model
    paper: dict  # (norm, paper epoch or None) -> (accuracy, precision, recall, F1) in %
    paper_data: str
    figures: tuple[str, str]  # file names of the curves and of the PCA figures
    recall: str = ""  # what the paper's test set makes of macro recall


VIT = SuperclassExperiment(
    "superclass-vit", "Table VII: ViT (Keras example) with BN, SCB-Norm-base or SCB-Norm as the initial layer",
    "vit", (("ViT+BN", "batchnorm"), ("ViT+SCB-Norm-base", "scb_base"), ("ViT+SCB-Norm", "scb")),
    "adamw", 1e-3, 1e-4, 256, 100, (None,),
    {("batchnorm", None): (55.63, 8.96, 90.09, 54.24), ("scb_base", None): (65.87, 23.36, 98.53, 65.69),
     ("scb", None): (67.38, 22.93, 99.00, 67.13)},
    "CIFAR-100, 100 classes in 20 superclasses, early stopping", ("figure13", "figure14"),
    "CIFAR-100's test set has 100 images of every class, so its macro recall is the accuracy",
)
OXFORD_CNN = SuperclassExperiment(
    "superclass-oxford_cnn", "Table VIII: OxfordCNN, SCB-Norm-base or SCB-Norm before the final linear layer",
    "oxford_cnn", (("OxfordCNN base", "none"), ("OxfordCNN+SCB-Norm-base", "scb_base"), ("OxfordCNN+SCB-Norm", "scb")),
    "adam", 1e-4, 0.0, 32, 200, (80, 113),
    {("none", 80): (63.12, 50.23, 80.11, 69.23), ("none", 113): (66.55, 53.11, 84.2, 72.15),
     ("scb_base", 80): (64.90, 52.34, 83.10, 73.11), ("scb_base", 113): (67.52, 55.12, 86.13, 75.90),
     ("scb", 80): (67.92, 54.24, 89.11, 80.12), ("scb", 113): (73.61, 69.12, 92.34, 90.11)},
    "Oxford-IIIT Pet, 37 breeds in 2 superclasses, epochs 80 and 113 of 200", ("curves", "pca"),
    "Oxford-IIIT Pet's test split has about as many images of every breed, so its macro recall is about the accuracy",
)
EXPERIMENTS = {"vit": VIT, "oxford_cnn": OXFORD_CNN}

# `small` is sized from epochs timed with --threads 1 on 2 shared CPU cores (ViT: 65 s for 5,000 + 1,000
# images; OxfordCNN: 55 s for 20,000 + 10,000) to take about 20-25 minutes for all its runs (docs/reproducing.md,
# "Superclasses as prior clusters"); `smoke` is CI's; `paper` is the paper's protocol.
SCALES: dict[str, dict[str, Scale]] = {
    "vit": {
        "smoke": Scale("smoke", 128, 128, 2, (0,)),
        "small": Scale("small", 2500, 1000, 6, (0, 1)),
        "paper": Scale("paper", 0, 0, 100, (0,)),
    },
    "oxford_cnn": {
        "smoke": Scale("smoke", 128, 128, 2, (0,)),
        "small": Scale("small", 8000, 4000, 6, (0, 1)),
        "paper": Scale("paper", 0, 0, 200, (0,)),
    },
}

# What SCB layers do when the test image's superclass is withheld: (label, rule per layer type).
UNKNOWN_RULES = {
    "scb": (("unknown: Eq. 12", "paper"), ("unknown: posterior", "posterior"), ("unknown: MAP", "map")),
    "scb_base": (("unknown: uniform code", "uniform"),),
}


def default_dataset(model: str, data_dir: Optional[str] = None) -> str:
    """The paper's data set for ``model`` when the data root has it (CIFAR-100 for the ViT, Oxford-IIIT
    Pet for OxfordCNN), else CIFAR-10 with its two superclasses."""
    paper = "cifar100" if model == "vit" else "oxford-pet"
    return paper if available(paper, data_dir) else "cifar10"


def evaluate_unknown(run_dir: Union[str, os.PathLike], rule: str, data: Optional[Dataset] = None,
                     device: str = "auto") -> dict:
    """Test metrics of a finished run's final model with the test images' clusters withheld.

    ``rule`` is SCB-Norm's unknown-cluster rule (``"paper"``, ``"posterior"`` or ``"map"``) or
    ``"uniform"`` for SCB-Norm-base (its uniform soft assignment, the only rule it has).
    """
    rules = (*cbnorm.functional.UNKNOWN_RULES, "uniform")
    if rule not in rules:
        raise ValueError(f"expected an unknown-cluster rule in {rules}, got {rule!r}")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    run = _load_run(run_dir, data=data)
    run.model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    for module in run.model.modules():
        if isinstance(module, cbnorm.SCBNorm):
            module.unknown = rule
    loader = Loader(run.test, 1000, run.mean, run.std, device=device)  # no cluster ids
    return evaluate(run.model.to(device), loader, device)


@torch.no_grad()
def run_outputs(run_dir: Union[str, os.PathLike], points: int = PCA_POINTS, data: Optional[Dataset] = None):
    """``(outputs, superclasses)`` of a run's final model on a fixed random batch of ``points`` test
    images (seed 0; SCB layers get their superclasses as in training)."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir, data=data)
    run.model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    index = torch.randperm(len(run.test), generator=torch.Generator().manual_seed(0))[:points]
    split = run.test.subset(index)
    ids = None if run.test_ids is None else run.test_ids[index]
    images, _, ids = next(Loader(split, len(split), run.mean, run.std, cluster_ids=ids).epoch())
    run.model.eval()
    with clustered(ids):
        return run.model(images), split.coarse_labels


def _report_epochs(experiment: SuperclassExperiment, epochs: int) -> list[tuple[int, Union[int, str, None]]]:
    """``(our epoch, the paper's row)``: each epoch the paper reports, at the same fraction of our
    training (``None``: its final model, our last epoch), then our last epoch if not already there."""
    rows = [(epochs if e is None else max(1, round(e * epochs / experiment.paper_epochs)), e)
            for e in experiment.paper_rows]
    return rows if any(ours == epochs for ours, _ in rows) else rows + [(epochs, "last")]


def _fmt(mean: float, std: float, runs: int = 1) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if runs > 1 else f"{mean:.2f}"


def _paper_notes(experiment: SuperclassExperiment) -> str:
    """What the paper's numbers themselves say about how they were averaged."""
    gaps = [recall - accuracy for accuracy, _, recall, _ in experiment.paper.values()]
    over = sum(f1 > 2 * precision for _, precision, _, f1 in experiment.paper.values())
    notes = f"On the paper's numbers: {experiment.recall}; " if experiment.recall else "On the paper's numbers: "
    notes += f"the paper's recall is {min(gaps):.1f} to {max(gaps):.1f} points above its accuracy."
    if over:
        notes += (f" Macro F1 is at most twice macro precision (each class's F1 is at most twice its precision); "
                  f"the paper's F1 breaks that bound in {over} of its {len(experiment.paper)} rows.")
    return notes + " The paper does not say how it averaged; ours are scikit-learn's macro averages."


def _table(experiment: SuperclassExperiment, data: Dataset, scale: Scale, results: dict) -> str:
    size = lambda n: "all" if n == 0 else str(n)  # noqa: E731
    coarse = data.coarse_classes
    coarse = ", ".join(coarse) if len(coarse) <= 4 else f"{len(coarse)} superclasses"
    decay = f", weight decay {experiment.weight_decay:g}" if experiment.weight_decay else ""
    lines = [
        f"# {experiment.title} — {data.name}, scale `{scale.name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: {data.name}, {data.num_classes} classes; SCB-Norm's clusters are the superclasses ({coarse}). "
        f"Scale: {size(scale.train_size)} train / {size(scale.test_size)} test images (fixed random subsets), "
        f"{scale.epochs} epochs, seeds {', '.join(map(str, results['seeds']))}. Protocol: {experiment.optimizer} "
        f"lr {experiment.lr:g}{decay}, batch {experiment.batch_size}, random crop and horizontal flip. "
        f"Torch {torch.__version__}, {platform.machine()}, {results['device']}; "
        f"{results['train_seconds'] / 60:.1f} min of training and evaluation, summed over the runs.",
        "",
        "Ours: test accuracy and macro-averaged precision, recall and F1 (%), mean ± std over seeds, at fixed "
        "epochs (no early stopping). *Test superclass*: what SCB layers get for a test image: *given*, its "
        "true superclass (the paper's setting as we read it; this hands the model part of the label), or "
        "*unknown*, the same final weights with the superclass withheld and the layer's unknown-cluster rule. "
        f"Paper: {experiment.paper_data} (copied from the paper; a different data set where ours is not the same).",
        "",
        "| model | epoch | test superclass | accuracy | precision | recall | F1 | paper epoch | paper accuracy | "
        "paper precision | paper recall | paper F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        ours = [_fmt(m, s, row["runs"]) for m, s in row["ours"]] if row["status"] == "ok" else [row["status"], "", "", ""]
        paper = row["paper"] or (math.nan,) * 4
        paper_cells = ["—" if not math.isfinite(p) else f"{p:.2f}" for p in paper]
        paper_epoch = {None: "final", "last": "—"}.get(row["paper_epoch"], str(row["paper_epoch"]))
        lines.append(f"| {row['label']} | {row['epoch']} | {row['superclass']} | " + " | ".join(ours) +
                     f" | {paper_epoch} | " + " | ".join(paper_cells) + " |")
    lines += ["", _paper_notes(experiment)]
    return "\n".join(lines) + "\n"


def reproduce_superclass(
    model: Union[str, SuperclassExperiment],
    dataset: str,
    scale: Union[str, Scale],
    *,
    out: Union[str, os.PathLike] = ".",
    data_dir: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    device: str = "auto",
    amp: bool = False,
    threads: int = 0,
    progress: bool = True,
    command: Optional[str] = None,
    data: Optional[Dataset] = None,
) -> Path:
    """Run (or resume) every run of the superclass experiment of ``model`` at ``scale`` and write its
    table and figures. Returns the results directory."""
    experiment = EXPERIMENTS[model] if isinstance(model, str) else model
    scale = SCALES[experiment.model][scale] if isinstance(scale, str) else scale
    seeds = tuple(seeds) if seeds else scale.seeds
    command = command_line(command)
    data = data if data is not None else load_dataset(dataset, data_dir)
    if data.train.coarse_labels is None:
        raise ValueError(f"the superclass experiment needs a data set with superclasses (cifar100, cifar10, "
                         f"oxford-pet), got {data.name}")
    root = results_folder(out, f"{experiment.name}-{data.name}", scale.name)

    def start(key):
        norm, seed = key
        config = TrainConfig(
            dataset=data.name, data_dir=data_dir, train_size=scale.train_size, test_size=scale.test_size,
            model=experiment.model, norm=norm, clusters="superclass", optimizer=experiment.optimizer, lr=experiment.lr,
            weight_decay=experiment.weight_decay, epochs=scale.epochs, batch_size=experiment.batch_size, seed=seed,
            device=device, amp=amp, threads=threads, out=str(root / "runs" / _run_name(norm, experiment.lr, seed)),
            resume=True, progress=progress,
        )
        return train(config, data)

    runs = [((norm, seed), f"{label}, seed {seed}") for label, norm in experiment.norms for seed in seeds]
    histories, failures = run_each(runs, start)

    rows = []
    for label, norm in experiment.norms:
        done = [histories[(norm, s)] for s in seeds if (norm, s) in histories]
        failed = [failures[(norm, s)] for s in seeds if (norm, s) in failures]
        status = f"failed: {failed[0]}" if failed else "ok"
        given = "given" if norm in UNKNOWN_RULES else "—"
        for epoch, paper_epoch in _report_epochs(experiment, scale.epochs):
            ours = [mean_std([100 * h[epoch - 1][key] for h in done if len(h) >= epoch]) for key in SCORES]
            rows.append({"label": label, "norm": norm, "epoch": epoch, "superclass": given, "status": status,
                         "runs": len(done), "ours": ours, "paper_epoch": paper_epoch,
                         "paper": experiment.paper.get((norm, paper_epoch))})
        for rule_label, rule in UNKNOWN_RULES.get(norm, ()):
            if failed:
                continue
            scores = [evaluate_unknown(root / "runs" / _run_name(norm, experiment.lr, s), rule, data, device)
                      for s in seeds]
            rows.append({"label": label, "norm": norm, "epoch": scale.epochs, "superclass": rule_label, "status": "ok",
                         "runs": len(scores), "ours": [mean_std([100 * s[key] for s in scores]) for key in SCORES],
                         "paper_epoch": "last", "paper": None})

    results = {"experiment": experiment.name, "dataset": data.name, "scale": asdict(scale), "seeds": list(seeds),
               "command": command, "device": str(resolve_device(device)), "rows": rows,
               "train_seconds": sum(row["seconds"] for h in histories.values() for row in h)}
    return write_results(root, _table(experiment, data, scale, results), results,
                         lambda: _figures(experiment, scale.name, seeds, root, histories, data), failures)


def superclass_curves(experiment: SuperclassExperiment, dataset: str, scale: str, root: Path, lines: dict) -> None:
    """Figure 13 (or OxfordCNN's ``curves.png``) in ``root``, from each label's histories (one a seed)."""
    curves = experiment.figures[0]
    lines = {label: h for label, h in lines.items() if h}
    if lines:
        name = "Figure 13" if curves == "figure13" else "Curves"
        curves_figure({"": lines}, root / f"{curves}.png", ("train_loss", "test_loss", "test_acc"),
                      title=f"{name}: {experiment.model}, {dataset}, {scale} scale")


def _figures(experiment: SuperclassExperiment, scale: str, seeds, root: Path, histories: dict, data: Dataset) -> None:
    pca = experiment.figures[1]
    superclass_curves(experiment, data.name, scale, root, {
        label: [histories[(norm, s)] for s in seeds if (norm, s) in histories] for label, norm in experiment.norms})
    for label, norm in experiment.norms:
        if (norm, seeds[0]) in histories:
            outputs, superclasses = run_outputs(root / "runs" / _run_name(norm, experiment.lr, seeds[0]), data=data)
            pca_figure(outputs, superclasses, data.coarse_classes, root / f"{pca}-{norm}.png",
                       title=f"{label}: PCA of the outputs on {len(outputs)} test images, by superclass")
