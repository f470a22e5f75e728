"""Issue 14's protocol: --select best-val, honest configs, the controls (DSBN, label injection,
shuffled superclasses) and the reproduction tables' intervals and verdicts."""

import json

import pytest
import torch

import cbnorm
from cbnorm.experiments import clusters
from cbnorm.experiments import reproduce as rep
from cbnorm.experiments.metrics import read_metrics
from cbnorm.experiments.models import ClusterBias, DomainBatchNorm
from cbnorm.experiments.stats import interval, paired
from cbnorm.experiments.train import TrainConfig, best_val_row, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dataset="digits", train_size=200, test_size=100, batch_size=64, progress=False)


class TestBestVal:
    def test_holds_out_a_fixed_fraction_of_the_training_subset(self, digits, tmp_path):
        last = setup(TrainConfig(**SMALL, out=str(tmp_path / "a")), digits)
        runs = [setup(TrainConfig(**SMALL, select="best-val", seed=seed, out=str(tmp_path / f"b{seed}")), digits)
                for seed in (0, 1)]
        assert last.val is None
        for run in runs:
            assert (len(run.train), len(run.val)) == (180, 20)
            both = torch.cat([run.train.images, run.val.images]).flatten(1)
            assert torch.equal(both.unique(dim=0), last.train.images.flatten(1).unique(dim=0))
        assert torch.equal(runs[0].val.images, runs[1].val.images)  # the same held-out images for every seed

    def test_reports_the_test_accuracy_at_the_best_validation_epoch(self, digits, tmp_path):
        config = TrainConfig(**SMALL, select="best-val", val_fraction=0.25, epochs=3, out=str(tmp_path / "r"))
        history = train(config, digits)
        assert all(0 <= row["val_acc"] <= 1 for row in history)
        _, saved = read_metrics(tmp_path / "r")
        assert [row["val_acc"] for row in saved] == pytest.approx([row["val_acc"] for row in history])
        best = max(history, key=lambda row: row["val_acc"])
        assert best_val_row(history)["test_acc"] == best["test_acc"]

    def test_first_of_tied_epochs(self):
        rows = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.7}]
        assert best_val_row(rows)["epoch"] == 2

    def test_bad_settings(self):
        with pytest.raises(ValueError, match="expected select to be last or best-val, got 'best'"):
            TrainConfig(select="best")
        with pytest.raises(ValueError, match=r"expected val_fraction to be in \(0, 1\), got 1.0"):
            TrainConfig(val_fraction=1.0)
        with pytest.raises(ValueError, match="expected a history with val_acc"):
            best_val_row([{"epoch": 1, "test_acc": 0.5}])


class TestHonestConfig:
    def test_scb_k_must_be_the_number_of_its_clusters(self, digits, tmp_path):
        ids = clusters.ClusterIds(torch.zeros(len(digits.train), dtype=torch.long),
                                  torch.zeros(len(digits.test), dtype=torch.long), 2, "ids file")
        clusters.save_cluster_ids(tmp_path / "ids.npz", ids, "digits")
        config = TrainConfig(**SMALL, norm="scb", clusters=str(tmp_path / "ids.npz"), out=str(tmp_path / "r"))
        with pytest.raises(ValueError, match="expected num_clusters=2, the number of ids file clusters of digits"):
            setup(config, digits)
        config = TrainConfig(**SMALL, norm="scb", num_clusters=2, clusters=str(tmp_path / "ids.npz"),
                             out=str(tmp_path / "r"))
        assert setup(config, digits).model.features[4][1].num_clusters == 2


