"""Reproduce the paper's classification experiments: Table V with Figure 5 (shallow CNN, IV-B) and
Figure 8 (DenseNet-BC, IV-C).

    cbnorm reproduce table5 --dataset cifar10 --scale smoke      # CI: under 2 minutes on CPU
    cbnorm reproduce table5 --dataset cifar10 --scale small      # about an hour on 2 CPU cores
    cbnorm reproduce table5 --dataset cifar10 --scale paper      # the paper's protocol, for a GPU
    cbnorm reproduce table5 --scale paper --parallel 4 --time-budget 8   # what fits 8 min, 4 runs at once
    cbnorm reproduce densenet --depth 40 --scale small           # CIFAR-100 when present, else CIFAR-10

Every scale follows the paper's protocol (models, optimiser, learning rates, K, batch size) and
changes only the data (fixed random subsets, the same for every run) and the epochs: see
:data:`SCALES`. It writes ``<--out, default .>/results/<experiment>-<dataset>/<scale>/``:

    runs/<norm>-lr<lr>-seed<seed>/  each run: metrics.csv, metrics.json, config.json, checkpoint.pt
    table.md                        our test accuracy (error for DenseNet) at 25/50/75/100% of
                                    training, mean ± std over the seeds, beside the paper's numbers
    figure5.png / figure8.png       test error (Figure 5); train/test error and loss (Figure 8)
    figure2.png                     activation distributions with their fitted mixture (final models)
    figure1.png / figure9.png       t-SNE of activations at 25/50/75/100% (SCB-Norm, UCB-Norm; not at smoke scale)
    summary.json                    every number of the table, the scale and the command

Running the command again resumes unfinished runs and reuses finished ones. A norm layer missing
from the registry (MN, until the mixture issue lands) shows as missing in the table, never faked;
it runs as soon as ``"mn"`` is registered. The paper's numbers are copied from the paper; ours are
only ever measured.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from cbnorm.factory import norm_layer_names

from .clusters import mixture_clusters, save_cluster_ids
from .data import Dataset, available, load_dataset
from .driver import Finished, Scale, Spec, drive_experiment
from .metrics import at_fraction, mean_std
from .planner import plan_lines, time_epochs
from .plots import activation_figure, curves_figure, run_activations, run_snapshots, tsne_figure
from .runs import has_checkpoint
from .stats import Interval, comparison, interval
from .train import TrainConfig, best_val_row, supervised_norm, train

__all__ = ["EXPERIMENTS", "SCALES", "Classification", "Experiment", "Scale", "first_epoch_reaching", "reproduce",
           "variants"]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# Table V to convergence (scale `converge`, issue 14): 2,500 CIFAR-10 training images (2,250 after the
# validation hold-out, 9 steps of 256 per epoch), 30 epochs, 3 seeds of 4 layers. Sized for the 2-core CPU: a
# step of the shallow CNN at batch 256 takes 1.75 s at --threads 1 on an idle core, so the 12 runs take about
# 12 x 30 x 9 x 1.9 s = 1.7 core-hours. figure5.png shows whether BN's test accuracy has plateaued by the
# last epoch; if not, raise the epochs before reading the table.
CONVERGE_TRAIN, CONVERGE_EPOCHS = 2500, 30


def variants(norms) -> list[tuple[str, str, dict, str]]:
    """``(label, norm, overrides, key)`` for each ``(label, norm)`` or ``(label, norm, overrides)``:
    ``overrides`` are TrainConfig fields (e.g. ``{"norm_kwargs": {"update": "weight"}}``) and ``key``,
    the norm followed by the overrides' values (``ucb-weight``), names the variant's runs."""
    def leaves(value):
        return [leaf for v in value.values() for leaf in leaves(v)] if isinstance(value, dict) else [str(value)]

    out = []
    for entry in norms:
        label, norm, overrides = (*entry, {}) if len(entry) == 2 else entry
        out.append((label, norm, overrides, "-".join([norm, *leaves(overrides)])))
    return out


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: the models compared and their training protocol."""

    name: str
    title: str
    model: str
    norms: tuple[tuple[str, str], ...]  # (label, registry name); "none": the plain network
    lrs: tuple[float, ...]
    k: int
    optimizer: str
    schedule: str
    batch_size: int
    curves: tuple[str, ...]
    figure: str  # the paper's figure of the curves
    tsne_figure: str
    metric: str  # what the table reports: test_acc or test_error


