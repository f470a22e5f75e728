import json
import subprocess
import sys

import numpy as np
import pytest

import cbnorm
from cbnorm.experiments import reproduce as rep
from cbnorm.experiments.cli import main
from cbnorm.experiments.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_reproduce_table5_smoke(tmp_path, data_root, capsys):
    """The CI reproduction: every Table V model on a small real CIFAR-10 subset, table and figures."""
    argv = ["reproduce", "table5", "--dataset", "cifar10", "--scale", "smoke", "--out", str(tmp_path),
            "--data-dir", str(data_root), "--no-progress"]
    assert main(argv) == 0
    root = tmp_path / "results" / "table5-cifar10" / "smoke"
    table = (root / "table.md").read_text()
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line and "model" not in line}
    assert len(rows) == 10
    assert rows[("UCB-Norm", "0.005")].rstrip(" |").endswith("86.04 | 86.04 | 87.49 | 87.49")  # the paper's
    summary = json.loads((root / "summary.json").read_text())
    measured = [row for row in summary["rows"] if row["status"] == "ok"]
    assert len(measured) == 10 and all(0 <= mean <= 100 for row in measured for mean, _ in row["ours"])
    config, history = read_metrics(root / "runs" / "scb-lr0.005-seed0")
    assert len(history) == 2 and config["train_size"] == 128 and config["batch_size"] == 256
    assert config["clusters"].endswith("clusters-cifar10-gmm-k3-train-fit.npz") and config["num_clusters"] == 3
    assert is_png(root / "figure5.png") and is_png(root / "figure2.png")
    assert "Command: `cbnorm reproduce table5" in table


def tiny(seeds=(0,)):
    return rep.Scale("tiny", 64, 64, 2, seeds)


