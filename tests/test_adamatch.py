import json
import math

import pytest
import torch

import cbnorm
from cbnorm.experiments import adamatch, augment
from cbnorm.experiments.cli import main
from cbnorm.experiments.data import Dataset, Split, load_dataset
from cbnorm.experiments.metrics import read_metrics
from cbnorm.experiments.models.wide_resnet import WideResNet
from cbnorm.experiments.planner import BudgetError
from tests.utils import kill_and_resume, without_time

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist_like(digits):
    """digits at 28 x 28 standing in for MNIST (the tests that need real MNIST take it from data_root)."""
    def grow(split):
        images = torch.nn.functional.interpolate(split.images.float(), size=28, mode="nearest").to(torch.uint8)
        return Split(images, split.labels)

    return Dataset("mnist-like", grow(digits.train), grow(digits.test), digits.classes)


# a WRN-10-1 (one block per group) on 64 + 64 images: seconds per epoch
TINY = dict(source_train_size=64, target_train_size=64, source_test_size=32, target_test_size=32, depth=10, width=1,
            batch_size=16, uratio=1, progress=False)


class TestObjective:
    def logits(self, n_s=4, n_t=6, k=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        joint = torch.randn(2 * n_s + 2 * n_t, k, generator=g, requires_grad=True)
        source_only = torch.randn(2 * n_s, k, generator=g, requires_grad=True)
        return joint, source_only, torch.randint(0, k, (n_s,), generator=g)

    def test_random_logit_interpolation(self):
        joint, source_only, labels = self.logits()
        ce = torch.nn.functional.cross_entropy
        ones = adamatch.adamatch_objective(joint, source_only, labels, 0.3, interpolation=torch.ones(8, 3))
        zeros = adamatch.adamatch_objective(joint, source_only, labels, 0.3, interpolation=torch.zeros(8, 3))
        torch.testing.assert_close(ones["source_weak"], joint[:4].detach())  # lambda = 1: the joint pass's logits
        torch.testing.assert_close(zeros["source_weak"], source_only[:4].detach())  # lambda = 0: the source-only pass
        lam = torch.rand(8, 3, generator=torch.Generator().manual_seed(1))
        mixed = adamatch.adamatch_objective(joint, source_only, labels, 0.3, interpolation=lam)
        z = lam * joint[:8] + (1 - lam) * source_only
        torch.testing.assert_close(mixed["loss_source"], 0.5 * (ce(z[:4], labels) + ce(z[4:], labels)))

    def test_distribution_alignment_threshold_and_target_loss(self):
        joint, source_only, labels = self.logits()
        lam = torch.rand(8, 3, generator=torch.Generator().manual_seed(2))
        out = adamatch.adamatch_objective(joint, source_only, labels, 0.3, tau=0.8, interpolation=lam)
        p_source = (lam * joint[:8] + (1 - lam) * source_only)[:4].softmax(1)
        p_target = joint[8:14].softmax(1)
        aligned = p_target * (1e-6 + p_source.mean(0)) / (1e-6 + p_target.mean(0))
        aligned = aligned / aligned.sum(1, keepdim=True)
        torch.testing.assert_close(out["aligned"], aligned.detach())
        torch.testing.assert_close(out["aligned"].sum(1), torch.ones(6))
        threshold = 0.8 * p_source.max(1).values.mean()
        assert out["threshold"] == pytest.approx(float(threshold.detach()))
        mask = (aligned.max(1).values >= threshold).float()
        assert torch.equal(out["mask"], mask) and torch.equal(out["pseudo"], aligned.argmax(1))
        ce = torch.nn.functional.cross_entropy(joint[14:], aligned.argmax(1), reduction="none")
        torch.testing.assert_close(out["loss_target"], (ce * mask).mean())  # mean over all n_T, masked
        grad, = torch.autograd.grad(out["loss_target"], joint)
        assert grad[:14].abs().sum() == 0 and grad[14:].abs().sum() > 0  # only through the strong target logits

    def test_alignment_moves_target_predictions_toward_the_source_distribution(self):
        source = torch.zeros(4, 2)  # the source predicts both classes equally
        target = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # the target leans to class 0
        joint = torch.cat([source, source, target, target])
        out = adamatch.adamatch_objective(joint, torch.cat([source, source]), torch.tensor([0, 1, 0, 1]), 0.5)
        assert out["aligned"].mean(0)[0] < target.softmax(1).mean(0)[0]
        assert out["aligned"].mean(0)[0] == pytest.approx(0.5, abs=0.08)

    def test_warmup_of_the_unlabelled_weight(self):
        assert [adamatch.warmup(p) for p in (0, 0.25, 0.5, 0.75, 1)] == pytest.approx([0, 0.5, 1, 1, 1])
        assert 0 < adamatch.warmup(0.1) < 0.5 < adamatch.warmup(0.4) < 1

    def test_shapes_are_checked(self):
        joint, source_only, labels = self.logits()
        with pytest.raises(ValueError, match=r"expected joint logits \(2 n_S \+ 2 n_T, k\)"):
            adamatch.adamatch_objective(joint, source_only[:6], labels, 0.0)


class TestPieces:
    def test_preserve_running_stats_leaves_running_statistics_and_earlier_graphs_intact(self):
        model = WideResNet(10, 1, norm_layer="ucb", norm_kwargs={"num_components": 2})
        x = torch.rand(8, 3, 32, 32)
        first = model(x)  # trains: running statistics move, the graph holds BatchNorm's buffers
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with cbnorm.preserve_running_stats(model):
            second = model(x[:4] * 3)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        (first.sum() + second.sum()).backward()  # an in-place restore would break this backward
        assert model.norm._initialized and bool(model.norm.initialized)

    def test_common_geometry(self):
        grey28 = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
        out = adamatch.common_images(grey28, 32)
        assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8 and torch.equal(out[:, 0], out[:, 2])
        rgb32 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        assert adamatch.common_images(rgb32, 32) is rgb32

    def test_augmentation_is_seeded_and_keeps_uint8(self):
        x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
        a = augment.strong(x, torch.Generator().manual_seed(3))
        assert a.dtype == torch.uint8 and torch.equal(a, augment.strong(x, torch.Generator().manual_seed(3)))
        assert not torch.equal(a, x)
        for name, op in augment.OPERATIONS.items():
            y = op(x.float(), torch.rand(6))
            assert y.shape == x.shape and bool(torch.isfinite(y).all()), name
        shifted = augment.weak(x, torch.Generator().manual_seed(0), padding=2)
        assert shifted.shape == x.shape and shifted.dtype == torch.uint8

    def test_rules(self):
        names = [r["name"] for r in adamatch.rules("scb")]
        assert names[:2] == ["source id (paper)", "domain id"] and len(names) == 8
        assert [r["name"] for r in adamatch.rules("scb_base")][2] == "unknown: uniform assignment"
        assert [r["name"] for r in adamatch.rules("ucb")] == ["—"]
        model = WideResNet(10, 1, norm_layer="scb", norm_kwargs={"num_clusters": 2})
        with adamatch.inference_rule(model, "map", "sample"):
            assert (model.norm.unknown, model.norm.posterior) == ("map", "sample")
        assert (model.norm.unknown, model.norm.posterior) == ("paper", "element")

    def test_config_errors(self):
        with pytest.raises(ValueError, match="expected uratio to be a positive int, got 0"):
            adamatch.AdaMatchConfig(uratio=0)
        with pytest.raises(ValueError, match=r"expected bn_momentum to be in \(0, 1\], got 0"):
            adamatch.AdaMatchConfig(bn_momentum=0)
        with pytest.raises(ValueError, match="expected the same classes in both domains"):
            three = Dataset(
                "three",
                Split(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)),
                Split(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)),
                ["a", "b", "c"],
            )
            adamatch.domains(adamatch.AdaMatchConfig(), three, load_dataset("digits"))


