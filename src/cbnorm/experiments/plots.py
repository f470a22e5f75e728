"""Figures: training curves (Figures 5, 8, 10 and 13), gradient variance (Figure 12), activation
distributions with their fitted mixture (Figure 2), t-SNE of activations at training snapshots
(Figures 1 and 9), generated samples (Figure 11) and PCA of a model's outputs coloured by superclass
(Figure 14).

    cbnorm plot runs/bn runs/ucb                        # test-error curves of the runs -> curves.png
    cbnorm plot runs/bn runs/ucb --activations --tsne   # and Figure 2 / Figure 1 from their checkpoints

Each ``*_figure`` function draws a :class:`matplotlib.figure.Figure` (no pyplot state, no display
needed), saves it to ``path`` when one is given, and returns it. Where lines are means over seeds, the
shaded band is ``band="std"`` (± one sample standard deviation over the seeds) or ``band="ci"`` (the
95% confidence interval of the mean, Student t), and the legend says which.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .data import Loader, load_dataset
from .metrics import read_metrics

__all__ = ["Activations", "activation_figure", "capture", "curves_figure", "gradient_variance_figure",
           "metric_label", "pca_figure", "plot_runs", "principal_components", "run_activations", "run_snapshots",
           "samples_figure", "tsne_figure"]

PathLike = Union[str, os.PathLike]  # noqa: UP007 (a runtime alias)
Histories = Sequence[Sequence[dict]]  # one history per seed

_METRIC_LABELS = {
    "test_error": "test error", "train_error": "training error", "test_acc": "test accuracy",
    "train_acc": "training accuracy", "test_loss": "test loss", "train_loss": "training loss",
    "source_acc": "source test accuracy", "target_acc": "target test accuracy", "loss": "training loss",
    "mask": "mask rate (target images kept)", "fid": "FID", "fid_star": "FID*",
}
# Distinct marker and dash per line, hollow markers shrinking along the list: a line drawn exactly
# over another still shows.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2)), (0, (3, 1, 1, 1)))
_BANDS = {"std": "±1 std over {seeds}", "ci": "95% CI of the mean over {seeds} (Student t)"}
_LOG_BANDS = {"std": "×/÷ 1 geometric std over {seeds}", "ci": "95% CI of the geometric mean over {seeds} (Student t)"}


def metric_label(metric: str) -> str:
    """What a ``metrics.csv`` column holds, in words (``"mask"`` -> ``"mask rate (target images kept)"``)."""
    return _METRIC_LABELS.get(metric, metric.replace("_", " "))


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def _finish(fig, path: PathLike | None, title: str = ""):
    """Give ``fig`` its title, save it to ``path`` (if any) and return it."""
    if title:
        fig.suptitle(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _half_width(values: np.ndarray, band: str) -> np.ndarray:
    """Half the band's width at each epoch of ``values`` ``(seeds, epochs)``."""
    std = values.std(0, ddof=1)
    if band == "std":
        return std
    from scipy.stats import t

    return t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))


