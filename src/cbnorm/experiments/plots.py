"""Figures: training curves (Figures 5, 8 and 13), activation distributions with their fitted mixture
(Figure 2), t-SNE of activations at training snapshots (Figures 1 and 9) and PCA of a model's outputs
coloured by superclass (Figure 14).

    cbnorm plot runs/bn runs/ucb                        # test-error curves of the runs -> curves.png
    cbnorm plot runs/bn runs/ucb --activations --tsne   # and Figure 2 / Figure 1 from their checkpoints

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .data import Loader
from .metrics import read_metrics

__all__ = ["activation_figure", "capture", "curves_figure", "pca_figure", "plot_runs", "principal_components",
           "run_activations", "run_snapshots", "tsne_figure"]

PathLike = Union[str, os.PathLike]
Histories = Sequence[Sequence[dict]]  # one history per seed


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def curves_figure(panels: dict[str, dict[str, Histories]], path: PathLike, metrics: Sequence[str] = ("test_error",)):
    """One row per metric, one column per panel; in each, one line per label: the mean over its
    histories (seeds), with a band of ± one standard deviation when there are several."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(metrics), len(panels))
    if any(len(histories) > 1 for lines in panels.values() for histories in lines.values()):
        fig.text(0.005, 0.005, "shaded: mean ± 1 sample std over seeds", fontsize=7)
    for col, (title, lines) in enumerate(panels.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            for label, histories in lines.items():
                length = min(len(h) for h in histories)
                if length == 0:
                    continue
                values = np.array([[r[metric] for r in h[:length]] for h in histories], dtype=float)
                epochs = [r["epoch"] for r in histories[0][:length]]
                mean = values.mean(0)
                (line,) = ax.plot(epochs, mean, label=label, marker="o" if length < 15 else None, markersize=3)
                if len(histories) > 1:
                    std = values.std(0, ddof=1)
                    ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            ax.set(title=title, xlabel="epoch", ylabel=metric.replace("_", " "))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


# -- activations ------------------------------------------------------------------------------------


@torch.no_grad()
def capture(model: nn.Module, layer: str, images: Tensor, ids: Optional[Tensor] = None, *, inputs: bool = False) -> Tensor:
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


def activation_figure(activations: dict[str, Tensor], path: PathLike, k: int = 3, channels: int = 128,
                      max_values: int = 5000, title: str = "") -> Path:
    """Figure 2: per model, a histogram of the activations ``(N, C, *)`` of up to ``channels``
    channels, the density of a ``k``-component Gaussian mixture fitted to them (solid green) and
    its weighted components (dashed)."""
    fig, axes = _figure(1, len(activations), 4.2, 3.4)
    generator = np.random.default_rng(0)
    for ax, (label, x) in zip(axes[0], activations.items()):
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
        ax.set(title=label, xlabel="activation", ylabel="density")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def tsne_figure(rows: dict[str, Sequence[tuple[int, Tensor, Tensor]]], path: PathLike, seed: int = 0) -> Path:
    """Figures 1 and 9: one row per model, one panel per snapshot ``(epoch, features (N, D),
    predicted (N,))``: the t-SNE embedding of the features, coloured by predicted class."""
    from sklearn.manifold import TSNE

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
            ax.scatter(embedded[:, 0], embedded[:, 1], c=predicted.numpy(), cmap="tab10" if int(predicted.max()) < 10
                       else "tab20", s=4)
            ax.set_title(f"{label}, epoch {epoch}", fontsize=9)
    return _save(fig, path)


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


def pca_figure(outputs: Tensor, groups: Tensor, names: Sequence[str], path: PathLike, components: int = 5,
               title: str = "") -> Path:
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
    return _save(fig, path)


# -- from run directories ----------------------------------------------------------------------------


def _load_run(run_dir: Path, data_dir: Optional[str] = None, data=None):
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


def run_activations(run_dir: PathLike, layer: Optional[str] = None, batch: int = 256, data_dir=None, data=None) -> Tensor:
    """Activations of ``layer`` (default: the model's ``probe_layer``) of the run's final model on a fixed test batch."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir, data_dir, data)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    run.model.load_state_dict(state)
    images, ids = _probe_batch(run, batch)
    return capture(run.model, layer or run.model.probe_layer, images, ids)


def run_snapshots(run_dir: PathLike, batch: int = 512, data_dir=None, data=None) -> list[tuple[int, Tensor, Tensor]]:
    """``(epoch, classifier inputs, predicted classes)`` on a fixed test batch, for each saved snapshot."""
    run_dir = Path(run_dir)
    paths = sorted((run_dir / "snapshots").glob("epoch-*.pt"))
    if not paths:
        raise FileNotFoundError(f"{run_dir} has no snapshots/epoch-*.pt; train it with --snapshots 4")
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
    layer: Optional[str] = None,
    points: int = 512,
    data_dir: Optional[str] = None,
) -> list[Path]:
    """Draw ``out/curves.png`` for the runs and, on request, ``out/activations.png`` (Figure 2, from
    each run's final model) and ``out/tsne-<run>.png`` (Figure 1, from each run's snapshots), both
    on the same ``points`` test images."""
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    histories = {d.name: [read_metrics(d)[1]] for d in run_dirs}
    paths = [curves_figure({"": histories}, out / "curves.png", metrics)]
    if activations:
        captured = {d.name: run_activations(d, layer, points, data_dir=data_dir) for d in run_dirs}
        paths.append(activation_figure(captured, out / "activations.png"))
    if tsne:
        for d in run_dirs:
            paths.append(tsne_figure({d.name: run_snapshots(d, points, data_dir=data_dir)}, out / f"tsne-{d.name}.png"))
    return paths
