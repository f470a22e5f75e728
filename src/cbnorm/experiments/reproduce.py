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

import dataclasses
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from cbnorm.factory import norm_layer_names

from .clusters import mixture_clusters, save_cluster_ids
from .data import Dataset, available, load_dataset
from .metrics import at_fraction, mean_std
from .parallel import run_parallel
from .planner import plan_runs, time_epochs, timing_lines
from .plots import activation_figure, curves_figure, run_activations, run_snapshots, tsne_figure
from .runs import command_line, has_checkpoint, results_folder, run_each, write_results
from .speed import device_name
from .train import TrainConfig, resolve_device, supervised_norm, train

__all__ = ["EXPERIMENTS", "SCALES", "Experiment", "Scale", "reproduce"]

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Scale:
    """How much of the protocol runs: data subsets (0: all), epochs, seeds and figure sizes."""

    name: str
    train_size: int
    test_size: int
    epochs: int
    seeds: tuple[int, ...]
    tsne_points: int = 0  # 0: no t-SNE figure


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


def _format(mean: float, std: float, runs: int) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if runs > 1 else f"{mean:.2f}"


def _table(experiment: Experiment, dataset: str, scale: Scale, results: dict) -> str:
    what = "test accuracy" if experiment.metric == "test_acc" else "test error"
    paper_source = ("Table V, 100 epochs on the full data set" if experiment.name == "table5"
                    else "IV-C text, final error after 200 epochs on CIFAR-100")
    size = lambda n: "all" if n == 0 else str(n)  # noqa: E731
    lines = [
        f"# {experiment.title} — {dataset}, scale `{scale.name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Scale: {size(scale.train_size)} train / {size(scale.test_size)} test images (fixed random subsets), "
        f"{scale.epochs} epochs, seeds {', '.join(map(str, results['seeds']))}. Protocol: {experiment.optimizer} "
        f"({experiment.schedule} schedule), batch {experiment.batch_size}, weight decay 1e-4, K = {experiment.k}; "
        f"SCB clusters: a {experiment.k}-component Gaussian mixture of the data set (PCA features).",
        "",
        f"Our {what} (%) at 25/50/75/100% of training (mean ± std over seeds), and the paper's ({paper_source}). "
        f"Torch {torch.__version__}, {platform.machine()}, {results['device']}; "
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
            ours = [_format(m, s, len(row["seeds"])) for m, s in row["ours"]]
        lines.append(f"| {row['label']} | {row['lr']:g} | " + " | ".join(ours + paper_cells) + " |")
    if experiment.name != "table5" and dataset == "cifar100":
        lines += ["", "The paper gives one final error for the three cluster-based variants together."]
    if results.get("plan"):
        lines += ["", f"Only part of the protocol ran, as planned by --time-budget: {results['plan']['text']}"]
    lines += timing_lines(results["rows"], results["device_name"])
    return "\n".join(lines) + "\n"


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
    scale = SCALES[experiment.name][scale] if isinstance(scale, str) else scale
    scale = dataclasses.replace(scale, epochs=epochs) if epochs else scale
    seeds = tuple(seeds) if seeds else (0, 1, 2) if time_budget else scale.seeds
    command = command_line(command)
    given = data  # what --parallel's processes share; else each loads the data set (no large shared memory)
    data = data if data is not None else load_dataset(dataset, data_dir)
    root = results_folder(out, f"{experiment.name}-{dataset}", scale.name)
    registered = set(norm_layer_names()) | {"none"}

    clusters_file = root / f"clusters-{dataset}-gmm-k{experiment.k}.npz"
    if any(supervised_norm(norm) for _, norm in experiment.norms if norm in registered) and not clusters_file.exists():
        print(f"fitting the {experiment.k}-component mixture of {dataset} for SCB-Norm's clusters")
        save_cluster_ids(clusters_file, mixture_clusters(data, experiment.k), dataset)

    registered_norms = [norm for _, norm in experiment.norms if norm in registered]
    plan = None
    if time_budget:
        where = resolve_device(device)
        print(f"timing {experiment.model} with each layer on {device_name(where)} for the --time-budget plan")
        seconds = (timer or time_epochs)(experiment, data, scale.train_size, scale.test_size, where, registered_norms,
                                         speed_settings)
        plan = plan_runs(experiment, seconds, time_budget * 60, seeds, scale.epochs, registered_norms)
        print(plan.describe())
        seeds = tuple(sorted({seed for _, _, seed in plan.runs}))

    def configure(key):
        norm, lr, seed = key
        config = TrainConfig(
            dataset=dataset, data_dir=data_dir, train_size=scale.train_size, test_size=scale.test_size,
            model=experiment.model, norm=norm, num_clusters=experiment.k, clusters=str(clusters_file),
            optimizer=experiment.optimizer, lr=lr, schedule=experiment.schedule, epochs=scale.epochs,
            batch_size=experiment.batch_size, seed=seed, device=device, amp=amp, threads=threads,
            out=str(root / "runs" / _run_name(norm, lr, seed)), resume=True,
            snapshots=4 if scale.tsne_points and norm in ("scb", "ucb") and scale.epochs >= 4 else 0,
            progress=progress, **(speed_settings or {}),
        )
        return config

    runs = [((norm, lr, seed), f"{label}, lr {lr:g}, seed {seed}") for label, norm in experiment.norms
            for lr in experiment.lrs for seed in seeds if norm in registered]
    if plan is not None:
        runs = [(key, title) for key, title in runs if key in plan.runs]
    if parallel > 1:
        histories, failures = run_parallel(runs, configure, parallel, given)
    else:
        histories, failures = run_each(runs, lambda key: train(configure(key), data))
    rows = []
    for label, norm in experiment.norms:
        for lr in experiment.lrs:
            done = [histories[(norm, lr, s)] for s in seeds if (norm, lr, s) in histories]
            failed = [failures[(norm, lr, s)] for s in seeds if (norm, lr, s) in failures]
            if norm not in registered:
                status = f"missing: no {norm!r} layer is registered"
            elif plan is not None and not any((norm, lr, s) in plan.runs for s in seeds):
                status = "not run: outside the --time-budget plan"
            elif failed:
                status = f"failed: {failed[0]}"
            else:
                status = "ok"
            ours = [mean_std([100 * at_fraction(h, f, scale.epochs, experiment.metric) for h in done]) for f in FRACTIONS]
            ran = [s for s in seeds if plan is None or (norm, lr, s) in plan.runs]
            per_epoch = [sum(row["seconds"] for row in h) / len(h) for h in done if h]
            rows.append({"label": label, "norm": norm, "lr": lr, "seeds": ran, "status": status,
                         "ours": ours, "paper": _paper_numbers(experiment, dataset, norm, lr),
                         "seconds_per_epoch": sum(per_epoch) / len(per_epoch) if per_epoch else None})

    results = {"experiment": experiment.name, "dataset": dataset, "scale": asdict(scale), "seeds": list(seeds),
               "command": command, "device": str(resolve_device(device)),
               "device_name": device_name(resolve_device(device)),
               "parallel": parallel, "plan": None if plan is None else {**plan.as_dict(), "text": plan.describe()},
               "rows": rows,
               "train_seconds": sum(row["seconds"] for h in histories.values() for row in h)}
    return write_results(root, _table(experiment, dataset, scale, results), results,
                         lambda: _figures(experiment, dataset, scale, seeds, root, histories, data), failures)


def _setting(experiment: Experiment, dataset: str, scale: Scale) -> str:
    return f"{experiment.model}, {dataset}, {scale.name} scale"


def curves_figures(experiment: Experiment, dataset: str, scale: Scale, seeds, root: Path, histories: dict) -> None:
    """The experiment's curves (Figure 5 or 8) in ``root``, from ``histories[(norm, lr, seed)]``."""
    panels = {}
    for lr in experiment.lrs:
        panel = {label: [histories[(norm, lr, s)] for s in seeds if (norm, lr, s) in histories]
                 for label, norm in experiment.norms}
        panels[f"lr = {lr:g}"] = {label: h for label, h in panel.items() if h}
    if any(panels.values()):
        name = experiment.figure.replace("figure", "Figure ")
        curves_figure(panels, root / f"{experiment.figure}.png", experiment.curves,
                      title=f"{name}: {_setting(experiment, dataset, scale)}")


def _figures(experiment: Experiment, dataset: str, scale: Scale, seeds, root: Path, histories: dict,
             data: Dataset) -> None:
    curves_figures(experiment, dataset, scale, seeds, root, histories)
    first = (experiment.lrs[0], seeds[0])
    finished = [(label, norm) for label, norm in experiment.norms if (norm, *first) in histories
                and has_checkpoint(root / "runs" / _run_name(norm, *first))]  # a reused run without one keeps its figure
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
