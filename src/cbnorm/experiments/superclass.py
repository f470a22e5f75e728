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

import dataclasses
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

import cbnorm

from .data import Dataset, Loader, available, load_dataset
from .driver import NOT_PLANNED, Finished, Scale, Spec, drive_experiment
from .planner import Protocol, plan_lines, time_epochs
from .plots import _load_run, curves_figure, pca_figure
from .reproduce import _run_name, variants
from .runs import clustered, resolve_device
from .stats import comparison, interval
from .train import TrainConfig, evaluate, supervised_norm, train

__all__ = ["EXPERIMENTS", "SCALES", "Scale", "SuperclassExperiment", "Superclasses", "default_dataset",
           "evaluate_unknown", "reproduce_superclass", "run_outputs"]

SCORES = ("test_acc", "test_precision", "test_recall", "test_f1")
PCA_POINTS = 500  # test images in Figure 14 (a fixed random batch, the same for every model)


@dataclass(frozen=True)
class SuperclassExperiment:
    """One of IV-F's two experiments: the models compared, the training protocol, the paper's numbers."""

    name: str
    title: str
    model: str
    norms: tuple  # (label, registry name[, TrainConfig overrides]); "none": the plain network
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
# Issue 14's controls on OxfordCNN: what does SCB-Norm gain from its superclass beyond the label
# information the superclass carries? The same final weights are also evaluated with the superclass
# withheld (every unknown-cluster rule); a learned bias per superclass before the last layer hands the
# plain network the same information ("label injection"); shuffled ids keep the cluster sizes only.
OXFORD_CNN_CONTROLS = dataclasses.replace(
    OXFORD_CNN, name="superclass-controls-oxford_cnn",
    title="Superclass controls: OxfordCNN with SCB-Norm before the final linear layer, and what explains its gain",
    norms=(("OxfordCNN base", "none"), ("OxfordCNN+SCB-Norm", "scb"),
           ("OxfordCNN+SCB-Norm, shuffled superclasses", "scb", {"clusters": "shuffled-superclass"}),
           ("OxfordCNN + superclass bias (label injection)", "cluster_bias")),
)
EXPERIMENTS = {"vit": VIT, "oxford_cnn": OXFORD_CNN, "oxford_cnn_controls": OXFORD_CNN_CONTROLS}

