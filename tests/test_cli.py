import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

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
    rows = {}  # the first table's row of each (model, lr): the paired-difference table follows it
    for line in table.splitlines():
        if line.startswith("| ") and "---" not in line and "model" not in line:
            rows.setdefault(tuple(cell.strip() for cell in line.split("|")[1:3]), line)
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
    assert main(["clusters", "digits", "--k", "2", "--out", str(ids)]) == 2  # never replaced unasked
    assert f"{ids} exists; pass --overwrite to replace it" in capsys.readouterr().err
    with np.load(ids) as z:
        assert int(z["k"]) == 4
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--train-size", "64", "--test-size", "64", "--epochs", "1",
            "--norm", "scb", "--clusters", str(ids), "--out", str(run), "--no-progress"]
    assert main(argv) == 2  # config.json must record the K that runs: the file's 4, not the default 3
    assert "expected num_clusters=4, the number of kmeans k=4 seed=0 clusters" in capsys.readouterr().err
    assert main([*argv, "--num-clusters", "4"]) == 0
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


@pytest.mark.parametrize("argv,message", [
    (["dcgan", "--depth", "40"], "--depth: only the densenet experiment uses it, not dcgan"),
    (["table5", "--model", "vit"], "--model: only the superclass experiment uses it, not table5"),
    (["superclass", "--fid-features", "auto"], "--fid-features: only the dcgan experiment uses it, not superclass"),
    (["densenet", "--source", "mnist"], "--source: only the adamatch experiment uses it, not densenet"),
    (["table5", "--target", "digits"], "--target: only the adamatch experiment uses it, not table5"),
    (["dcgan", "--norms", "ucb"], "--norms: only the adamatch experiment uses it, not dcgan"),
    (["adamatch", "--dataset", "cifar10"],
     "--dataset: only the table5, densenet, superclass and dcgan experiments use it, not adamatch"),
])
def test_reproduce_refuses_an_option_its_experiment_does_not_use(tmp_path, capsys, argv, message):
    """Each experiment's own options, given to another (even at their default value): one line, status 2, nothing
    run."""
    assert main(["reproduce", *argv, "--scale", "smoke", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cbnorm reproduce: error: {message}"
    assert not (tmp_path / "results").exists()


EXPERIMENTS = ("table5", "densenet", "superclass", "dcgan", "adamatch")


def _reproductions(monkeypatch) -> list:
    """Each experiment's reproduction function replaced by one that records its call ``(name, args, kwargs)``."""
    from cbnorm.experiments import adamatch, gan, superclass

    calls = []
    for module, name in ((rep, "reproduce"), (superclass, "reproduce_superclass"), (gan, "reproduce_dcgan"),
                         (adamatch, "reproduce_adamatch")):
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: calls.append((_name, args, kwargs)))
    return calls


def test_reproduce_resolves_each_experiments_defaults(tmp_path, monkeypatch):
    """Options not given take the default their help states, for the experiment that uses them."""
    from cbnorm.experiments import adamatch

    calls = _reproductions(monkeypatch)
    for experiment in EXPERIMENTS:
        assert main(["reproduce", experiment, "--out", str(tmp_path), "--data-dir", str(tmp_path)]) == 0
    (_, table5, _), (_, densenet, _), (_, superclass_args, _), (_, dcgan, dcgan_options), (_, da, da_options) = calls
    assert table5[:2] == ("table5", "cifar10") and densenet[:2] == ("densenet40", "cifar10")
    assert superclass_args[:2] == ("vit", "cifar10") and dcgan[0] == "cifar10"
    assert dcgan_options["fid_features"] == "auto" and da[:2] == ("mnist", "digits")
    assert [label for label, _ in da_options["norms"]] == [label for label, _ in adamatch.ADAMATCH_NORMS]
    assert "fid_features" not in da_options and all(kwargs["speed_settings"] == {} for *_, kwargs in calls)


def test_reproduce_gives_the_speed_flags_to_every_experiment(tmp_path, monkeypatch):
    """Only the speed flags given, as given, whichever the experiment (the DCGAN and AdaMatch too)."""
    calls = _reproductions(monkeypatch)
    for experiment in EXPERIMENTS:
        assert main(["reproduce", experiment, "--no-bf16", "--compile", "--out", str(tmp_path)]) == 0
    assert [kwargs["speed_settings"] for *_, kwargs in calls] == [{"bf16": False, "compile": True}] * 5


def test_python_dash_m_and_the_library_alone(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cbnorm", "reproduce", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "{smoke,small,paper,converge}" in result.stdout
    alone = "import sys, cbnorm; assert not [m for m in sys.modules if m.startswith('cbnorm.experiments')]"
    assert subprocess.run([sys.executable, "-c", alone]).returncode == 0


TINY_TRAIN = ["train", "--dataset", "digits", "--train-size", "64", "--test-size", "64", "--batch-size", "64",
              "--no-progress"]


class TestTheCommandLineKeepsWork:
    def test_resume_without_a_checkpoint_is_an_error(self, tmp_path, capsys):
        assert main(["train", "--out", str(tmp_path / "typo"), "--resume"]) == 2
        assert capsys.readouterr().err.strip() == (f"cbnorm train: error: nothing to resume: {tmp_path / 'typo'} does "
                                                   f"not exist; start the run without --resume")
        assert not (tmp_path / "typo").exists()
        assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
        assert f"{tmp_path} holds no checkpoint.pt" in capsys.readouterr().err

    def test_a_users_folder_needs_overwrite(self, tmp_path, capsys):
        (tmp_path / "notes.txt").write_text("mine")
        assert main(TINY_TRAIN + ["--epochs", "1", "--out", str(tmp_path)]) == 2
        assert "is not empty (notes.txt) and holds no run; pass --overwrite" in capsys.readouterr().err
        assert main(TINY_TRAIN + ["--epochs", "1", "--out", str(tmp_path), "--overwrite"]) == 0
        assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoint.pt").is_file()

    def test_resume_with_more_epochs(self, tmp_path, capsys):
        assert main(TINY_TRAIN + ["--epochs", "2", "--out", str(tmp_path)]) == 0
        assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "3", "--no-progress"]) == 0
        assert "epochs 2 -> 3" in capsys.readouterr().out
        assert [row["epoch"] for row in read_metrics(tmp_path)[1]] == [1, 2, 3]

    def test_ctrl_c_says_how_to_continue(self, tmp_path, capsys, monkeypatch):
        from cbnorm.experiments import train as train_module

        train_epoch = train_module._train_epoch

        def interrupted_at_epoch_2(model, loader, epoch, *args):
            if epoch == 2:
                raise KeyboardInterrupt
            return train_epoch(model, loader, epoch, *args)

        monkeypatch.setattr(train_module, "_train_epoch", interrupted_at_epoch_2)
        argv = TINY_TRAIN + ["--epochs", "3", "--out", str(tmp_path / "run"), "--overwrite"]
        assert main(argv) == 130
        err = capsys.readouterr().err.strip()
        command = "cbnorm " + " ".join(a for a in argv if a != "--overwrite") + " --resume"
        assert err == f"interrupted after epoch 1; continue with: {command}"
        assert len(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"]) == 1
        monkeypatch.setattr(train_module, "_train_epoch", train_epoch)
        assert main(command.split()[1:]) == 0
        assert "resumed after epoch 1" in capsys.readouterr().out
        assert len(read_metrics(tmp_path / "run")[1]) == 3

    def test_ctrl_c_in_a_subprocess(self, tmp_path):
        """A real SIGINT: one line, status 130, the checkpoint intact."""
        run = tmp_path / "run"
        argv = [sys.executable, "-m", "cbnorm", *TINY_TRAIN, "--epochs", "200", "--out", str(run)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (run / "metrics.json").exists() or not read_metrics(run)[1]:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=60)[1].strip()
        assert process.returncode == 130
        epochs = len(torch.load(run / "checkpoint.pt", weights_only=True)["history"])
        assert err.splitlines()[-1] == f"interrupted after epoch {epochs}; continue with: cbnorm " \
            + " ".join(TINY_TRAIN + ["--epochs", "200", "--out", str(run), "--resume"])
        assert "Traceback" not in err and not (run / "run.lock").exists()

    def test_a_second_run_into_the_same_folder_is_refused(self, tmp_path, capsys):
        run = tmp_path / "run"
        argv = [sys.executable, "-m", "cbnorm", *TINY_TRAIN, "--epochs", "200", "--out", str(run)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (run / "run.lock").exists():
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            assert main(TINY_TRAIN + ["--epochs", "200", "--out", str(run)]) == 2  # the same command, twice
            assert f"run is in use by another run (process {process.pid} on " in capsys.readouterr().err
        finally:
            process.kill()
            process.wait()

    def test_reproduce_exits_non_zero_when_a_run_failed(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setenv("CBNORM_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path / "cache"))
        train = rep.train

        def fails_for_ucb(config, data):
            if config.norm == "ucb":
                raise RuntimeError("out of memory")
            return train(config, data)

        monkeypatch.setattr(rep, "train", fails_for_ucb)
        monkeypatch.setitem(rep.SCALES["table5"], "smoke", tiny())
        monkeypatch.setattr(
            rep,
            "TABLE5",
            dataclasses.replace(rep.TABLE5, norms=(("BN", "batchnorm"), ("UCB-Norm", "ucb")), lrs=(0.001,)),
        )
        monkeypatch.setitem(rep.EXPERIMENTS, "table5", rep.TABLE5)
        assert main(["reproduce", "table5", "--dataset", "digits", "--out", str(tmp_path), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("cbnorm reproduce: error: 1 run failed (see ") and err.endswith(
            "table.md); the first, ('ucb', 0.001, 0): RuntimeError: out of memory"
        )
        table = (tmp_path / "results" / "table5-digits" / "tiny" / "table.md").read_text()
        assert "| UCB-Norm | 0.001 | failed: RuntimeError: out of memory" in table


@pytest.mark.parametrize(
    "argv,module", [(["demo", "--epochs", "1"], "sklearn"), (TINY_TRAIN + ["--epochs", "1"], "tqdm")]
)
def test_a_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch, argv, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    for name in [m for m in sys.modules if m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    assert main(argv + ["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"(no module named '{module}')" in err
    assert err.endswith("install the experiments' dependencies with: pip install 'cbnorm[experiments]'")


def test_datasets_are_case_insensitive(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--dataset",
                "DIGITS",
                "--train-size",
                "64",
                "--test-size",
                "64",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "config.json").read_text())["dataset"] == "digits"
    assert main(["data", "verify", "Digits"]) == 0


def test_help_is_fast_and_clean():
    """``cbnorm --help`` and every command's help build without torch, and read as plain text."""
    commands = ["", "demo", "train", "gan", "adamatch", "reproduce", "plot", "data", "clusters"]
    script = (
        "import io, sys, time, contextlib\n"
        "start = time.perf_counter()\n"
        "from cbnorm.experiments.cli import main\n"
        f"for command in {commands!r}:\n"
        "    text = io.StringIO()\n"
        "    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'] if command else ['--help'])\n"
        "    print(text.getvalue())\n"
        "print('seconds', time.perf_counter() - start)\n"
        "print('imported', sorted({'torch', 'numpy'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("imported []")
    help_text = result.stdout
    for leaked in (":mod:", ":class:", ":func:", "``", "(default: None)", "$CBNORM_DATA) (default"):
        assert leaked not in help_text, leaked
    assert "how much of the protocol runs" in help_text and "(default: smoke)" in help_text