_CB_NORMS = (("MN", "mn"), ("SCB-Norm-base", "scb_base"), ("SCB-Norm", "scb"), ("UCB-Norm", "ucb"))
# Table V to convergence (issue 14): the paper's headline rate, its CB layers and both UCB-Norm updates.
_CONVERGE_NORMS = (("BN", "batchnorm"), ("SCB-Norm", "scb"), ("UCB-Norm (moving_average)", "ucb"),
                   ("UCB-Norm (weight)", "ucb", {"norm_kwargs": {"update": "weight"}}))
TABLE5 = Experiment(
    "table5", "Table V: shallow CNN (Table IV), the third BN replaced by the layer under test", "shallow_cnn",
    (("BN", "batchnorm"),) + _CB_NORMS, (0.001, 0.005), 3, "adamw", "constant", 256, ("test_error",), "figure5",
    "figure1", "test_acc",
)


def densenet(depth: int) -> Experiment:
    return Experiment(
        f"densenet{depth}", f"Figure 8: DenseNet-BC-{depth}, the layer under test added as the initial layer",
        f"densenet{depth}", (("BN", "none"),) + _CB_NORMS, (0.1,), 5, "sgd", "step", 64,
        ("train_error", "test_error", "train_loss", "test_loss"), "figure8", "figure9", "test_error",
    )


EXPERIMENTS = {"table5": TABLE5, "densenet40": densenet(40), "densenet100": densenet(100)}

# `small` is sized from epochs timed on 2 shared CPU cores to take about an hour for all its runs,
# MN's included (docs/reproducing.md); `smoke` is CI's; `paper` is the paper's protocol.
SCALES: dict[str, dict[str, Scale]] = {
    "table5": {
        "smoke": Scale("smoke", 128, 128, 2, (0,)),
        "small": Scale("small", 2560, 1000, 4, (0, 1), tsne_points=500),
        "paper": Scale("paper", 0, 0, 100, (0,), tsne_points=1000),
        "converge": Scale("converge", CONVERGE_TRAIN, 1000, CONVERGE_EPOCHS, (0, 1, 2), norms=_CONVERGE_NORMS,
                          lrs=(0.005,), select="best-val"),
    },
    "densenet40": {
        "smoke": Scale("smoke", 128, 128, 2, (0,)),
        "small": Scale("small", 1280, 500, 4, (0, 1), tsne_points=500),
        "paper": Scale("paper", 0, 0, 200, (0,), tsne_points=1000),
    },
    "densenet100": {
        "smoke": Scale("smoke", 64, 64, 2, (0,)),
        "small": Scale("small", 256, 200, 4, (0, 1), tsne_points=200),
        "paper": Scale("paper", 0, 0, 200, (0,), tsne_points=1000),
    },
}

# The paper's Table V: test accuracy (%) at 25/50/75/100 epochs of 100, per (norm, learning rate).
PAPER_TABLE5 = {
    "cifar10": {
        ("batchnorm", 0.001): (84.34, 86.49, 86.41, 86.90), ("batchnorm", 0.005): (83.44, 84.39, 85.65, 85.65),
        ("mn", 0.001): (84.45, 86.60, 86.6, 87.07), ("mn", 0.005): (83.47, 84.60, 85.68, 85.80),
        ("scb_base", 0.001): (85.9, 86.93, 87.09, 87.11), ("scb_base", 0.005): (83.65, 85.09, 86.28, 86.41),
        ("scb", 0.001): (84.68, 86.61, 87.38, 87.57), ("scb", 0.005): (84.85, 86.54, 87.07, 87.07),
        ("ucb", 0.001): (85.15, 85.80, 87.97, 87.97), ("ucb", 0.005): (86.04, 86.04, 87.49, 87.49),
    },
    "cifar100": {
        ("batchnorm", 0.001): (57.41, 59.74, 59.82, 59.82), ("batchnorm", 0.005): (55.64, 56.97, 56.29, 56.29),
        ("mn", 0.001): (56.90, 59.80, 59.80, 60.10), ("mn", 0.005): (55.80, 55.80, 56.56, 57.09),
        ("scb_base", 0.001): (57.74, 61.01, 61.01, 61.01), ("scb_base", 0.005): (55.47, 57.06, 57.06, 57.60),
        ("scb", 0.001): (58.50, 59.25, 59.65, 61.02), ("scb", 0.005): (55.81, 57.68, 57.68, 57.68),
        ("ucb", 0.001): (59.44, 61.10, 61.10, 61.10), ("ucb", 0.005): (58.31, 60.29, 60.29, 60.29),
    },
    "tiny-imagenet": {
        ("batchnorm", 0.001): (37.17, 37.17, 37.17, 37.17), ("batchnorm", 0.005): (34.11, 34.11, 34.11, 34.11),
        ("mn", 0.001): (38.18, 38.17, 38.5, 38.5), ("mn", 0.005): (34.56, 34.99, 35.12, 35.27),
        ("scb_base", 0.001): (38.53, 40.08, 40.08, 40.08), ("scb_base", 0.005): (34.78, 35.44, 35.44, 36.71),
        ("scb", 0.001): (37.72, 39.45, 40.29, 40.29), ("scb", 0.005): (37.97, 38.31, 38.31, 38.31),
        ("ucb", 0.001): (39.71, 39.71, 39.71, 39.71), ("ucb", 0.005): (35.78, 37.03, 37.03, 37.03),
    },
}
# The paper's IV-C text: final test error (%) on CIFAR-100 after 200 epochs. It gives one number for
# the cluster-based variants together ("the Cluster-Based Normalization counterpart").
PAPER_DENSENET = {
    "densenet40": {"none": 38.0, "mn": 37.0, "cb": 36.0},
    "densenet100": {"none": 30.0, "mn": 29.0, "cb": 28.0},
}