def _draw_lines(ax, lines: dict[str, Histories], key: str, band: str, log: bool = False) -> set[int]:
    """One line per label on ``ax``: the mean of ``key`` over its histories, with the band when there
    are several; with ``log``, both taken on the logarithm of the values (a geometric mean and spread).
    Returns the numbers of seeds behind the bands drawn."""
    if band not in _BANDS:
        raise ValueError(f"expected band to be one of {sorted(_BANDS)}, got {band!r}")
    seeds = set()
    for i, (label, histories) in enumerate(lines.items()):
        length = min((len(h) for h in histories), default=0)
        if length == 0:
            continue
        values = np.array([[row[key] for row in h[:length]] for h in histories], dtype=float)
        values = np.log(values) if log else values
        epochs = [row["epoch"] for row in histories[0][:length]]
        mean = values.mean(0)
        scale = np.exp if log else np.asarray
        (line,) = ax.plot(epochs, scale(mean), label=label, linestyle=_DASHES[i % len(_DASHES)],
                          marker=_MARKERS[i % len(_MARKERS)], markevery=max(1, length // 12),
                          markersize=max(3.0, 7.5 - i), markerfacecolor="none", linewidth=1.4)
        if len(histories) > 1:
            half = _half_width(values, band)
            ax.fill_between(epochs, scale(mean - half), scale(mean + half), color=line.get_color(), alpha=0.15, linewidth=0)
            seeds.add(len(histories))
    return seeds


def _legend(ax, seeds: set[int], band: str, log: bool = False, **kwargs) -> None:
    """The axes' legend, with an entry saying what the shaded band is when there is one."""
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    if seeds:
        counts = "–".join(str(n) for n in sorted({min(seeds), max(seeds)}))
        handles.append(Patch(color="0.5", alpha=0.3, label="band: " + (_LOG_BANDS if log else _BANDS)[band].format(seeds=f"{counts} seeds")))
    if handles:
        ax.legend(handles=handles, **kwargs)


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_figure(panels: dict[str, dict[str, Histories]], path: PathLike | None = None,
                  metrics: Sequence[str] = ("test_error",), *, title: str = "", band: str = "std"):
    """One row per metric, one column per panel; in each, one line per label: the mean over its
    histories (seeds), with a shaded ``band`` (see the module's docstring) when there are several.
    Each axes is titled with its panel and metric."""
    fig, axes = _figure(len(metrics), len(panels))
    for col, (panel, lines) in enumerate(panels.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            label = metric_label(metric)
            seeds = _draw_lines(ax, lines, metric, band)
            ax.set(title=f"{panel}: {label}" if panel and len(metrics) > 1 else panel or label, xlabel="epoch",
                   ylabel=label)
            _integer_epochs(ax)
            ax.grid(alpha=0.3)
            _legend(ax, seeds, band, fontsize=8)
    return _finish(fig, path, title)


def gradient_variance_figure(histories: dict[str, Histories], path: PathLike | None = None, *, title: str = "",
                             band: str = "std"):
    """Figure 12: per epoch, the largest and the mean over its steps of the variance of the gradient
    entries of the source loss ``L_S`` (top) and of the target loss ``L_T`` (bottom), log scale, one
    line per label: the geometric mean over seeds, with the ``band`` taken on the logarithms."""
    fig, axes = _figure(2, 2, 5.0, 3.6)
    for r, domain in enumerate(("source", "target")):
        for c, stat in enumerate(("max", "mean")):
            ax = axes[r, c]
            seeds = _draw_lines(ax, histories, f"grad_var_{domain}_{stat}", band, log=True)
            loss = f"L_{domain[0].upper()}"
            ax.set(title=f"{domain} loss {loss}: {stat} over steps", xlabel="epoch", ylabel=f"Var(grad {loss})",
                   yscale="log")
            _integer_epochs(ax)
            ax.grid(alpha=0.3)
            _legend(ax, seeds, band, log=True, fontsize=7)
    return _finish(fig, path, title)


def samples_figure(grids: dict[str, PathLike], path: PathLike | None = None, *, title: str = ""):
    """Figure 11: one image per label (a grid of generated samples), side by side."""
    from PIL import Image

    fig, axes = _figure(1, len(grids), 4.0, 4.4)
    for ax, (label, image_path) in zip(axes[0], grids.items()):
        with Image.open(image_path) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set(title=label, xticks=[], yticks=[])
    return _finish(fig, path, title)


# -- activations ------------------------------------------------------------------------------------


@torch.no_grad()
def capture(model: nn.Module, layer: str, images: Tensor, ids: Tensor | None = None, *, inputs: bool = False) -> Tensor:
    """The output (or, with ``inputs=True``, the first input) of ``model``'s module ``layer`` on ``images``, in eval mode."""
    import cbnorm

    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"the model has no module {layer!r}; its modules include {sorted(modules)[:12]}...")
    seen = []

    def hook(module, args, output):
        seen.append((args[0] if inputs else output).detach().clone())  # an in-place ReLU may follow

    handle = modules[layer].register_forward_hook(hook)
    model.eval()
    try:
        if ids is None:
            model(images)
        else:
            with cbnorm.cluster_context(ids):
                model(images)
    finally:
        handle.remove()
    return seen[0]


_COMPONENT_COLOURS = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def _mixture_1d(values: np.ndarray, k: int, seed: int = 0):
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(k, random_state=seed).fit(values.reshape(-1, 1))
    return gmm.weights_, gmm.means_.ravel(), np.sqrt(gmm.covariances_.ravel())


def activation_figure(activations: dict[str, Tensor], path: PathLike | None = None, k: int = 3,
                      channels: int = 128, max_values: int = 5000, *, title: str = "", columns: int = 3):
    """Figure 2: per model (a panel titled by its key; name the layer and epoch there), a histogram of
    the activations ``(N, C, *)`` of up to ``channels`` channels, the density of a ``k``-component
    Gaussian mixture fitted to them (solid green) and its weighted components (dashed), in a grid of
    ``columns`` panels a row."""
    columns = min(columns, len(activations))
    fig, axes = _figure(math.ceil(len(activations) / columns), columns, 4.2, 3.4)
    generator = np.random.default_rng(0)
    for ax in axes.flat[len(activations):]:
        ax.axis("off")
    for ax, (label, x) in zip(axes.flat, activations.items()):
        values = x[:, :channels].transpose(0, 1).reshape(-1).float().numpy()
        if len(values) > max_values:
            values = generator.choice(values, max_values, replace=False)
        weights, means, stds = _mixture_1d(values, k)
        grid = np.linspace(*np.percentile(values, [0.1, 99.9]), 400)
        components = weights[:, None] * np.exp(-0.5 * ((grid - means[:, None]) / stds[:, None]) ** 2) / (
            stds[:, None] * np.sqrt(2 * np.pi))
        ax.hist(values, bins=80, range=(grid[0], grid[-1]), density=True, color="0.75")
        ax.plot(grid, components.sum(0), color="green", linewidth=2, label="mixture pdf")
        for j, component in enumerate(components):  # any colour but the mixture's green
            ax.plot(grid, component, linestyle="--", linewidth=1.2, color=_COMPONENT_COLOURS[j % len(_COMPONENT_COLOURS)],
                    label=f"component {j + 1}")
        ax.set(xlabel="activation", ylabel="density")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    return _finish(fig, path, title)


def tsne_figure(rows: dict[str, Sequence[tuple[int, Tensor, Tensor]]], path: PathLike | None = None,
                seed: int = 0, *, classes: Sequence[str] | None = None, title: str = ""):
    """Figures 1 and 9: one row per model, one panel per snapshot ``(epoch, features (N, D),
    predicted (N,))``: the t-SNE embedding of the features, coloured by predicted class, with a legend
    naming the classes (``classes``, else their indices)."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    present = sorted({int(c) for snapshots in rows.values() for *_, predicted in snapshots for c in predicted.unique()})
    palette = colormaps["tab10" if max(present, default=0) < 10 else "tab20"]
    columns = max(len(snapshots) for snapshots in rows.values())
    fig, axes = _figure(len(rows), columns, 3.2, 3.2)
    for r, (label, snapshots) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.set(xticks=[], yticks=[])
            if c >= len(snapshots):
                ax.axis("off")
                continue
            epoch, features, predicted = snapshots[c]
            features = features.flatten(1).double().numpy()
            perplexity = min(30.0, (len(features) - 1) / 3)
            method = "exact" if len(features) <= 600 else "barnes_hut"  # exact is the faster below that
            embedded = TSNE(2, perplexity=perplexity, init="pca", method=method, random_state=seed).fit_transform(features)
            ax.scatter(embedded[:, 0], embedded[:, 1], c=[palette(int(p) % palette.N) for p in predicted], s=4)
            ax.set_title(f"{label}, epoch {epoch}", fontsize=9)
    handles = [Line2D([], [], marker="o", linestyle="", color=palette(c % palette.N),
                      label=classes[c] if classes is not None and c < len(classes) else f"class {c}") for c in present]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="predicted class")
    return _finish(fig, path, title)


def principal_components(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Scores ``(N, k)`` of ``x`` ``(N, D)`` (centred) on its first ``k`` principal axes, and the
    fraction of the variance each axis holds. Exact SVD in float64; each axis's sign makes its
    largest loading positive."""
    x = x.flatten(1).double()
    x = x - x.mean(0)
    _, singular, axes = torch.linalg.svd(x, full_matrices=False)
    axes = axes[:k]
    signs = axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()
    variance = singular.square()
    return x @ (axes * signs).T, variance[:k] / variance.sum()


def pca_figure(outputs: Tensor, groups: Tensor, names: Sequence[str], path: PathLike | None = None,
               components: int = 5, title: str = ""):
    """Figure 14: the first ``components`` principal components of ``outputs`` ``(N, D)``, pair by pair,
    each point coloured by its group (superclass) ``groups`` ``(N,)`` named by ``names``. Off the
    diagonal, one component against another; on it, each group's histogram of that component and
    (green) the density of all points (Gaussian kernel estimate)."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from scipy.stats import gaussian_kde

    if len(outputs) != len(groups):
        raise ValueError(f"expected one group per output, got {len(groups)} groups for {len(outputs)} outputs")
    scores, explained = principal_components(outputs, min(components, *outputs.flatten(1).shape))
    scores, groups, k = scores.numpy(), groups.numpy(), scores.shape[1]
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = [palette(g % palette.N) for g in range(len(names))]
    fig, axes = _figure(k, k, 2.4, 2.4)
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if i == j:
                bins = np.histogram_bin_edges(scores[:, i], 30)
                for g, name in enumerate(names):
                    if (groups == g).any():
                        ax.hist(scores[groups == g, i], bins=bins, density=True, histtype="step", color=colours[g])
                if np.ptp(scores[:, i]) > 0:
                    grid = np.linspace(bins[0], bins[-1], 200)
                    ax.plot(grid, gaussian_kde(scores[:, i])(grid), color="green", linewidth=1.5)
            else:
                ax.scatter(scores[:, j], scores[:, i], c=[colours[g] for g in groups], s=3, alpha=0.6, linewidths=0)
            if i == k - 1:
                ax.set_xlabel(f"PC{j + 1} ({explained[j]:.0%})", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"PC{i + 1} ({explained[i]:.0%})", fontsize=8)
            ax.tick_params(labelsize=6)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[g], label=name) for g, name in enumerate(names)]
    handles.append(Line2D([], [], color="green", label="pdf of all points"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6), fontsize=8, title=title or None)
    return _finish(fig, path)


# -- from run directories ----------------------------------------------------------------------------


class Activations(NamedTuple):
    """What :func:`run_activations` captured: ``values``, the ``layer`` they come from and the run's last ``epoch``."""

    values: Tensor
    layer: str
    epoch: int


def _load_run(run_dir: Path, data_dir: str | None = None, data=None):
    """The run's :class:`~cbnorm.experiments.train.Setup` (its model freshly initialised)."""
    from .train import TrainConfig, setup

    config, _ = read_metrics(run_dir)
    return setup(TrainConfig(**{**config, "data_dir": data_dir or config["data_dir"]}), data)


def _probe_batch(run, size: int, seed: int = 0):
    """A fixed random batch of ``size`` test images, normalised as in training, with their ids."""
    index = torch.randperm(len(run.test), generator=torch.Generator().manual_seed(seed))[:size]
    ids = None if run.test_ids is None else run.test_ids[index]
    images, _, ids = next(Loader(run.test.subset(index), size, run.mean, run.std, cluster_ids=ids).epoch())
    return images, ids


def _checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt to take activations from (committed results keep "
                                "only their metrics); train the run again, or plot its curves only")
    return path


def _snapshot_paths(run_dir: Path) -> list[Path]:
    paths = sorted((run_dir / "snapshots").glob("epoch-*.pt"))
    if not paths:
        raise FileNotFoundError(f"{run_dir} has no snapshots/epoch-*.pt for t-SNE; train it with --snapshots 4 "
                                "(the weights at 25/50/75/100% of the epochs)")
    return paths


def run_activations(run_dir: PathLike, layer: str | None = None, batch: int = 256, data_dir=None,
                    data=None) -> Activations:
    """Activations of ``layer`` (default: the model's ``probe_layer``) of the run's final model on a fixed test batch."""
    run_dir = Path(run_dir)
    checkpoint = torch.load(_checkpoint(run_dir), map_location="cpu", weights_only=True)
    run = _load_run(run_dir, data_dir, data)
    run.model.load_state_dict(checkpoint["model"])
    images, ids = _probe_batch(run, batch)
    layer = layer or run.model.probe_layer
    return Activations(capture(run.model, layer, images, ids), layer, len(checkpoint["history"]))


def run_snapshots(run_dir: PathLike, batch: int = 512, data_dir=None, data=None) -> list[tuple[int, Tensor, Tensor]]:
    """``(epoch, classifier inputs, predicted classes)`` on a fixed test batch, for each saved snapshot."""
    run_dir = Path(run_dir)
    paths = _snapshot_paths(run_dir)
    run = _load_run(run_dir, data_dir, data)
    images, ids = _probe_batch(run, batch)
    snapshots = []
    for path in paths:
        run.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        features = capture(run.model, "classifier", images, ids, inputs=True)
        with torch.no_grad():
            predicted = run.model.classifier(features).argmax(1)
        snapshots.append((int(path.stem.split("-")[1]), features, predicted))
    return snapshots


def plot_runs(
    run_dirs: Sequence[PathLike],
    out: PathLike,
    *,
    metrics: Sequence[str] = ("test_error",),
    activations: bool = False,
    tsne: bool = False,
    layer: str | None = None,
    points: int = 512,
    data_dir: str | None = None,
) -> list[Path]:
    """Draw ``out/curves.png`` for the runs and, on request, ``out/activations.png`` (Figure 2, from
    each run's final model) and ``out/tsne-<run>.png`` (Figure 1, from each run's snapshots), both
    on the same ``points`` test images. Every run is checked for what the figures need before any is drawn."""
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    histories = {d.name: [read_metrics(d)[1]] for d in run_dirs}
    for d in run_dirs:
        if activations:
            _checkpoint(d)
        if tsne:
            _snapshot_paths(d)
    paths = [out / "curves.png"]
    curves_figure({"": histories}, paths[-1], metrics, title=f"{', '.join(histories)}: curves per epoch")
    if activations:
        captured = [run_activations(d, layer, points, data_dir=data_dir) for d in run_dirs]
        paths.append(out / "activations.png")
        activation_figure({f"{d.name}: {a.layer}, epoch {a.epoch}": a.values for d, a in zip(run_dirs, captured)},
                          paths[-1], title=f"Activations on {points} test images, with a 3-component mixture fit")
    if tsne:
        for d in run_dirs:
            config = read_metrics(d)[0]
            data = load_dataset(config["dataset"], data_dir or config["data_dir"])
            paths.append(out / f"tsne-{d.name}.png")
            tsne_figure({d.name: run_snapshots(d, points, data=data)}, paths[-1], classes=data.classes,
                        title=f"{d.name}: t-SNE of the classifier's inputs on {points} test images")
    return paths
