import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import cbnorm
from cbnorm.experiments import clusters
from cbnorm.experiments.data import load_dataset
from cbnorm.experiments.metrics import COLUMNS, at_fraction, format_header, format_row, mean_std, read_metrics
from cbnorm.experiments.train import TrainConfig, norm_kwargs, setup, train

from utils import kill_and_resume

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
        config = TrainConfig(**{**SMALL, "train_size": 64, "test_size": 64}, model="densenet40", norm="scb_base",
                             num_clusters=5, optimizer="sgd", lr=0.1, schedule="step", epochs=4, out=str(tmp_path / "d"))
        history = train(config, digits)
        assert [row["lr"] for row in history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
        group = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]
        assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4

    def test_cluster_ids_reach_the_layer(self, tmp_path, digits):
        ids = clusters.ClusterIds(torch.arange(len(digits.train)) % 2, torch.arange(len(digits.test)) % 2, 3, "test")
        clusters.save_cluster_ids(tmp_path / "ids.npz", ids, "digits")
        config = TrainConfig(**SMALL, norm="scb", epochs=1, clusters=str(tmp_path / "ids.npz"), out=str(tmp_path / "r"))
        run = setup(config, digits)
        assert run.model.norm.num_clusters == 3 and torch.equal(run.train_ids, ids.train[torch.randperm(1437, generator=torch.Generator().manual_seed(0))[:256].sort().values])
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
        cached = cbnorm.cluster_cache_path(tmp_path, "digits", 3, method="gmm", seed=0)
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