def _paper_numbers(experiment: Experiment, dataset: str, norm: str, lr: float) -> Optional[tuple[float, ...]]:
    """The paper's numbers for one table row, or None where the paper has none."""
    if experiment.name == "table5":
        return PAPER_TABLE5.get(dataset, {}).get((norm, lr))
    if dataset != "cifar100":
        return None
    numbers = PAPER_DENSENET[experiment.name]
    final = numbers.get(norm, numbers["cb"])
    return (math.nan, math.nan, math.nan, final)


def _run_name(norm: str, lr: float, seed: int) -> str:
    return f"{norm}-lr{lr:g}-seed{seed}"


def first_epoch_reaching(history: Sequence[dict], target: float, key: str = "test_acc") -> Optional[int]:
    """The first epoch whose ``key`` is at least ``target`` (``None``: never)."""
    return next((row["epoch"] for row in history if row[key] >= target), None)


def _selected(history: Sequence[dict], select: str, metric: str) -> float:
    """``metric`` at the last epoch, or (``best-val``) at the epoch of the best validation accuracy."""
    if not history:
        return math.nan
    return (best_val_row(history) if select == "best-val" else history[-1])[metric]


def _row_statistics(done: dict, baseline: Optional[dict], scale: Scale, metric: str) -> dict:
    """The table's numbers for one (variant, lr): per-seed values at the fractions, the last epoch and (for
    best-val scales) the best-validation epoch, with intervals, paired differences against ``baseline``
    (the same seeds' histories of the baseline row; ``None`` for the baseline itself) and verdicts, and
    the epoch at which each seed first reaches the baseline's mean final accuracy."""
    higher = metric == "test_acc"
    finished = {s: h for s, h in done.items() if len(h) >= scale.epochs}
    selections = ("last", "best-val") if scale.select == "best-val" else ("last",)
    row = {"fractions": [interval([100 * at_fraction(h, f, scale.epochs, metric) for h in done.values()]).to_dict()
                         for f in FRACTIONS]}
    for select in selections:
        values = {s: 100 * _selected(h, select, metric) for s, h in finished.items()}
        base = None
        if baseline is not None:
            base_values = {s: 100 * _selected(h, select, metric) for s, h in baseline.items() if len(h) >= scale.epochs}
            common = sorted(set(values) & set(base_values))
            base = [base_values[s] for s in common]
            values = {s: values[s] for s in common}
        row[select] = {"seeds": sorted(values), "values": [values[s] for s in sorted(values)],
                       **comparison([values[s] for s in sorted(values)], base, higher)}
    if metric == "test_acc":
        reference = baseline if baseline is not None else done
        target = interval([100 * h[-1][metric] for h in reference.values() if len(h) >= scale.epochs]).mean
        if math.isfinite(target):
            row["reach"] = {"target": target,
                            "epochs": [first_epoch_reaching(h, target / 100, metric) for h in finished.values()]}
    return row


def _reach_cell(reach: Optional[dict]) -> str:
    if not reach or not reach["epochs"]:
        return "—"
    reached = [e for e in reach["epochs"] if e is not None]
    if not reached:
        return f"never (0/{len(reach['epochs'])})"
    mean = interval(reached).cell(1)
    return mean if len(reached) == len(reach["epochs"]) else f"{mean} ({len(reached)}/{len(reach['epochs'])} seeds)"