def test_training_writes_metrics_inference_rules_and_gradient_variance(tmp_path, mnist_like, digits):
    out = tmp_path / "scb"
    config = adamatch.AdaMatchConfig(**TINY, norm="scb", epochs=2, out=str(out))
    history = adamatch.train_adamatch(config, mnist_like, digits)
    assert [row["epoch"] for row in history] == [1, 2] and history[-1]["mu"] == pytest.approx(adamatch.warmup(7 / 8))
    for row in history:
        assert all(
            0 <= row[f"{d}_{k}"] <= 1 for d in ("source", "target") for k in ("acc", "precision", "recall", "f1")
        )
        assert 0 < row["grad_var_source_mean"] <= row["grad_var_source_max"]
        assert 0 <= row["grad_var_target_mean"] <= row["grad_var_target_max"] and 0 <= row["mask"] <= 1
    assert history[0]["lr"] == 0.03 and history[1]["lr"] == pytest.approx(
        0.03 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi / 2)))
    )
    rules = json.loads((out / "inference.json").read_text())["rules"]
    assert [r["rule"] for r in rules] == [r["name"] for r in adamatch.rules("scb")]
    assert rules[0]["target_acc"] == pytest.approx(history[-1]["target_acc"])  # the epoch rule is the paper's
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(state)
    assert state["model"]["norm.loc"][1].abs().sum() > 0  # the target cluster was trained