# `small` is sized from epochs timed with --threads 1 on 2 shared CPU cores (ViT: 65 s for 5,000 + 1,000
# images; OxfordCNN: 55 s for 20,000 + 10,000) to take about 20-25 minutes for all its runs (docs/reproducing.md,
# "Superclasses as prior clusters"); `smoke` is CI's; `paper` is the paper's protocol.
CONTROLS_TRAIN, CONTROLS_TEST, CONTROLS_EPOCHS = 4000, 2000, 4  # sized on 2 shared CPU cores, see results/FINDINGS.md
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
    "oxford_cnn_controls": {
        "smoke": Scale("smoke", 128, 128, 2, (0,)),
        "small": Scale("small", CONTROLS_TRAIN, CONTROLS_TEST, CONTROLS_EPOCHS, (0, 1, 2)),
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
    baseline = results["rows"][0]["label"] if results["rows"] else "—"
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
        "Ours: test accuracy and macro-averaged precision, recall and F1 (%), mean ± half-width of the 95% "
        "Student-t interval over seeds, at fixed epochs (no early stopping). *Test superclass*: what the layer "
        "gets for a test image: *given*, its true superclass (the paper's setting as we read it; this hands the "
        "model part of the label), *shuffled*, superclass ids permuted across images (the same cluster sizes, "
        "in training and test), or *unknown*, the same final weights with the superclass withheld and the "
        f"layer's unknown-cluster rule. Last column: the paired difference in accuracy against {baseline} under "
        "the same seeds (last epoch), its 95% interval and the computed verdict. "
        f"Paper: {experiment.paper_data} (copied from the paper; a different data set where ours is not the same).",
        "",
        "| model | epoch | test superclass | accuracy | precision | recall | F1 | paper epoch | paper accuracy | "
        f"paper precision | paper recall | paper F1 | accuracy vs {baseline} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        if row["status"] == "ok":
            ours = [interval(row["values"][key]).cell() for key in SCORES]
        else:
            ours = [row["status"], "", "", ""]
        paper = row["paper"] or (math.nan,) * 4
        paper_cells = ["—" if not math.isfinite(p) else f"{p:.2f}" for p in paper]
        paper_epoch = {None: "final", "last": "—"}.get(row["paper_epoch"], str(row["paper_epoch"]))
        versus = ""
        if "difference" in row:
            d = row["difference"]
            versus = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]: {row['verdict']}"
        lines.append(f"| {row['label']} | {row['epoch']} | {row['superclass']} | " + " | ".join(ours) +
                     f" | {paper_epoch} | " + " | ".join(paper_cells) + f" | {versus} |")
    lines += ["", _paper_notes(experiment)] + plan_lines(results["plan"])
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class Superclasses(Spec):
    """A superclass experiment for :func:`~cbnorm.experiments.driver.drive`: a run per (variant, seed) at the
    experiment's learning rate, trained by :func:`~cbnorm.experiments.train.train`; its rows add the SCB
    layers' final models with the superclass withheld."""

    experiment: SuperclassExperiment
    dataset: str
    timer: Optional[Callable] = None
    num_clusters: int = 0  # the data set's superclasses, set by prepare()

    @property
    def folder(self) -> str:
        return f"{self.experiment.name}-{self.dataset}"

    @property
    def trainer(self) -> Callable:
        return train

    def load(self) -> tuple:
        data = self.given[0] if self.given else load_dataset(self.dataset, self.data_dir)
        if data.train.coarse_labels is None:
            raise ValueError(f"the superclass experiment needs a data set with superclasses (cifar100, cifar10, "
                             f"oxford-pet), got {data.name}")
        return (data,)

    def variants(self) -> list[tuple[str, str, dict, str]]:
        return variants(self.experiment.norms)

    def prepare(self, root: Path, scale: Scale, data: tuple) -> None:
        self.num_clusters = len(data[0].coarse_classes)

    def lrs(self, scale: Scale) -> Sequence[float]:
        return (self.experiment.lr,)

    def layers(self, scale: Scale) -> list[tuple[str, str]]:
        return [(key, norm) for _, norm, _, key in self.variants()]

    def epoch_seconds(self, scale: Scale, data: tuple, device, norms: Sequence[str]) -> dict:
        protocol = Protocol(self.experiment.model, self.experiment.batch_size, len(data[0].coarse_classes))
        return (self.timer or time_epochs)(protocol, data[0], scale.train_size, scale.test_size, device, norms,
                                           self.speed_settings)

    def runs(self, scale: Scale, seeds: Sequence[int]) -> list[tuple[tuple, str]]:
        lr = self.experiment.lr
        return [((key, lr, seed), f"{label}, seed {seed}") for label, _, _, key in self.variants() for seed in seeds]

    def configure(self, key: tuple, scale: Scale, root: Path) -> TrainConfig:
        label_key, lr, seed = key
        norm, overrides = next((n, o) for _, n, o, k in self.variants() if k == label_key)
        experiment = self.experiment
        fields = dict(
            dataset=self.dataset, train_size=scale.train_size, test_size=scale.test_size, model=experiment.model,
            norm=norm, num_clusters=self.num_clusters, clusters="superclass", optimizer=experiment.optimizer, lr=lr,
            weight_decay=experiment.weight_decay, epochs=scale.epochs, batch_size=experiment.batch_size, seed=seed,
            out=str(root / "runs" / _run_name(label_key, lr, seed)), **self.run_settings(),
        )
        return TrainConfig(**{**fields, **overrides})

    def results(self, done: Finished) -> tuple[str, dict, Callable[[], None]]:
        experiment, scale, seeds, (data,) = self.experiment, done.scale, done.seeds, done.data
        norms, lr = self.variants(), experiment.lr
        histories = {(key, s): h for (key, _, s), h in done.histories.items()}
        run_dir = lambda key, seed: done.root / "runs" / _run_name(key, lr, seed)  # noqa: E731

        def scores_row(label, norm, epoch, superclass, per_seed, status, paper_epoch, paper, baseline):
            """A table row from ``per_seed`` ({seed: metrics}); against ``baseline`` ({seed: accuracy}) when given."""
            row = {"label": label, "norm": norm, "epoch": epoch, "superclass": superclass, "status": status,
                   "seeds": sorted(per_seed),
                   "values": {k: [100 * per_seed[s][k] for s in sorted(per_seed)] for k in SCORES},
                   "paper_epoch": paper_epoch, "paper": paper}
            if baseline is not None and status == "ok":
                common = sorted(set(per_seed) & set(baseline))
                row.update(comparison([100 * per_seed[s]["test_acc"] for s in common], [baseline[s] for s in common]))
            return row

        base_key = norms[0][3]
        base_final = {s: 100 * histories[(base_key, s)][-1]["test_acc"] for s in seeds
                      if (base_key, s) in histories and len(histories[(base_key, s)]) == scale.epochs}
        rows = []
        for label, norm, overrides, key in norms:
            finished = {s: histories[(key, s)] for s in seeds if (key, s) in histories}
            status = done.status([(key, lr, s) for s in seeds])
            if status == NOT_PLANNED:
                rows.append(scores_row(label, norm, scale.epochs, "—", {}, status, "last", None, None))
                continue
            given = ("shuffled" if overrides.get("clusters") == "shuffled-superclass" else "given") if supervised_norm(
                norm) else "—"
            vs = None if key == base_key else base_final
            for epoch, paper_epoch in _report_epochs(experiment, scale.epochs):
                per_seed = {s: h[epoch - 1] for s, h in finished.items() if len(h) >= epoch}
                rows.append(scores_row(label, norm, epoch, given, per_seed, status, paper_epoch,
                                       experiment.paper.get((norm, paper_epoch)) if not overrides else None,
                                       vs if epoch == scale.epochs else None))
            if status != "ok" or overrides:
                continue
            for rule_label, rule in UNKNOWN_RULES.get(norm, ()):
                per_seed = {s: evaluate_unknown(run_dir(key, s), rule, data, self.device) for s in finished}
                rows.append(scores_row(label, norm, scale.epochs, rule_label, per_seed, "ok", "last", None, vs))

        results = done.summary(experiment=experiment.name, dataset=data.name, rows=rows)
        figures = lambda: _figures(experiment, scale.name, seeds, done.root, histories, data, norms)  # noqa: E731
        return _table(experiment, data, scale, results), results, figures