def _table(experiment: Experiment, dataset: str, scale: Scale, results: dict) -> str:
    what = "test accuracy" if experiment.metric == "test_acc" else "test error"
    paper_source = ("Table V, 100 epochs on the full data set" if experiment.name == "table5"
                    else "IV-C text, final error after 200 epochs on CIFAR-100")
    size = lambda n: "all" if n == 0 else str(n)  # noqa: E731
    baseline = results["rows"][0]["label"] if results["rows"] else "—"
    lines = [
        f"# {experiment.title} — {dataset}, scale `{scale.name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Scale: {size(scale.train_size)} train / {size(scale.test_size)} test images (fixed random subsets), "
        f"{scale.epochs} epochs, seeds {', '.join(map(str, results['seeds']))}. Protocol: {experiment.optimizer} "
        f"({experiment.schedule} schedule), batch {experiment.batch_size}, weight decay 1e-4, K = {experiment.k}; "
        f"SCB clusters: a {experiment.k}-component Gaussian mixture of PCA features, both fitted on the training "
        "images (test images get the fitted mixture's prediction).",
        "",
        f"Our {what} (%) at 25/50/75/100% of training: mean ± half-width of the 95% Student-t interval over "
        f"seeds; the paper's ({paper_source}). Torch {torch.__version__}, {platform.machine()}, {results['device']}; "
        f"{results['train_seconds'] / 60:.1f} min of training and evaluation, summed over the runs.",
        "",
        "| model | lr | ours 25% | ours 50% | ours 75% | ours 100% | paper 25% | paper 50% | paper 75% | paper 100% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        paper = row["paper"] or (math.nan,) * 4
        paper_cells = ["—" if not math.isfinite(p) else f"{p:.2f}" for p in paper]
        if row["status"] != "ok":
            ours = [row["status"]] + [""] * 3
        else:
            ours = [Interval.from_dict(v).cell() for v in row["stats"]["fractions"]]
        lines.append(f"| {row['label']} | {row['lr']:g} | " + " | ".join(ours + paper_cells) + " |")
    selections = ("last", "best-val") if scale.select == "best-val" else ("last",)
    titles = {"last": "last epoch", "best-val": "epoch of the best validation accuracy"}
    lines += ["", f"Against {baseline} under the same seeds (paired difference of the {what}, points; 95% Student-t "
                  f"interval; the verdict is computed: `better`/`worse` when the interval excludes 0)."
              + (f" Validation: {scale.select}, a fixed {results['val_fraction']:.0%} of the training subset held "
                 "out, the test accuracy read at the epoch of the best validation accuracy (the authors' notebooks)."
                 if scale.select == "best-val" else ""),
              "", "| model | lr | selection | ours | difference | 95% interval | verdict | epoch reaching "
                  f"{baseline}'s final mean |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        if row["status"] != "ok":
            continue
        for select in selections:
            stats = row["stats"][select]
            ours = Interval.from_dict(stats["interval"])
            if "difference" in stats:
                d = stats["difference"]
                diff, span, verdict_cell = f"{d['mean']:+.2f}", f"[{d['low']:+.2f}, {d['high']:+.2f}]", stats["verdict"]
            else:
                diff, span, verdict_cell = "(baseline)", "", ""
            reach = _reach_cell(row["stats"].get("reach")) if select == "last" else ""
            lines.append(f"| {row['label']} | {row['lr']:g} | {titles[select]} | {ours.cell()} | {diff} | {span} | "
                         f"{verdict_cell} | {reach} |")
    if experiment.name != "table5" and dataset == "cifar100":
        lines += ["", "The paper gives one final error for the three cluster-based variants together."]
    lines += plan_lines(results["plan"])
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class Classification(Spec):
    """Table V or a DenseNet experiment, for :func:`~cbnorm.experiments.driver.drive`: a run per
    (variant, learning rate, seed), trained by :func:`~cbnorm.experiments.train.train`. ``timer``
    times the layers for a time budget (default :func:`~cbnorm.experiments.planner.time_epochs`)."""

    experiment: Experiment
    dataset: str
    timer: Optional[Callable] = None

    @property
    def folder(self) -> str:
        return f"{self.experiment.name}-{self.dataset}"

    @property
    def trainer(self) -> Callable:
        return train  # this module's, looked up when the runs start

    def load(self) -> tuple:
        return self.given or (load_dataset(self.dataset, self.data_dir),)

    def variants(self, scale: Scale) -> list[tuple[str, str, dict, str]]:
        return variants(scale.norms or self.experiment.norms)

    def lrs(self, scale: Scale) -> Sequence[float]:
        return scale.lrs or self.experiment.lrs

    def layers(self, scale: Scale) -> list[tuple[str, str]]:
        return [(key, norm) for _, norm, _, key in self.variants(scale) if _registered(norm)]

    def clusters_file(self, root: Path) -> Path:
        return root / f"clusters-{self.dataset}-gmm-k{self.experiment.k}-train-fit.npz"

    def prepare(self, root: Path, scale: Scale, data: tuple) -> None:
        """SCB-Norm's dataset clusters: the mixture of the training images, fitted once for every run."""
        path, k = self.clusters_file(root), self.experiment.k
        if any(supervised_norm(norm) for _, norm in self.layers(scale)) and not path.exists():
            print(f"fitting the {k}-component mixture of {self.dataset}'s training images for SCB-Norm's clusters")
            save_cluster_ids(path, mixture_clusters(data[0], k), self.dataset)

    def epoch_seconds(self, scale: Scale, data: tuple, device, norms: Sequence[str]) -> dict:
        return (self.timer or time_epochs)(self.experiment, data[0], scale.train_size, scale.test_size, device, norms,
                                           self.speed_settings)

    def runs(self, scale: Scale, seeds: Sequence[int]) -> list[tuple[tuple, str]]:
        return [((key, lr, seed), f"{label}, lr {lr:g}, seed {seed}") for label, norm, _, key in self.variants(scale)
                for lr in self.lrs(scale) for seed in seeds if _registered(norm)]

    def configure(self, key: tuple, scale: Scale, root: Path) -> TrainConfig:
        label_key, lr, seed = key
        norm, overrides = next((n, o) for _, n, o, k in self.variants(scale) if k == label_key)
        experiment = self.experiment
        fields = dict(
            dataset=self.dataset, train_size=scale.train_size, test_size=scale.test_size, model=experiment.model,
            norm=norm, num_clusters=experiment.k, clusters=str(self.clusters_file(root)),
            optimizer=experiment.optimizer, lr=lr, schedule=experiment.schedule, epochs=scale.epochs,
            batch_size=experiment.batch_size, select=scale.select, seed=seed,
            out=str(root / "runs" / _run_name(label_key, lr, seed)),
            snapshots=4 if scale.tsne_points and norm in ("scb", "ucb") and scale.epochs >= 4 else 0,
            **self.run_settings(),
        )
        return TrainConfig(**{**fields, **overrides})

    def results(self, done: Finished) -> tuple[str, dict, Callable[[], None]]:
        experiment, scale, seeds, histories = self.experiment, done.scale, done.seeds, done.histories
        norms, lrs = self.variants(scale), self.lrs(scale)
        baseline_key = norms[0][3]
        rows = []
        for label, norm, _, key in norms:
            for lr in lrs:
                finished = {s: histories[(key, lr, s)] for s in seeds if (key, lr, s) in histories}
                status = (done.status([(key, lr, s) for s in seeds]) if _registered(norm)
                          else f"missing: no {norm!r} layer is registered")
                baseline = None if key == baseline_key else {s: histories[(baseline_key, lr, s)] for s in seeds
                                                             if (baseline_key, lr, s) in histories}
                rows.append({"label": label, "norm": norm, "key": key, "lr": lr,
                             "seeds": [s for s in seeds if done.planned((key, lr, s))], "status": status,
                             "ours": [mean_std([100 * at_fraction(h, f, scale.epochs, experiment.metric)
                                                for h in finished.values()]) for f in FRACTIONS],
                             "stats": _row_statistics(finished, baseline, scale, experiment.metric),
                             "paper": _paper_numbers(experiment, self.dataset, norm, lr) if key == norm else None})
        results = done.summary(experiment=experiment.name, dataset=self.dataset, val_fraction=TrainConfig.val_fraction,
                               rows=rows)
        figures = lambda: _figures(experiment, self.dataset, scale, seeds, done.root, histories, done.data[0],  # noqa: E731
                                   norms, lrs)
        return _table(experiment, self.dataset, scale, results), results, figures


def _registered(norm: str) -> bool:
    return norm == "none" or norm in norm_layer_names()


def reproduce(
    experiment: Union[str, Experiment],
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
    parallel: int = 1,
    time_budget: Optional[float] = None,
    epochs: Optional[int] = None,
    speed_settings: Optional[dict] = None,
    timer=None,
) -> Path:
    """Run (or resume) every run of ``experiment`` at ``scale`` and write its table and figures.

    Returns the results directory. ``seeds`` overrides the scale's; ``data`` skips loading the dataset.
    ``parallel``: runs at once, each in its own process (:mod:`~cbnorm.experiments.parallel`).
    ``time_budget`` (minutes): run only what :mod:`~cbnorm.experiments.planner` finds fits it, of
    seeds ``seeds`` or 0, 1, 2, timed by ``timer`` (default :func:`~.planner.time_epochs`).
    ``epochs`` overrides the scale's. ``speed_settings``: the
    :class:`~cbnorm.experiments.speed.SpeedSettings` fields of every run (e.g. ``{"compile": True}``).
    """
    experiment = EXPERIMENTS[experiment] if isinstance(experiment, str) else experiment
    return drive_experiment(Classification, scale, SCALES[experiment.name], name=experiment.name,
                            experiment=experiment, dataset=dataset, out=out, data_dir=data_dir, seeds=seeds,
                            device=device, amp=amp, threads=threads, progress=progress, command=command, data=data,
                            parallel=parallel, time_budget=time_budget, epochs=epochs, speed_settings=speed_settings,
                            timer=timer)


def _setting(experiment: Experiment, dataset: str, scale: Scale) -> str:
    return f"{experiment.model}, {dataset}, {scale.name} scale"


def curves_figures(experiment: Experiment, dataset: str, scale: Scale, seeds, root: Path, histories: dict,
                   norms: Optional[list] = None, lrs: Optional[Sequence[float]] = None) -> None:
    """The experiment's curves (Figure 5 or 8) in ``root``, from ``histories[(key, lr, seed)]`` of the
    :func:`variants` ``norms`` (default: the scale's or the experiment's) at ``lrs``."""
    norms = norms or variants(scale.norms or experiment.norms)
    panels = {}
    for lr in lrs or scale.lrs or experiment.lrs:
        panel = {label: [histories[(key, lr, s)] for s in seeds if (key, lr, s) in histories]
                 for label, _, _, key in norms}
        panels[f"lr = {lr:g}"] = {label: h for label, h in panel.items() if h}
    if any(panels.values()):
        name = experiment.figure.replace("figure", "Figure ")
        curves = experiment.curves + (("val_acc",) if scale.select == "best-val" else ())
        curves_figure(panels, root / f"{experiment.figure}.png", curves,
                      title=f"{name}: {_setting(experiment, dataset, scale)}")


def _figures(experiment: Experiment, dataset: str, scale: Scale, seeds, root: Path, histories: dict,
             data: Dataset, norms: list, lrs: Sequence[float]) -> None:
    curves_figures(experiment, dataset, scale, seeds, root, histories, norms, lrs)
    first = (lrs[0], seeds[0])
    finished = [(label, key) for label, _, _, key in norms if (key, *first) in histories
                and has_checkpoint(root / "runs" / _run_name(key, *first))]  # a reused run without one keeps its figure
    setting = f"{_setting(experiment, dataset, scale)}, lr {first[0]:g}, seed {first[1]}"
    if finished:
        activations = {label: run_activations(root / "runs" / _run_name(norm, *first), data=data)
                       for label, norm in finished}
        points = len(next(iter(activations.values())).values)
        activation_figure({f"{label}: {a.layer}, epoch {a.epoch}": a.values for label, a in activations.items()},
                          root / "figure2.png", k=experiment.k,
                          title=f"Figure 2: activations on {points} test images, {setting}")
    with_snapshots = [(label, norm) for label, norm in finished
                      if (root / "runs" / _run_name(norm, *first) / "snapshots").is_dir()]
    if scale.tsne_points and with_snapshots:
        rows = {label: run_snapshots(root / "runs" / _run_name(norm, *first), scale.tsne_points, data=data)
                for label, norm in with_snapshots}
        name = experiment.tsne_figure.replace("figure", "Figure ")
        tsne_figure(rows, root / f"{experiment.tsne_figure}.png", classes=data.classes,
                    title=f"{name}: t-SNE of the classifier's inputs on {scale.tsne_points} test images, {setting}")


def densenet_dataset(data_dir: Optional[str] = None) -> str:
    """CIFAR-100, the paper's data set for DenseNet, when the data root has it; CIFAR-10 otherwise."""
    return "cifar100" if available("cifar100", data_dir) else "cifar10"
