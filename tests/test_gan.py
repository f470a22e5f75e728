import csv
import json

import pytest
import torch

import cbnorm
from cbnorm.experiments import gan
from cbnorm.experiments.cli import main
from cbnorm.experiments.data import load_dataset
from cbnorm.experiments.metrics import read_metrics
from cbnorm.experiments.models.dcgan import Discriminator, Generator
from cbnorm.experiments.planner import BudgetError
from tests.utils import kill_and_resume

pytestmark = pytest.mark.usefixtures("one_thread")

# digits are 8 x 8 grey: a DCGAN of width 8 on them trains in a fraction of a second per epoch
TINY = dict(dataset="digits", train_size=128, width=8, batch_size=32, fid_samples=24, fid_reference=24,
            fid_features="random-conv", progress=False)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class TestModels:
    def test_generator_and_discriminator(self):
        g = Generator(norms=("ucb", "mn", "batchnorm"), norm_kwargs=({"num_components": 3}, {"num_components": 3}, {}))
        assert [type(n) for n in g.norms] == [cbnorm.UCBNorm, cbnorm.MixtureNorm, torch.nn.BatchNorm2d]
        assert [n.num_features for n in g.norms] == [256, 128, 64]
        images = g(torch.randn(6, 128)).detach()
        assert images.shape == (6, 3, 32, 32) and float(images.abs().max()) <= 1
        assert Discriminator()(images).shape == (6,)
        assert len([m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]) == 4
        with pytest.raises(ValueError, match="image_size that is a multiple of 8, got 28"):
            Generator(image_size=28)

    def test_the_variants(self):
        bn, _ = gan.build_gan(gan.GANConfig(norm="batchnorm"), 3, 32)
        ucb, d = gan.build_gan(gan.GANConfig(norm="ucb"), 3, 32)
        mn, _ = gan.build_gan(gan.GANConfig(norm="mn"), 3, 32)
        assert all(isinstance(n, torch.nn.BatchNorm2d) for n in bn.norms)
        assert [type(n).__name__ for n in ucb.norms] == ["UCBNorm", "UCBNorm", "BatchNorm2d"]
        assert ucb.norms[0].num_components == 3 and ucb.norms[0].affine  # gamma/beta, as the BN it replaces
        assert [type(n).__name__ for n in mn.norms] == ["MixtureNorm", "MixtureNorm", "BatchNorm2d"]
        assert all(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules() if "Norm" in type(m).__name__)

    def test_config_errors(self):
        with pytest.raises(ValueError, match="expected fid_features to be auto or one of"):
            gan.GANConfig(fid_features="clip")
        with pytest.raises(ValueError, match="expected batch_size to be an int >= 2"):
            gan.GANConfig(batch_size=1)


def test_training_writes_metrics_samples_and_a_labelled_fid(tmp_path, digits, monkeypatch):
    monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "ucb"
    history = gan.train_gan(gan.GANConfig(**TINY, norm="ucb", epochs=3, fid_every=2, out=str(out)), digits)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [("fid_star" in row) for row in history] == [False, True, True]  # every 2 epochs and at the last
    assert all("fid" not in row for row in history)  # the fallback never passes for Inception's FID
    assert all(0 <= row["d_real"] <= 1 and row["loss_d"] > 0 for row in history) and history[1]["fid_star"] > 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "epoch", "loss_d", "loss_g", "d_real", "d_fake", "fid_star", "lr", "seconds", "fid_seconds"
    ]
    assert rows[0]["fid_star"] == "" and float(rows[2]["fid_star"]) == history[2]["fid_star"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch-0002.png", "epoch-0003.png"]
    assert (out / "samples" / "epoch-0003.png").read_bytes()[:8] == PNG
    assert json.loads((out / "config.json").read_text())["fid_features"] == "random-conv"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "rng", "history", "config"} <= set(state)
    assert [p.name[:-20] for p in (tmp_path / "cache" / "fid").iterdir()] == ["digits-train-24-random-conv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ucb"]  # nothing written beside the run
    group = state["opt_g"]["param_groups"][0]
    assert group["lr"] == 2e-4 and tuple(group["betas"]) == (0.0, 0.9)


def test_samples_and_fid_do_not_depend_on_the_batch(digits):
    g = gan.build_gan(gan.GANConfig(width=8), 1, 8)[0]
    a = torch.cat(list(gan.generate(g, 10, 0, 5, 10, torch.device("cpu"))))
    b = torch.cat(list(gan.generate(g, 10, 0, 5, 3, torch.device("cpu"))))
    assert a.dtype == torch.uint8 and torch.equal(a, b) and g.training  # eval while drawing, train mode after


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, digits):
    """SIGKILL a DCGAN run after its second epoch, resume it: the same metrics and weights as a run never stopped."""
    flags = dict(TINY, norm="ucb", epochs=5, fid_every=2, threads=1)
    reference = gan.train_gan(gan.GANConfig(**flags, out=str(tmp_path / "reference")), digits)
    final = kill_and_resume("gan", flags, tmp_path / "killed", reference, 5)
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    for net in ("generator", "discriminator"):
        assert all(torch.equal(final[net][k], expected[net][k]) for k in expected[net])