def test_rows_of_unregistered_layers_are_missing_never_faked(tmp_path, monkeypatch):
    experiment = rep.Experiment("table5", "t", "shallow_cnn", (("BN", "batchnorm"), ("MN", "mn")), (0.001,), 3,
                                "adamw", "constant", 64, ("test_error",), "figure5", "figure1", "test_acc")
    registry = dict(cbnorm.factory._NORM_LAYERS)
    monkeypatch.setattr(cbnorm.factory, "_NORM_LAYERS", {k: v for k, v in registry.items() if k != "mn"})
    root = rep.reproduce(experiment, "digits", tiny((0, 1)), out=tmp_path, progress=False, command="test")
    table = (root / "table.md").read_text()
    assert "| MN | 0.001 | missing: no 'mn' layer is registered" in table and "±" in table  # two seeds
    monkeypatch.setattr(cbnorm.factory, "_NORM_LAYERS", registry)
    root = rep.reproduce(experiment, "digits", tiny((0, 1)), out=tmp_path, progress=False, command="test")
    summary = json.loads((root / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["ok", "ok"]
    mean, std = summary["rows"][1]["ours"][3]
    runs = [read_metrics(root / "runs" / f"mn-lr0.001-seed{s}")[1][-1]["test_acc"] * 100 for s in (0, 1)]
    assert mean == pytest.approx(np.mean(runs)) and std == pytest.approx(np.std(runs, ddof=1))
    assert json.loads((root / "runs" / "mn-lr0.001-seed0" / "config.json").read_text())["norm"] == "mn"


def test_reproduce_tsne_at_quarters_of_training(tmp_path):
    experiment = rep.Experiment("table5", "t", "shallow_cnn", (("UCB-Norm", "ucb"),), (0.001,), 3, "adamw", "constant",
                                64, ("test_error",), "figure5", "figure1", "test_acc")
    root = rep.reproduce(experiment, "digits", rep.Scale("tiny", 64, 64, 4, (0,), tsne_points=32), out=tmp_path,
                         progress=False)
    snapshots = sorted(p.name for p in (root / "runs" / "ucb-lr0.001-seed0" / "snapshots").iterdir())
    assert snapshots == ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    assert is_png(root / "figure1.png")


def test_reproduce_densenet_protocol(tmp_path, capsys):
    root = rep.reproduce("densenet40", "digits", rep.Scale("tiny", 32, 32, 2, (0,)), out=tmp_path, progress=False)
    summary = json.loads((root / "summary.json").read_text())
    assert [row["label"] for row in summary["rows"]] == ["BN", "MN", "SCB-Norm-base", "SCB-Norm", "UCB-Norm"]
    config, history = read_metrics(root / "runs" / "ucb-lr0.1-seed0")
    assert config["model"] == "densenet40" and config["num_clusters"] == 5 and config["batch_size"] == 64
    assert config["optimizer"] == "sgd" and config["schedule"] == "step"
    assert [row["lr"] for row in history] == pytest.approx([0.1, 0.001])  # /10 at 50% and at 75%
    assert read_metrics(root / "runs" / "none-lr0.1-seed0")[0]["norm"] == "none"  # BN: the plain DenseNet
    assert is_png(root / "figure8.png") and is_png(root / "figure2.png")
    assert rep._paper_numbers(rep.EXPERIMENTS["densenet100"], "cifar100", "scb", 0.1)[3] == 28.0
    assert rep._paper_numbers(rep.EXPERIMENTS["densenet100"], "cifar10", "scb", 0.1) is None


def test_demo_and_plots(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--train-size", "128", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("BatchNorm ", "SCB-Norm ", "UCB-Norm "))]
    assert len(lines) == 3 and all("%" in line for line in lines)
    root = tmp_path / "results" / "demo-digits"
    assert is_png(root / "demo.png")

    run = tmp_path / "runs" / "scb"
    assert main(["train", "--dataset", "digits", "--train-size", "64", "--test-size", "64", "--epochs", "2",
                 "--batch-size", "64", "--norm", "scb", "--norm-kwargs", "unknown=map", "--no-test-clusters",
                 "--snapshots", "2", "--out", str(run), "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["norm_kwargs"] == {"unknown": "map"} and config["test_clusters"] is False
    assert main(["plot", str(run), str(root / "runs" / "ucb"), "--out", str(tmp_path / "fig"), "--activations",
                 "--points", "32"]) == 0
    assert is_png(tmp_path / "fig" / "curves.png") and is_png(tmp_path / "fig" / "activations.png")
    assert main(["plot", str(run), "--tsne", "--points", "32", "--metric", "test_error", "train_loss"]) == 0
    assert is_png(run / "tsne-scb.png") and is_png(run / "curves.png")


def test_clusters_command_feeds_training(tmp_path, capsys):
    ids = tmp_path / "ids.npz"
    assert main(["clusters", "digits", "--k", "4", "--method", "kmeans", "--out", str(ids)]) == 0
    assert "4 clusters (kmeans k=4 seed=0) of digits" in capsys.readouterr().out
    with np.load(ids) as z:
        assert z["train"].shape == (1437,) and z["test"].shape == (360,) and int(z["k"]) == 4
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--train-size", "64", "--test-size", "64", "--epochs", "1",
                 "--norm", "scb", "--clusters", str(ids), "--out", str(run), "--no-progress"]) == 0
    assert "scb (K=4 clusters: kmeans k=4 seed=0)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["train", "--dataset", "digits", "--norm", "groupnorm"], "unknown norm layer 'groupnorm'; expected one of"),
    (["train", "--dataset", "svhn", "--data-dir", "{tmp}"], "svhn: {tmp}/svhn/train_32x32.mat is missing"),
    (["train", "--epochs", "0"], "expected epochs to be a positive int, got 0"),
    (["data", "verify"], "needs a data set name"),
    (["plot", "{tmp}"], "is not a run directory: expected {tmp}/metrics.json"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("{tmp}", str(tmp_path)) in err


def test_python_dash_m_and_the_library_alone(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cbnorm", "reproduce", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "{smoke,small,paper}" in result.stdout
    alone = "import sys, cbnorm; assert not [m for m in sys.modules if m.startswith('cbnorm.experiments')]"
    assert subprocess.run([sys.executable, "-c", alone]).returncode == 0
