"""Redraw the committed figures that need only the runs' metrics (curves, gradient variance, DCGAN
samples), with the plotting code of this checkout; nothing is trained. Figures drawn from checkpoints
(Figure 2, t-SNE, PCA) cannot be redrawn: committed runs keep no checkpoints.

    python scripts/redraw_figures.py results /tmp/redrawn   # then compare and copy into results/
"""

import json
import sys
from pathlib import Path

from cbnorm.experiments import adamatch, gan, reproduce, superclass
from cbnorm.experiments.fid import Metric
from cbnorm.experiments.metrics import read_metrics


def histories(root: Path) -> dict[str, list[dict]]:
    """Each run folder's history, by folder name."""
    return {d.name: read_metrics(d)[1] for d in sorted((root / "runs").iterdir()) if (d / "metrics.json").is_file()}


def main(source: Path, target: Path, scale: str = "small") -> None:
    for name in ("table5-cifar10", "densenet40-cifar10", "densenet100-cifar10"):
        root = source / name / scale
        summary = json.loads((root / "summary.json").read_text())
        experiment, runs = reproduce.EXPERIMENTS[summary["experiment"]], histories(root)
        keys = [(norm, lr, s) for _, norm in experiment.norms for lr in experiment.lrs for s in summary["seeds"]]
        found = {key: runs[reproduce._run_name(*key)] for key in keys if reproduce._run_name(*key) in runs}
        reproduce.curves_figures(experiment, summary["dataset"], reproduce.SCALES[summary["experiment"]][scale],
                                 summary["seeds"], target / name / scale, found)

    root = source / "adamatch-mnist-digits" / scale
    summary, runs = json.loads((root / "summary.json").read_text()), histories(root)
    lines = {label: [runs[f"{norm}-seed{s}"] for s in summary["seeds"] if f"{norm}-seed{s}" in runs]
             for label, norm in adamatch.ADAMATCH_NORMS}
    adamatch.adamatch_figures(target / root.relative_to(source), lines, summary["source"], summary["target"], scale)

    root = source / "dcgan-cifar10" / scale
    summary, runs = json.loads((root / "summary.json").read_text()), histories(root)
    seeds, epochs = summary["scale"]["seeds"], summary["scale"]["epochs"]
    lines = {label: [runs[f"{norm}-seed{s}"] for s in seeds if f"{norm}-seed{s}" in runs] for label, norm in gan.GAN_NORMS}
    grids = {label: root / "runs" / f"{norm}-seed{s}" / "samples" / f"epoch-{epochs:04d}.png"
             for label, norm in gan.GAN_NORMS for s in reversed(seeds) if f"{norm}-seed{s}" in runs}
    gan.dcgan_figures(target / root.relative_to(source), lines, Metric(**summary["metric"]), grids,
                      f"{summary['dataset']}, {scale} scale")

    for model in ("vit", "oxford_cnn"):
        root = source / f"superclass-{model}-cifar10" / scale
        summary, runs = json.loads((root / "summary.json").read_text()), histories(root)
        experiment = superclass.EXPERIMENTS[model]
        names = {label: [superclass._run_name(norm, experiment.lr, s) for s in summary["seeds"]]
                 for label, norm in experiment.norms}
        lines = {label: [runs[n] for n in run_names if n in runs] for label, run_names in names.items()}
        superclass.superclass_curves(experiment, summary["dataset"], scale, target / root.relative_to(source), lines)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