def test_reproduce_writes_table_and_figures(tmp_path, digits):
    scale = gan.GANScale("tiny", 64, 2, 1, 16, 24)
    root = gan.reproduce_dcgan("digits", scale, out=tmp_path, progress=False, fid_features="random-conv",
                               command="test", data=digits)
    table = (root / "table.md").read_text()
    assert "| DCGAN-BN |" in table and "| DCGAN-MN |" in table and "| DCGAN-UCB-Norm |" in table
    assert "FID* (random-conv)" in table and "curve only" in table and "Floor:" in table
    summary = json.loads((root / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["ok"] * 3 and summary["metric"]["key"] == "fid_star"
    assert summary["real_test_floor"] > 0 and all(row["final"][0] > 0 for row in summary["rows"])
    for name in ("figure10.png", "figure11.png"):
        assert (root / name).read_bytes()[:8] == PNG and (root / name).stat().st_size > 5000
    config, history = read_metrics(root / "runs" / "mn-seed0")
    assert config["norm"] == "mn" and config["width"] == 64 and [("fid_star" in r) for r in history] == [True, True]


def test_reproduce_dcgan_smoke(tmp_path, data_root):
    """The CI reproduction: the three DCGANs on a real CIFAR-10 subset. FID* keeps it fast (Inception-v3 on CPU
    costs about a quarter of a second an image); test_fid.py covers the Inception features."""
    argv = ["reproduce", "dcgan", "--dataset", "cifar10", "--scale", "smoke", "--out", str(tmp_path),
            "--data-dir", str(data_root), "--fid-features", "random-conv", "--no-progress"]
    assert main(argv) == 0
    root = tmp_path / "results" / "dcgan-cifar10" / "smoke"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["metric"]["key"] == "fid_star" and [row["status"] for row in summary["rows"]] == ["ok"] * 3
    config, history = read_metrics(root / "runs" / "ucb-seed0")
    assert config["train_size"] == gan.GAN_SCALES["smoke"].train_size and len(history) == 2
    assert (root / "figure10.png").is_file() and (root / "figure11.png").is_file()
    assert "Command: `cbnorm reproduce dcgan" in (root / "table.md").read_text()


def test_time_budget_plans_the_layers_and_the_table_says_which_ran(tmp_path, digits):
    """--time-budget with a mocked epoch of 1 s: runs of 100 epochs do not fit 5 s, so it stops before training;
    with --epochs 2, BN and MN of seed 0 fit (4 s), UCB-Norm does not."""
    timed = []

    def timer(config, data, device, norms):
        timed.append((config.train_size, config.epochs, config.fid_samples, config.fid_features, tuple(norms)))
        return {norm: 1.0 for norm in norms}

    options = dict(out=tmp_path, progress=False, fid_features="random-conv", command="test", data=digits,
                   time_budget=5 / 60, timer=timer)
    with pytest.raises(BudgetError, match="the cheapest, batchnorm, takes about 1.7 min for 100 epochs .* or --epochs"):
        gan.reproduce_dcgan("digits", gan.GANScale("tiny", 64, 100, 1, 16, 24), **options)
    assert not (tmp_path / "results" / "dcgan-digits" / "tiny" / "runs").exists()
    root = gan.reproduce_dcgan("digits", gan.GANScale("tiny", 64, 100, 1, 16, 24), epochs=2, **options)
    assert timed[-1] == (64, 2, 16, "random-conv", ("batchnorm", "mn", "ucb"))
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["batchnorm-seed0", "mn-seed0"]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["plan"]["runs"] == [["batchnorm", 0], ["mn", 0]] and summary["seeds"] == [0]
    assert [(row["status"], row["seeds"]) for row in summary["rows"]] == [
        ("ok", [0]), ("ok", [0]), ("not run: outside the --time-budget plan", [])]
    table = (root / "table.md").read_text()
    assert ("Only part of the protocol ran, as planned by --time-budget: time budget 0.0833333 min: 2 of 9 runs at "
            "2 epochs") in table and "runs (layer, seed): (batchnorm, 0), (mn, 0)" in table
    assert "| DCGAN-UCB-Norm | not run: outside the --time-budget plan |" in table


def test_timing_an_epoch_on_this_device(digits):
    """The planner's timing: GAN steps and the FID evaluations' share, for each generator layer."""
    config = gan.GANConfig(**{**TINY, "epochs": 2, "fid_every": 2}, device="cpu")
    seconds = gan.time_gan_epochs(config, digits, torch.device("cpu"), ["batchnorm", "ucb"], steps=1, warmup=1)
    assert set(seconds) == {"batchnorm", "ucb"} and all(s > 0 for s in seconds.values())