class TestControls:
    def test_domain_batchnorm_is_one_batchnorm_per_domain(self):
        layer = DomainBatchNorm(3, num_domains=2)
        x, domain = torch.randn(10, 3, 4, 4), torch.tensor([0, 1] * 5)
        out = layer(x, domain)
        for d in (0, 1):
            reference = torch.nn.functional.batch_norm(x[domain == d], None, None, training=True)
            torch.testing.assert_close(out[domain == d], reference)
        assert layer.domains[0].num_batches_tracked == 1 and layer.domains[1].num_batches_tracked == 1
        layer.eval()
        with cbnorm.cluster_context(torch.ones(10, dtype=torch.long)):
            torch.testing.assert_close(layer(x), layer.domains[1](x.flatten(2)).reshape(x.shape))

    def test_domain_batchnorm_errors(self):
        layer = DomainBatchNorm(3, num_domains=2)
        with pytest.raises(ValueError, match="DomainBatchNorm: expected domain ids"):
            layer(torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"expected domain ids in \[0, 2\), got \[0, 2\]"):
            layer(torch.randn(4, 3), torch.tensor([0, 2, 0, 2]))

    def test_cluster_bias_adds_its_clusters_vector(self):
        layer = ClusterBias(5, num_clusters=2)
        with torch.no_grad():
            layer.bias.copy_(torch.arange(10.0).reshape(2, 5))
        x, ids = torch.randn(4, 5), torch.tensor([0, 1, 1, 0])
        torch.testing.assert_close(layer(x, ids), x + layer.bias[ids])
        with pytest.raises(ValueError, match=r"ClusterBias: expected cluster ids of dtype torch.int64 and shape \(4,"):
            layer(x)

    def test_shuffled_superclasses_keep_sizes_and_lose_the_images(self):
        from cbnorm.experiments.data import Dataset, Split

        g = torch.Generator().manual_seed(0)
        coarse = torch.randint(0, 2, (400,), generator=g)
        split = Split(torch.zeros(400, 1, 2, 2, dtype=torch.uint8), coarse.clone(), coarse.clone())
        data = Dataset("toy", split, split, ["a", "b"], ["x", "y"])
        true = clusters.prior_clusters(data, "superclass")
        shuffled = clusters.prior_clusters(data, "shuffled-superclass")
        assert torch.equal(shuffled.train.bincount(), true.train.bincount()) and shuffled.k == 2
        assert 0.35 < (shuffled.train == true.train).float().mean() < 0.65


class TestReproduceTable:
    def test_intervals_verdicts_and_best_val_rows(self, tmp_path):
        norms = (("BN", "batchnorm"), ("UCB-Norm (weight)", "ucb", {"norm_kwargs": {"update": "weight"}}))
        scale = rep.Scale("tiny", 96, 64, 2, (0, 1), norms=norms, lrs=(0.005,), select="best-val")
        root = rep.reproduce("table5", "digits", scale, out=tmp_path, progress=False, command="test")
        summary = json.loads((root / "summary.json").read_text())
        config, _ = read_metrics(root / "runs" / "ucb-weight-lr0.005-seed1")
        assert config["norm_kwargs"] == {"update": "weight"} and config["select"] == "best-val"
        runs = {key: [read_metrics(root / "runs" / f"{key}-lr0.005-seed{s}")[1] for s in (0, 1)]
                for key in ("batchnorm", "ucb-weight")}
        ucb = summary["rows"][1]["stats"]
        best = [100 * best_val_row(h)["test_acc"] for h in runs["ucb-weight"]]
        base = [100 * best_val_row(h)["test_acc"] for h in runs["batchnorm"]]
        assert ucb["best-val"]["values"] == pytest.approx(best)
        assert ucb["best-val"]["difference"]["half_width"] == pytest.approx(paired(best, base).half_width)
        last = [100 * h[-1]["test_acc"] for h in runs["ucb-weight"]]
        assert ucb["last"]["interval"]["half_width"] == pytest.approx(interval(last).half_width)
        table = (root / "table.md").read_text()
        assert "| UCB-Norm (weight) | 0.005 | epoch of the best validation accuracy |" in table
        assert ucb["last"]["verdict"] in table


