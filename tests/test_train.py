import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import cbnorm
from cbnorm.experiments import clusters
from cbnorm.experiments.data import load_dataset
from cbnorm.experiments.metrics import COLUMNS, at_fraction, format_header, format_row, mean_std, read_metrics
from cbnorm.experiments.train import TrainConfig, norm_kwargs, setup, train
from tests.utils import kill_and_resume, without_time

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dataset="digits", train_size=256, test_size=128, batch_size=64, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class TestTrain:
    def test_metrics_checkpoint_and_learning(self, tmp_path, digits):
        out = tmp_path / "run"
        history = train(TrainConfig(**{**SMALL, "train_size": 512}, norm="ucb", epochs=3, out=str(out)), digits)
        assert [row["epoch"] for row in history] == [1, 2, 3]
        assert history[-1]["test_acc"] > 0.5 and history[-1]["train_loss"] < history[0]["train_loss"]  # chance: 0.1
        with open(out / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == COLUMNS and float(rows[2]["test_acc"]) == history[2]["test_acc"]
        config, saved = read_metrics(out)
        assert saved == history and config["norm"] == "ucb" and json.loads((out / "config.json").read_text()) == config
        assert history[1]["test_error"] == pytest.approx(1 - history[1]["test_acc"])
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "history", "config"} <= set(state)
        assert bool(state["model"]["features.4.1.initialized"]) and len(state["history"]) == 3

    def test_refuses_to_overwrite_or_change_a_run(self, tmp_path, digits):
        config = TrainConfig(**SMALL, epochs=1, out=str(tmp_path / "run"))
        train(config, digits)
        with pytest.raises(FileExistsError, match=r"already holds a run .*pass --resume"):
            train(config, digits)
        with pytest.raises(ValueError, match=r"cannot resume .* different config: lr: 0.001 -> 0.002"):
            train(dataclasses.replace(config, resume=True, lr=0.002), digits)
        again = train(dataclasses.replace(config, resume=True, progress=True), digits)  # run-control fields may change
        assert len(again) == 1

    def test_sgd_step_schedule_densenet(self, tmp_path, digits):
        config = TrainConfig(
            **{**SMALL, "train_size": 64, "test_size": 64},
            model="densenet40",
            norm="scb_base",
            num_clusters=5,
            optimizer="sgd",
            lr=0.1,
            schedule="step",
            epochs=4,
            out=str(tmp_path / "d"),
        )
        history = train(config, digits)
        assert [row["lr"] for row in history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
        group = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
        assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4

    def test_cluster_ids_reach_the_layer(self, tmp_path, digits):
        ids = clusters.ClusterIds(torch.arange(len(digits.train)) % 2, torch.arange(len(digits.test)) % 2, 3, "test")
        clusters.save_cluster_ids(tmp_path / "ids.npz", ids, "digits")
        config = TrainConfig(**SMALL, norm="scb", epochs=1, clusters=str(tmp_path / "ids.npz"), out=str(tmp_path / "r"))
        run = setup(config, digits)
        subset = torch.randperm(1437, generator=torch.Generator().manual_seed(0))[:256].sort().values
        assert run.model.norm.num_clusters == 3 and torch.equal(run.train_ids, ids.train[subset])
        train(config, digits)
        loc = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["model"]["features.4.1.loc"]
        assert loc[0].abs().sum() > 0 and loc[1].abs().sum() > 0
        assert torch.equal(loc[2], torch.zeros_like(loc[2]))  # cluster 2 has no samples: never trained

    def test_ids_file_is_checked_against_the_data(self, tmp_path, digits):
        ids = clusters.ClusterIds(torch.zeros(5, dtype=torch.long), torch.zeros(360, dtype=torch.long), 2, "test")
        clusters.save_cluster_ids(tmp_path / "ids.npz", ids, "digits")
        with pytest.raises(ValueError, match=r"expected 1437 train ids for digits, got shape \(5,\)"):
            clusters.load_cluster_ids(tmp_path / "ids.npz", digits)
        with pytest.raises(FileNotFoundError, match="write one with `cbnorm clusters digits"):
            clusters.load_cluster_ids(tmp_path / "none.npz", digits)

    def test_mixture_clusters_cached(self, tmp_path, digits):
        first = clusters.prior_clusters(digits, "mixture", 3, cache_dir=tmp_path)
        assert first.train.shape == (1437,) and set(first.train.unique().tolist()) == {0, 1, 2}
        name = f"digits-{clusters.data_fingerprint(digits)}"  # two data sets of one name never share ids
        cached = cbnorm.cluster_cache_path(tmp_path, name, 3, method="gmm", seed=0)
        assert cached.exists() and torch.equal(clusters.prior_clusters(digits, "mixture", 3, cache_dir=tmp_path).test,
                                               first.test)

    def test_snapshots_and_amp(self, tmp_path, digits):
        config = TrainConfig(**{**SMALL, "train_size": 64, "test_size": 64}, epochs=4, snapshots=2, amp=True,
                             out=str(tmp_path / "s"))
        history = train(config, digits)
        assert sorted(p.name for p in (tmp_path / "s" / "snapshots").iterdir()) == ["epoch-0002.pt", "epoch-0004.pt"]
        assert np.isfinite(history[-1]["test_loss"])

    def test_norm_kwargs(self, monkeypatch):
        assert norm_kwargs("scb", 5, {}) == {"num_clusters": 5}
        assert norm_kwargs("ucb", 3, {"update": "weight"}) == {"num_components": 3, "update": "weight"}
        assert norm_kwargs("batchnorm", 3, {}) == {}
        assert norm_kwargs("mn", 4, {}) == {"num_components": 4}

    def test_config_errors(self):
        with pytest.raises(ValueError, match="expected optimizer to be adamw, adam or sgd, got 'rmsprop'"):
            TrainConfig(optimizer="rmsprop")
        with pytest.raises(ValueError, match="expected snapshots to be between 0 and epochs=2, got 3"):
            TrainConfig(epochs=2, snapshots=3)


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, digits):
    """SIGKILL a run after its second epoch, resume it: the same metrics and weights as a run never stopped."""
    flags = dict(SMALL, norm="ucb", epochs=6, threads=1)  # UCB draws its k-means++ start from the global RNG
    reference = train(TrainConfig(**flags, out=str(tmp_path / "reference")), digits)
    final = kill_and_resume("train", flags, tmp_path / "killed", reference, 6)["model"]
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