def test_probed_steps_use_the_gradient_of_the_loss():
    """Taking the two terms' gradients apart (for their variance) and adding them gives the loss's gradient;
    the variance is that of the source term's gradient entries."""
    model = WideResNet(10, 1, norm_layer="ucb", norm_kwargs={"num_components": 2})
    params = list(model.parameters())
    x, labels = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (2,))

    def objective():
        torch.manual_seed(0)  # the same interpolation every time
        model.zero_grad()
        with cbnorm.preserve_running_stats(model):  # the same running state every time
            joint = model(x)
            with cbnorm.preserve_running_stats(model):
                source_only = model(x[:4])
        return adamatch.adamatch_objective(joint, source_only, labels, 0.2)

    out = objective()
    measured = adamatch.backward(out["loss_source"], out["loss_target"], 0.7, params, probe=True)
    probed = torch.cat([p.grad.reshape(-1) for p in params])
    out = objective()
    assert adamatch.backward(out["loss_source"], out["loss_target"], 0.7, params, probe=False) is None
    plain = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(probed, plain, rtol=0, atol=1e-5 * float(plain.abs().max()))  # float32 summation order
    out = objective()
    source = torch.autograd.grad(out["loss_source"], params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(source, params)])
    assert measured[0] == pytest.approx(float(flat.double().var(unbiased=False)), rel=1e-6) and measured[1] >= 0


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, data_root):
    """SIGKILL an AdaMatch run after its second epoch, resume it: the same metrics and weights."""
    flags = dict(TINY, source_train_size=32, norm="ucb", epochs=4, threads=1, data_dir=str(data_root))
    reference = adamatch.train_adamatch(adamatch.AdaMatchConfig(**flags, out=str(tmp_path / "reference")))
    final = kill_and_resume("adamatch", flags, tmp_path / "killed", reference, 4)["model"]
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_reproduce_adamatch_smoke(tmp_path, data_root):
    """The CI reproduction: AdaMatch, its three cluster-based variants and the DSBN control, MNIST -> digits."""
    argv = [
        "reproduce",
        "adamatch",
        "--source",
        "mnist",
        "--target",
        "digits",
        "--scale",
        "smoke",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(data_root),
        "--no-progress",
    ]
    assert main(argv) == 0
    root = tmp_path / "results" / "adamatch-mnist-digits" / "smoke"
    table = (root / "table.md").read_text()
    assert "| AdaMatch+SCB-Norm | " in table and "54.70 | 59.74 | 54.70 | 54.55" in table  # the paper's, SVHN
    assert "best on the target:" in table and "unknown: map, sample" in table
    summary = json.loads((root / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["ok"] * 5  # with the domain-specific BatchNorm control
    assert summary["target"] == "digits" and "— mnist -> digits, scale `smoke`" in table.splitlines()[0]
    config, history = read_metrics(root / "runs" / "scb-seed0")
    smoke, paper = adamatch.ADAMATCH_SCALES["smoke"], adamatch.ADAMATCH_SCALES["paper"]
    assert (config["depth"], config["width"], config["lr"], config["bn_momentum"]) == (10, 2, 1e-3, 0.1)
    assert len(history) == 2 and f"Protocol: {adamatch.protocol(smoke)}" in table
    assert adamatch.protocol(paper).startswith(
        "WRN-28-2, Adam lr 0.03 with cosine decay to 25%, BatchNorm momentum 0.01"
    )
    for name in ("figure12.png", "curves.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_runs_give_the_sequential_metrics(tmp_path, mnist_like, digits):
    """--parallel 2 hands both domains to train_adamatch in spawned processes: the same metrics and inference rules."""
    scale = adamatch.AdaMatchScale("tiny", 64, 64, 32, 32, 2, 16, depth=10, lr=1e-3, bn_momentum=0.1)
    kwargs = dict(norms=adamatch.ADAMATCH_NORMS[:2], data=(mnist_like, digits), threads=1, progress=False,
                  command="test")
    one = adamatch.reproduce_adamatch("mnist", "digits", scale, out=tmp_path / "one", **kwargs)
    two = adamatch.reproduce_adamatch("mnist", "digits", scale, out=tmp_path / "two", parallel=2, **kwargs)
    for name in ("none-seed0", "scb-seed0"):
        sequential, parallel = (read_metrics(root / "runs" / name)[1] for root in (one, two))
        assert without_time(sequential) == without_time(parallel) and len(parallel) == 2
        rules = [json.loads((root / "runs" / name / "inference.json").read_text()) for root in (one, two)]
        assert rules[0] == rules[1]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["parallel"] == 2 and summary["scale"]["source_train"] == 64 == summary["scale"]["target_train"]
    assert list(summary["seconds_per_epoch"]) == ["AdaMatch", "AdaMatch+SCB-Norm"]
    assert "AdaMatch+SCB-Norm: " in (two / "table.md").read_text().split("Time per run on")[1]


def test_table_names_the_seeds_that_ran():
    """``--seeds`` overrides the scale's: the table says which seeds its numbers average."""
    results = {
        "command": "cbnorm reproduce adamatch --seeds 3 4",
        "seeds": [3, 4],
        "device": "cpu",
        "rows": [],
        "train_seconds": 0.0,
        "plan": None,
    }
    table = adamatch._adamatch_table("mnist", "digits", adamatch.ADAMATCH_SCALES["small"], results)
    assert "seeds 3, 4. Protocol: WRN-10-2, Adam lr 0.001" in table


def test_time_budget_plans_the_layers_and_the_table_says_which_ran(tmp_path, mnist_like, digits):
    """--time-budget with a mocked epoch (1 s, SCB-Norm 2 s): runs of 100 epochs do not fit 5 s; at --epochs 2 the
    first round (seed 0) costs 8 s, so its layers that still fit run: AdaMatch and DSBN (4 s), not SCB-Norm."""
    timed = []

    def timer(config, source, target, device, norms):
        timed.append((config.batch_size, config.epochs, config.grad_every, source.name, target.name, tuple(norms)))
        return {norm: 2.0 if norm == "scb" else 1.0 for norm in norms}

    scale = adamatch.AdaMatchScale("tiny", 64, 64, 32, 32, 100, 16, depth=10, lr=1e-3, bn_momentum=0.1, grad_every=4)
    options = dict(norms=adamatch.ADAMATCH_NORMS[:3], data=(mnist_like, digits), threads=1, progress=False,
                   command="test", out=tmp_path, time_budget=5 / 60, timer=timer)
    with pytest.raises(BudgetError, match="the cheapest, none, takes about 1.7 min for 100 epochs .* or --epochs"):
        adamatch.reproduce_adamatch("mnist", "digits", scale, **options)
    root = adamatch.reproduce_adamatch("mnist", "digits", scale, epochs=2, **options)
    assert timed[-1] == (16, 2, 4, "mnist-like", "digits", ("none", "scb", "dsbn"))
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["dsbn-seed0", "none-seed0"]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["plan"]["runs"] == [["none", 0], ["dsbn", 0]] and summary["seeds"] == [0]
    assert [(row["status"], row["seeds"]) for row in summary["rows"]] == [
        ("ok", [0]), ("not run: outside the --time-budget plan", []), ("ok", [0])]
    table = (root / "table.md").read_text()
    assert ("Only part of the protocol ran, as planned by --time-budget: time budget 0.0833333 min: 2 of 9 runs at "
            "2 epochs") in table and "runs (layer, seed): (none, 0), (dsbn, 0)" in table
    assert "| AdaMatch+SCB-Norm | not run: outside the --time-budget plan |" in table


def test_timing_an_epoch_on_this_device(mnist_like, digits):
    """The planner's timing: AdaMatch's steps, probed and not, and its evaluations, for each initial layer."""
    config = adamatch.AdaMatchConfig(source="mnist", target="digits", epochs=2, grad_every=2, device="cpu", **TINY)
    seconds = adamatch.time_adamatch_epochs(config, mnist_like, digits, torch.device("cpu"), ["none", "scb"], steps=1,
                                            warmup=1)
    assert set(seconds) == {"none", "scb"} and all(s > 0 for s in seconds.values())