class TestFindings:
    @staticmethod
    def runs(root, accuracies):
        from cbnorm.experiments.metrics import write_metrics

        for key, values in accuracies.items():
            for seed, acc in enumerate(values):
                write_metrics(root / "runs" / f"{key}-lr0.0001-seed{seed}", {}, [{"epoch": 1, "test_acc": acc}])

    def test_verdicts_from_the_runs(self, tmp_path):
        from cbnorm.experiments.findings import findings

        folder = tmp_path / "superclass-controls-oxford_cnn-cifar10" / "small"
        self.runs(folder, {"none": [0.50, 0.52, 0.51], "scb": [0.60, 0.615, 0.61], "cluster_bias": [0.60, 0.62, 0.60],
                           "scb-shuffled-superclass": [0.49, 0.53, 0.50]})
        rows = {f.what: f for f in findings(tmp_path)}
        scb = rows["OxfordCNN + scb (superclass given) vs plain, test accuracy"]
        assert scb.gain.mean == pytest.approx(59 / 6)  # +9.83 against the paper's +7.06
        assert scb.verdict.startswith("confirmed at this scale (CIFAR-10, 4 epochs")
        injection = rows["plain + learned superclass bias (label injection) vs plain, test accuracy"]
        assert injection.verdict == "better"
        shuffled = rows["SCB-Norm with shuffled superclass ids vs plain, test accuracy"]
        assert shuffled.verdict == f"no difference detected (±{shuffled.gain.half_width:.2f})"

    def test_two_seeds_answer_nothing(self, tmp_path):
        from cbnorm.experiments.findings import findings

        self.runs(tmp_path / "superclass-oxford_cnn-cifar10" / "small", {"none": [0.5, 0.52], "scb": [0.6, 0.62]})
        (row,) = [f for f in findings(tmp_path) if f.gain is not None and f.gain.n]
        assert row.verdict.startswith("not testable here (2 seeds, fewer than 3); at this scale: ")

    def test_table5_to_a_plateau(self, tmp_path):
        """Best-validation and last-epoch gains, and the epochs each layer takes to reach BN's mean final accuracy."""
        from cbnorm.experiments.findings import findings

        curves = {  # per seed: (val_acc, test_acc) of each epoch
            "batchnorm": [[(0.3, 0.30), (0.5, 0.50), (0.4, 0.52)], [(0.3, 0.31), (0.5, 0.51), (0.4, 0.53)],
                          [(0.3, 0.29), (0.5, 0.52), (0.4, 0.51)]],
            "scb": [[(0.6, 0.55), (0.5, 0.54), (0.4, 0.56)], [(0.6, 0.56), (0.5, 0.55), (0.4, 0.57)],
                    [(0.6, 0.54), (0.5, 0.56), (0.4, 0.55)]],
        }
        write_curves(tmp_path / "table5-cifar10" / "converge", curves)
        rows = {f.what: f for f in findings(tmp_path) if f.source}
        best = rows["SCB-Norm vs BN, lr 0.005, test accuracy at the best-validation epoch"]
        assert best.gain.mean == pytest.approx(100 * (0.55 - 0.51)) and best.gain.n == 3  # epoch 1 vs epoch 2
        last = rows["SCB-Norm vs BN, lr 0.005, test accuracy at the last epoch"]
        assert last.gain.mean == pytest.approx(100 * (0.56 - 0.52))
        assert last.verdict.endswith("at this scale (2,500 CIFAR-10 training images, 30 epochs; the paper: all "
                                     "50,000, 100 epochs)")
        (reach,) = [f for what, f in rows.items() if what.startswith("SCB-Norm vs BN, epochs to reach BN's mean final "
                                                                     "test accuracy (52.00%")]
        assert reach.gain.mean == pytest.approx(5 / 3)  # BN reaches 52% at epochs 3, 3 and 2; SCB-Norm at 1, 1, 1
        assert reach.verdict.startswith("confirmed at this scale")
        assert not [f for f in findings(tmp_path) if "UCB-Norm (weight)" in f.what and f.gain.n]  # no such runs

    def test_table5_to_a_plateau_with_more_seeds_supersedes_the_first_run(self, tmp_path):
        from cbnorm.experiments.findings import CONVERGE_FOLDERS, findings

        more, first = CONVERGE_FOLDERS
        three = {"batchnorm": [[(0.5, 0.50)]] * 3, "scb": [[(0.5, 0.60)]] * 3}
        write_curves(tmp_path / first, three)
        write_curves(tmp_path / more, {k: v * 2 for k, v in three.items()})
        rows = [f for f in findings(tmp_path) if f.what.startswith("SCB-Norm vs BN, lr 0.005")]
        assert len(rows) == 2 and all(f.gain.n == 6 and f.source.endswith(more) for f in rows)


def write_curves(folder, curves: dict) -> None:
    """Table V runs of each layer key: per seed, ``(val_acc, test_acc)`` of each epoch."""
    from cbnorm.experiments.metrics import write_metrics

    for key, seeds in curves.items():
        for seed, epochs in enumerate(seeds):
            history = [{"epoch": e + 1, "val_acc": v, "test_acc": t} for e, (v, t) in enumerate(epochs)]
            write_metrics(folder / "runs" / f"{key}-lr0.005-seed{seed}", {}, history)