def reproduce_superclass(model: Union[str, SuperclassExperiment], dataset: str, scale: Union[str, Scale], *,
                         data: Optional[Dataset] = None, **options) -> Path:
    """Run (or resume) every run of the superclass experiment ``model`` (a key of :data:`EXPERIMENTS`) at
    ``scale`` and write its table and figures. Returns the results directory. ``data`` skips loading the
    data set; ``options`` are those of :func:`~cbnorm.experiments.reproduce.reproduce` (``out``, ``seeds``,
    ``device``, ``parallel``, ``time_budget``, ``epochs``, ``speed_settings``, ...)."""
    experiment = EXPERIMENTS[model] if isinstance(model, str) else model
    scales = SCALES[model if isinstance(model, str) else experiment.model]
    return drive_experiment(Superclasses, scale, scales, name="superclass", experiment=experiment,
                            dataset=data.name if data is not None else dataset, data=data, **options)


def superclass_curves(experiment: SuperclassExperiment, dataset: str, scale: str, root: Path, lines: dict) -> None:
    """Figure 13 (or OxfordCNN's ``curves.png``) in ``root``, from each label's histories (one a seed)."""
    curves = experiment.figures[0]
    lines = {label: h for label, h in lines.items() if h}
    if lines:
        name = "Figure 13" if curves == "figure13" else "Curves"
        curves_figure({"": lines}, root / f"{curves}.png", ("train_loss", "test_loss", "test_acc"),
                      title=f"{name}: {experiment.model}, {dataset}, {scale} scale")


def _figures(experiment: SuperclassExperiment, scale: str, seeds, root: Path, histories: dict, data: Dataset,
             norms: list) -> None:
    pca = experiment.figures[1]
    superclass_curves(experiment, data.name, scale, root, {
        label: [histories[(key, s)] for s in seeds if (key, s) in histories] for label, _, _, key in norms})
    for label, _, _, key in norms:
        if (key, seeds[0]) in histories:
            outputs, superclasses = run_outputs(root / "runs" / _run_name(key, experiment.lr, seeds[0]), data=data)
            pca_figure(outputs, superclasses, data.coarse_classes, root / f"{pca}-{key}.png",
                       title=f"{label}: PCA of the outputs on {len(outputs)} test images, by superclass")
