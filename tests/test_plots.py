"""The figures say what they show: titles, legends, what the shaded band is, ticks, nothing clipped;
``cbnorm plot`` checks a run before it draws anything."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from cbnorm.experiments import plots
from cbnorm.experiments.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def history(values, key="test_error"):
    return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def band_limits(ax):
    """The lower and upper edge of each shaded band on ``ax``, as ``(epochs, low, high)``."""
    bands = []
    for collection in ax.collections:
        vertices = collection.get_paths()[0].vertices
        x = np.unique(vertices[:, 0])
        low = np.array([vertices[vertices[:, 0] == e, 1].min() for e in x])
        high = np.array([vertices[vertices[:, 0] == e, 1].max() for e in x])
        bands.append((x, low, high))
    return bands


def assert_inside(fig, texts):
    fig.draw_without_rendering()
    for text in texts:
        box = text.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y0 >= 0 and box.y1 <= fig.bbox.y1, text.get_text()


TWO_SEEDS = {"BN": [history([0.9, 0.7, 0.5]), history([0.8, 0.6, 0.6])],
             "MN": [history([0.9, 0.7, 0.5]), history([0.8, 0.6, 0.6])]}  # MN exactly under BN


class TestCurvesFigure:
    def test_each_axes_names_its_metric(self):
        lines = {"AdaMatch": [[{"epoch": 1, "source_acc": 0.5, "target_acc": 0.2, "loss": 2.0, "mask": 0.3}]]}
        fig = plots.curves_figure({"": lines}, None, ("source_acc", "target_acc", "loss", "mask"), title="AdaMatch")
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["source test accuracy", "target test accuracy", "training loss",
                          "mask rate (target images kept)"]
        assert fig.get_suptitle() == "AdaMatch"

    def test_panels_with_several_metrics_name_both(self):
        lines = {"BN": [[{"epoch": 1, "train_loss": 1.0, "test_loss": 2.0}]]}
        fig = plots.curves_figure({"lr = 0.1": lines}, None, ("train_loss", "test_loss"))
        assert [ax.get_title() for ax in fig.axes] == ["lr = 0.1: training loss", "lr = 0.1: test loss"]

    def test_the_legend_says_what_the_band_is(self):
        ax = plots.curves_figure({"lr = 0.001": TWO_SEEDS}).axes[0]
        assert legend_texts(ax) == ["BN", "MN", "band: ±1 std over 2 seeds"]
        (x, low, high), _ = band_limits(ax)
        values = np.array([[0.9, 0.7, 0.5], [0.8, 0.6, 0.6]])
        np.testing.assert_allclose(x, [1, 2, 3])
        np.testing.assert_allclose(high - low, 2 * values.std(0, ddof=1))

    def test_the_confidence_band_is_student_t(self):
        runs = [history([0.9, 0.5]), history([0.8, 0.6]), history([0.6, 0.6])]
        ax = plots.curves_figure({"": {"BN": runs}}, band="ci").axes[0]
        assert legend_texts(ax)[-1] == "band: 95% CI of the mean over 3 seeds (Student t)"
        values = np.array([[0.9, 0.5], [0.8, 0.6], [0.6, 0.6]])
        low, high = stats.t.interval(0.95, 2, loc=values.mean(0), scale=stats.sem(values, axis=0))
        (_, got_low, got_high), = band_limits(ax)
        np.testing.assert_allclose(got_low, low)
        np.testing.assert_allclose(got_high, high)

    def test_one_seed_has_no_band_and_no_band_entry(self):
        ax = plots.curves_figure({"": {"BN": [history([0.9, 0.7])]}}).axes[0]
        assert legend_texts(ax) == ["BN"] and not ax.collections

    def test_a_line_under_another_still_shows(self):
        ax = plots.curves_figure({"": TWO_SEEDS}).axes[0]
        bn, mn = ax.get_lines()
        assert (bn.get_marker(), bn.get_linestyle()) != (mn.get_marker(), mn.get_linestyle())
        assert mn.get_markersize() < bn.get_markersize()  # the hollow marker drawn later sits inside

    def test_epoch_ticks_are_integers(self):
        ax = plots.curves_figure({"": {"BN": [history([0.9, 0.7, 0.6, 0.5])]}}).axes[0]
        ax.figure.draw_without_rendering()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)

    def test_an_unknown_band_is_refused(self):
        with pytest.raises(ValueError, match=r"expected band to be one of \['ci', 'std'\], got 'sem'"):
            plots.curves_figure({"": TWO_SEEDS}, band="sem")


def gradient_histories(seed_values):
    keys = [f"grad_var_{d}_{s}" for d in ("source", "target") for s in ("max", "mean")]
    return [[{"epoch": e + 1, **{k: v for k in keys}} for e, v in enumerate(values)] for values in seed_values]


class TestGradientVarianceFigure:
    def test_titles_ticks_scale_and_band(self):
        lines = {"AdaMatch": gradient_histories([[1e-4, 1e-5, 4e-5], [4e-4, 1e-3, 1e-5]]),
                 "AdaMatch+SCB-Norm": gradient_histories([[2e-4, 2e-5, 3e-5]])}
        fig = plots.gradient_variance_figure(lines, title="Figure 12")
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["source loss L_S: max over steps", "source loss L_S: mean over steps",
                          "target loss L_T: max over steps", "target loss L_T: mean over steps"]
        fig.draw_without_rendering()
        for ax in fig.axes:
            assert ax.get_yscale() == "log"
            assert all(float(t).is_integer() for t in ax.get_xticks())
            assert legend_texts(ax)[-1] == "band: ×/÷ 1 geometric std over 2 seeds"
        logs = np.log([[1e-4, 1e-5, 4e-5], [4e-4, 1e-3, 1e-5]])
        (_, low, high), = band_limits(fig.axes[0])
        np.testing.assert_allclose(np.log(high) - np.log(low), 2 * logs.std(0, ddof=1))
        np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), np.exp(logs.mean(0)))
        assert_inside(fig, [ax.title for ax in fig.axes] + [fig._suptitle])


def test_sample_grids_titles_are_not_clipped(tmp_path):
    grids = {}
    for label in ("DCGAN-BN", "DCGAN-MN", "DCGAN-UCB-Norm"):
        grids[label] = tmp_path / f"{label}.png"
        Image.fromarray(np.zeros((274, 274, 3), np.uint8)).save(grids[label])
    fig = plots.samples_figure(grids, tmp_path / "figure11.png", title="Figure 11: samples after the last epoch")
    assert [ax.get_title() for ax in fig.axes] == list(grids)
    assert_inside(fig, [ax.title for ax in fig.axes] + [fig._suptitle])
    assert (tmp_path / "figure11.png").is_file()


def test_activations_in_a_grid_titled_by_layer_and_epoch():
    activations = {f"model {i}: norm, epoch 4": torch.randn(16, 4, 3, 3) for i in range(5)}
    fig = plots.activation_figure(activations, k=2, title="Figure 2")
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 6 and len(shown) == 5  # 2 rows of 3
    assert [ax.get_title() for ax in shown] == list(activations)
    assert legend_texts(shown[0]) == ["mixture pdf", "component 1", "component 2"]
    assert fig.get_suptitle() == "Figure 2"


def test_tsne_has_a_legend_of_classes_with_one_colour_each():
    torch.manual_seed(0)
    features = torch.randn(20, 5)
    first, second = torch.tensor([0, 2] * 10), torch.tensor([2, 3] * 10)  # class 2 in both panels
    fig = plots.tsne_figure({"SCB-Norm": [(1, features, first), (2, features, second)]},
                            classes=["airplane", "automobile", "bird", "cat"], title="Figure 1")
    legend = fig.legends[0]
    assert legend.get_title().get_text() == "predicted class"
    assert [t.get_text() for t in legend.get_texts()] == ["airplane", "bird", "cat"]
    left, right = (ax.collections[0].get_facecolors() for ax in fig.axes)
    np.testing.assert_allclose(left[0], left[2])
    np.testing.assert_allclose(left[1], right[0])  # "bird" in both panels: the same colour
    assert [ax.get_title() for ax in fig.axes] == ["SCB-Norm, epoch 1", "SCB-Norm, epoch 2"]


def fake_run(folder, checkpoint=False):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"config": {}, "history": history([0.9, 0.8])}))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"")
    return folder


@pytest.mark.parametrize("flags,checkpoint,message", [
    (["--tsne"], True, "has no snapshots/epoch-*.pt for t-SNE; train it with --snapshots 4"),
    (["--activations", "--tsne"], True, "has no snapshots/epoch-*.pt for t-SNE; train it with --snapshots 4"),
    (["--activations"], False, "has no checkpoint.pt to take activations from"),
])
def test_plot_checks_every_run_before_drawing(tmp_path, capsys, flags, checkpoint, message):
    good = fake_run(tmp_path / "good", checkpoint=True)
    (good / "snapshots").mkdir()
    (good / "snapshots" / "epoch-0001.pt").write_bytes(b"")
    bad = fake_run(tmp_path / "bad", checkpoint=checkpoint)
    out = tmp_path / "figures"
    assert main(["plot", str(good), str(bad), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad} {message}" in err
    assert not out.exists()  # nothing drawn


def test_metric_labels():
    assert plots.metric_label("mask") == "mask rate (target images kept)"
    assert plots.metric_label("grad_var_source_max") == "grad var source max"