class TestMetrics:
    def test_progress_table_is_fixed_width(self):
        row = {"epoch": 12, "train_loss": 0.123456, "train_acc": 0.5, "test_loss": 1.5, "test_acc": 0.987654,
               "lr": 0.001, "seconds": 12.34}
        header, rule = format_header().splitlines()
        line = format_row(row)
        assert len(line) == len(header) == len(rule)
        assert line.split(" | ") == ["   12", "    0.1235", "   50.00%", "   1.5000", "  98.77%", "1.00e-03", "  12.3s"]

    def test_at_fraction_and_mean_std(self):
        history = [{"epoch": e, "test_acc": e / 10} for e in range(1, 9)]
        assert [at_fraction(history, f, 8) for f in (0.25, 0.5, 0.75, 1.0)] == [0.2, 0.4, 0.6, 0.8]
        assert np.isnan(at_fraction(history[:3], 1.0, 8))  # not there yet
        assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and mean_std([2.0]) == (2.0, 0.0)
        assert all(np.isnan(mean_std([])))


def tiny(out, **changes):
    return TrainConfig(**{**SMALL, "train_size": 64, "test_size": 64, "epochs": 2, "out": str(out), **changes})


class TestRunFolderKeepsWork:
    """Nothing in a run folder is replaced silently, two processes never write one folder, a damaged
    checkpoint costs one epoch at most."""

    def test_results_without_checkpoint_are_refused_unless_overwrite(self, tmp_path, digits):
        config = tiny(tmp_path / "run")
        history = train(config, digits)
        for name in ("checkpoint.pt", "checkpoint-previous.pt"):  # a committed run: results, no checkpoint
            (tmp_path / "run" / name).unlink()
        before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
        with pytest.raises(FileExistsError, match=r"holds the results of a run \(2 epochs in metrics.json\) but no "
                                                  r"checkpoint to continue from; pass --overwrite"):
            train(config, digits)
        assert train(dataclasses.replace(config, resume=True), digits) == history  # finished: reused as it is
        with pytest.raises(FileExistsError, match="holds the results of a run"):  # unfinished: refused
            train(dataclasses.replace(config, resume=True, epochs=3), digits)
        assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
        (tmp_path / "run" / "snapshots").mkdir()
        (tmp_path / "run" / "snapshots" / "epoch-0009.pt").write_bytes(b"")  # the old run's: replaced too
        again = train(dataclasses.replace(config, overwrite=True, lr=0.002), digits)
        assert len(again) == 2 and read_metrics(tmp_path / "run")[0]["lr"] == 0.002
        assert not (tmp_path / "run" / "snapshots").exists()

    def test_a_users_folder_is_refused_unless_overwrite(self, tmp_path, digits):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        message = r"mine is not empty \(notes.txt\) and holds no run; pass --overwrite"
        with pytest.raises(FileExistsError, match=message):
            train(tiny(tmp_path / "mine"), digits)
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
        train(tiny(tmp_path / "mine", overwrite=True), digits)
        assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"

    def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(self, tmp_path, digits, capsys):
        run = tmp_path / "run"
        run.mkdir()
        alive = os.getppid()  # the process that started the tests: running, and not this one
        (run / "run.lock").write_text(json.dumps({"pid": alive, "host": socket.gethostname()}))
        with pytest.raises(FileExistsError, match=rf"run is in use by another run \(process {alive} on "):
            train(tiny(run), digits)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (run / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        assert len(train(tiny(run), digits)) == 2
        assert f"taking over the lock of a run that is no longer running ({run / 'run.lock'}, process {dead.pid})" \
            in capsys.readouterr().out
        assert not (run / "run.lock").exists()  # released at the end

    @pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
    def test_damaged_checkpoint_falls_back_to_the_previous_epoch(self, tmp_path, digits, capsys, damage):
        config = tiny(tmp_path / "run", epochs=3)
        reference = train(dataclasses.replace(config, out=str(tmp_path / "reference")), digits)
        train(dataclasses.replace(config, epochs=2), digits)
        path = tmp_path / "run" / "checkpoint.pt"
        content = path.read_bytes()
        damaged = {"truncated": content[: len(content) // 2], "empty": b"", "garbage": b"\x00garbage" * 99}
        path.write_bytes(damaged[damage])
        capsys.readouterr()
        history = train(dataclasses.replace(config, resume=True), digits)
        lines = [line for line in capsys.readouterr().out.splitlines() if "is damaged" in line]
        assert len(lines) == 1 and lines[0].startswith(f"{path} (") \
            and lines[0].endswith("is damaged; continuing from checkpoint-previous.pt (after epoch 1)")
        assert without_time(history) == without_time(reference)  # epoch 2 trained again, identically
        assert len(torch.load(tmp_path / "run" / "checkpoint-previous.pt", weights_only=True)["history"]) == 2

    def test_no_readable_checkpoint_is_a_clear_error(self, tmp_path, digits):
        config = tiny(tmp_path / "run")
        train(config, digits)
        for name in ("checkpoint.pt", "checkpoint-previous.pt"):
            (tmp_path / "run" / name).write_bytes(b"")
        with pytest.raises(ValueError, match=r"no readable checkpoint in .*run: .*checkpoint.pt \(.*\); .*"
                                             r"checkpoint-previous.pt \(.*\); pass --overwrite to start the run again"):
            train(dataclasses.replace(config, resume=True), digits)

    def test_more_epochs_when_the_schedule_allows(self, tmp_path, digits):
        reference = train(tiny(tmp_path / "reference", epochs=3), digits)
        train(tiny(tmp_path / "run", epochs=2), digits)
        extended = train(tiny(tmp_path / "run", epochs=3, resume=True), digits)
        assert without_time(extended) == without_time(reference)  # as if it had been asked for 3 from the start
        with pytest.raises(ValueError, match=r"cannot resume .*run with epochs 3 -> 2: it has trained 3"):
            train(tiny(tmp_path / "run", epochs=2, resume=True), digits)
        step = tiny(tmp_path / "step", schedule="step", epochs=2)
        train(step, digits)
        with pytest.raises(ValueError, match=r"cannot resume .*step with epochs 2 -> 4: the step schedule divides "
                                             r"the learning rate at 50% and 75% of the epochs"):
            train(dataclasses.replace(step, epochs=4, resume=True), digits)

    def test_mixture_clusters_are_cached_in_the_cache_not_beside_the_run(self, tmp_path, digits, monkeypatch):
        for name in ("CBNORM_CACHE", "CBNORM_CACHE_DIR"):  # the cache folder, whichever the library reads
            monkeypatch.setenv(name, str(tmp_path / "cache"))
        train(tiny(tmp_path / "runs" / "scb", norm="scb", epochs=1), digits)
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["scb"]
        assert list((tmp_path / "cache").rglob("digits-*-k3-gmm-seed0.pt"))
