import numpy as np
import pytest
import torch
from torch import nn

import cbnorm
from cbnorm import functional as F
from tests import reference as ref
from tests.utils import compiled, roundtrip, to_numpy


def mixture_state(num_features=4, num_components=3, dtype=torch.float64):
    prior = torch.softmax(torch.randn(num_components, dtype=dtype), 0)
    centres = torch.linspace(-2, 2, num_components, dtype=dtype).unsqueeze(1)
    mean = centres + 0.2 * torch.randn(num_components, num_features, dtype=dtype)
    var = torch.rand(num_components, num_features, dtype=dtype) + 0.3
    return prior, mean, var


def bimodal(n=32, c=4, length=6, dtype=torch.float64):
    """Activations with two well-separated modes per channel."""
    modes = torch.where(torch.rand(n, c, length) < 0.4, -2.0, 2.0)
    return (modes + 0.5 * torch.randn(n, c, length)).to(dtype)


def ucb_with_state(*state, **kwargs):
    norm = cbnorm.UCBNorm(state[1].shape[1], state[1].shape[0], **kwargs).double()
    norm._set_state(*state)
    return norm


class TestUCBNormMovingAverage:
    def test_smoke_shapes(self):
        for shape in [(8, 4), (8, 4, 5), (8, 4, 5, 6), (8, 4, 2, 3, 4)]:
            norm = cbnorm.UCBNorm(4, 3)
            assert norm(torch.randn(shape)).shape == shape
            assert norm.eval()(torch.randn(shape)).shape == shape
        norm = cbnorm.UCBNorm(4, 3)
        assert norm.prior.shape == (3,) and norm.mean.shape == norm.var.shape == (3, 4)

    def test_training_equations(self):
        state = mixture_state()
        norm = ucb_with_state(*state, momentum=0.3)
        x = bimodal()
        y_ref, mass, E, V = ref.ucb_train(to_numpy(x), *map(to_numpy, state), 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x)), y_ref, rtol=1e-9, atol=1e-9)
        expected = ref.running_update(*map(to_numpy, state), mass, E, V, x.numel() // 4, 0.3)
        for got, want in zip((norm.prior, norm.mean, norm.var), expected):
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-9, atol=1e-12)
        assert int(norm.num_batches_tracked) == 1

    def test_inference_equation(self):
        state = mixture_state()
        norm = ucb_with_state(*state).eval()
        x = bimodal()
        expected = ref.ucb_eval(to_numpy(x), *map(to_numpy, state), 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x)), expected, rtol=1e-10)
        assert int(norm.num_batches_tracked) == 0

    def test_per_channel_priors(self):
        prior, mean, var = mixture_state()
        prior = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 0)
        x = bimodal()
        y, stats = F.ucb_norm_batch(x, prior, mean, var)
        y_ref, mass, E, V = ref.ucb_train(to_numpy(x), to_numpy(prior), to_numpy(mean), to_numpy(var), 1e-5)
        np.testing.assert_allclose(to_numpy(y), y_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(to_numpy(stats.var), V, rtol=1e-9, atol=1e-12)
        expected = ref.ucb_eval(to_numpy(x), to_numpy(prior), to_numpy(mean), to_numpy(var), 1e-5)
        np.testing.assert_allclose(to_numpy(F.ucb_norm(x, prior, mean, var)), expected, rtol=1e-10)

    def test_single_component_is_batchnorm(self):
        x = 3 * torch.randn(16, 4, 5, 5) + 2
        norm = cbnorm.UCBNorm(4, 1)
        norm(x)  # k-means++ seeds the state on the first batch; from there it is BatchNorm's update
        bn = nn.BatchNorm2d(4, affine=False)
        bn.running_mean.copy_(norm.running_mean[0])
        bn.running_var.copy_(norm.running_var[0])
        for _ in range(3):
            x = 3 * torch.randn(16, 4, 5, 5) + 2
            torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_mean[0], bn.running_mean)
        torch.testing.assert_close(norm.running_var[0], bn.running_var)
        norm.eval(), bn.eval()
        torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)

    def test_cumulative_momentum(self):
        norm = cbnorm.UCBNorm(4, 1, momentum=None)
        batches = [torch.randn(16, 4, 3) + i for i in range(3)]
        for x in batches:
            norm(x)
        # after the first batch (seed, then factor 1), the running mean is the average of the batch means
        torch.testing.assert_close(norm.running_mean[0], torch.stack([b.mean((0, 2)) for b in batches]).mean(0))

    def test_gradcheck(self):
        state = mixture_state(num_features=3, num_components=2)
        x = bimodal(4, 3, 3).requires_grad_()
        weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
        fn = lambda x, w, b: F.ucb_norm_batch(x, *state, w, b)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, weight.requires_grad_(), bias.requires_grad_()))
        assert torch.autograd.gradcheck(lambda x: F.ucb_norm(x, *state), (x,))

    def test_module_equals_functional(self):
        state = mixture_state()
        norm = ucb_with_state(*state)
        x = bimodal()
        torch.testing.assert_close(norm(x), F.ucb_norm_batch(x, *state)[0])
        norm.eval()
        torch.testing.assert_close(norm(x), F.ucb_norm(x, norm.prior, norm.mean, norm.var))

    def test_kmeans_init(self):
        norm = cbnorm.UCBNorm(4, 2)
        assert not norm.initialized
        norm.eval()(bimodal(dtype=torch.float32))
        assert not norm.initialized  # eval never initialises
        norm.train()
        x = bimodal(dtype=torch.float32)
        torch.manual_seed(1)
        init_state = cbnorm.mixture.init_mixture_1d(cbnorm.mixture.channel_samples(x, 4096), 2, 1e-5)
        torch.manual_seed(1)
        y, stats = F.ucb_norm_batch(x, *init_state)
        torch.manual_seed(1)
        torch.testing.assert_close(norm(x), y)
        assert norm.initialized
        # seeded near the two modes, sorted, priors near the mode weights
        torch.testing.assert_close(norm.mean, torch.tensor([[-2.0] * 4, [2.0] * 4]), atol=0.3, rtol=0)
        torch.testing.assert_close(norm.prior, torch.tensor([0.4, 0.6]), atol=0.1, rtol=0)

    def test_random_init(self):
        norm = cbnorm.UCBNorm(16, 3, init="random")
        assert norm.initialized
        assert (norm.mean.abs() <= 1).all() and ((norm.var >= 1e-3) & (norm.var <= 1e-2)).all()
        torch.testing.assert_close(norm.prior.sum(), torch.tensor(1.0))
        before = [t.clone() for t in (norm.prior, norm.mean, norm.var)]
        x = torch.randn(8, 16)
        stats = F.ucb_norm_batch(x, *before)[1]
        norm(x)  # no re-seeding: only the running update moves the state (where a component has mass)
        filled = stats.mass >= cbnorm.layers.MIN_MASS
        torch.testing.assert_close(norm.mean, torch.where(filled, torch.lerp(before[1], stats.mean, 0.1), before[1]))

    def test_empty_component_keeps_state_and_stays_finite(self):
        prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
        mean = torch.tensor([[0.0] * 4, [1e4] * 4], dtype=torch.float64)
        var = torch.ones(2, 4, dtype=torch.float64)
        norm = ucb_with_state(prior, mean, var)
        x = torch.randn(16, 4, 3, dtype=torch.float64, requires_grad=True)
        y = norm(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        torch.testing.assert_close(norm.mean[1], mean[1])
        torch.testing.assert_close(norm.var[1], var[1])
        assert torch.isfinite(norm.prior).all() and abs(float(norm.prior.sum()) - 1) < 1e-12
        # component 0 moves to 0.9 * 0.5 + 0.1 * 1, component 1 keeps 0.5, then both are renormalised
        torch.testing.assert_close(norm.prior, torch.tensor([0.55, 0.5], dtype=torch.float64) / 1.05)

    def test_component_with_less_than_one_activation_of_mass_keeps_its_state(self):
        prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
        mean = torch.tensor([[0.0] * 4, [4.5] * 4], dtype=torch.float64)
        var = torch.ones(2, 4, dtype=torch.float64)
        x = torch.zeros(16, 4, 3, dtype=torch.float64)
        x[0, :, 0] = 1.5  # component 1's mass: about 0.035 per channel, far above float eps, below 1
        stats = F.ucb_norm_batch(x, prior, mean, var)[1]
        assert (stats.mass[1] > 1e-3).all() and (stats.mass[1] < 1).all() and (stats.mass[0] > 1).all()
        norm = ucb_with_state(prior, mean, var)
        norm(x)
        torch.testing.assert_close(norm.mean[1], mean[1])
        torch.testing.assert_close(norm.var[1], var[1])
        torch.testing.assert_close(norm.mean[0], torch.lerp(mean[0], stats.mean[0], 0.1))
        moved = torch.lerp(prior[0], stats.mass[0].sum() / stats.mass.sum(), 0.1)
        torch.testing.assert_close(norm.prior, torch.stack([moved, prior[1]]) / (moved + prior[1]))

    def test_inference_stays_stable_when_a_component_fades(self, tmp_path):
        """Regression: following batches that hold almost none of a fading component drove its
        prior to ~1e-6 and its variance to ~1e-3; Eq. 15's tau/sqrt(prior) then blew up the test
        activations near it, and test accuracy fell from 99% to 27% in epochs 7-8 while training
        accuracy stayed at 99%."""
        from cbnorm.experiments.train import TrainConfig, train

        torch.set_num_threads(1)
        config = TrainConfig(dataset="digits", norm="ucb", epochs=8, batch_size=64, seed=2, progress=False,
                             out=str(tmp_path / "run"))
        history = train(config)
        assert min(row["test_acc"] for row in history[-3:]) > 0.9

    def test_constant_channel_is_finite(self):
        x = torch.randn(16, 4, 3)
        x[:, 2] = 5.0
        norm = cbnorm.UCBNorm(4, 3)
        for _ in range(3):
            assert torch.isfinite(norm(x)).all()
        for t in (norm.prior, norm.mean, norm.var):
            assert torch.isfinite(t).all()
        assert torch.isfinite(norm.eval()(x)).all()

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_batch_leaves_state_unchanged(self, bad):
        norm = cbnorm.UCBNorm(4, 3)
        norm(torch.randn(16, 4, 3))
        before = {k: v.clone() for k, v in norm.state_dict().items()}
        x = torch.randn(16, 4, 3)
        x[3, 1, 2] = bad
        message = (
            r"UCBNorm: the training batch contains non-finite values \(NaN or Inf\); "
            r"the layer's state was left unchanged"
        )
        with pytest.raises(ValueError, match=message):
            norm(x)
        for key, value in norm.state_dict().items():
            torch.testing.assert_close(value, before[key], msg=key)

    def test_non_finite_first_batch_does_not_initialise(self):
        norm = cbnorm.UCBNorm(4, 3)
        with pytest.raises(ValueError, match="non-finite"):
            norm(torch.full((8, 4), float("nan")))
        assert not norm.initialized and int(norm.num_batches_tracked) == 0

    def test_state_dict_roundtrip(self):
        norm = cbnorm.UCBNorm(4, 3, affine=True)
        norm(bimodal(dtype=torch.float32))
        assert set(norm.state_dict()) == {"weight", "bias", "running_prior", "running_mean", "running_var",
                                          "num_batches_tracked", "initialized"}
        fresh = cbnorm.UCBNorm(4, 3, affine=True, channel_dim=-1)
        fresh.load_state_dict(norm.state_dict())
        x = bimodal(dtype=torch.float32)
        for copy in roundtrip(norm) + [fresh]:
            assert copy.initialized and copy._initialized
            for a, b in zip((copy.prior, copy.mean, copy.var), (norm.prior, norm.mean, norm.var)):
                torch.testing.assert_close(a, b)
        # a loaded layer keeps its state on the next training batch instead of re-seeding it
        torch.testing.assert_close(fresh(x.transpose(1, 2)), norm(x).transpose(1, 2))
        torch.testing.assert_close(fresh.mean, norm.mean)

    def test_loading_into_a_model_syncs_the_initialized_flag(self):
        trained = nn.Sequential(nn.Linear(3, 4), cbnorm.UCBNorm(4, 2))
        trained(torch.randn(8, 3))
        fresh = nn.Sequential(nn.Linear(3, 4), cbnorm.UCBNorm(4, 2))
        fresh.load_state_dict(trained.state_dict())
        assert fresh[1]._initialized

    def test_channel_last(self):
        state = mixture_state()
        first, last = ucb_with_state(*state), ucb_with_state(*state, channel_dim=-1)
        x = bimodal()
        torch.testing.assert_close(last(x.transpose(1, 2)), first(x).transpose(1, 2))
        torch.testing.assert_close(last.mean, first.mean)
        first.eval(), last.eval()
        torch.testing.assert_close(last(x.transpose(1, 2)), first(x).transpose(1, 2))

    def test_autocast_and_dtypes(self):
        norm = cbnorm.UCBNorm(4, 3)
        x = bimodal(dtype=torch.float32)
        norm(x)
        reference = cbnorm.UCBNorm(4, 3)
        reference.load_state_dict(norm.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert norm.running_mean.dtype == torch.float32
        torch.testing.assert_close(y.float(), reference(x.bfloat16().float()), atol=0.03, rtol=0.03)
        torch.testing.assert_close(norm.running_mean, reference.running_mean)
        double = cbnorm.UCBNorm(4, 3).double()
        assert double(x.double()).dtype == torch.float64 and double.running_var.dtype == torch.float64

    def test_compile(self):
        state = mixture_state(dtype=torch.float32)
        norm = ucb_with_state(*state).float()
        eager = ucb_with_state(*state).float()
        fn = compiled(norm, fullgraph=True)
        for _ in range(2):
            x = bimodal(dtype=torch.float32)
            torch.testing.assert_close(fn(x), eager(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_mean, eager.running_mean)
        norm.eval(), eager.eval()
        torch.testing.assert_close(fn(x), eager(x), rtol=1e-5, atol=1e-5)

    def test_repr(self):
        assert repr(cbnorm.UCBNorm(4)) == (
            "UCBNorm(4, 3, update='moving_average', init='kmeans++', eps=1e-05, momentum=0.1, affine=False, "
            "channel_dim=1)"
        )

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"update": "ema"}, r"UCBNorm: expected update to be one of \('moving_average', 'weight'\), got 'ema'"),
            ({"init": "zeros"}, r"expected init to be one of \('kmeans\+\+', 'random'\), got 'zeros'"),
            ({"momentum": 1.5}, r"expected momentum in \[0, 1\] or None, got 1.5"),
            ({"num_components": 2.0}, r"expected the number of components to be a positive int, got 2.0"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.UCBNorm(4, **kwargs)

    @pytest.mark.parametrize(
        "x,match",
        [
            (torch.randn(4), r"UCBNorm: expected input of shape \(N, C, \*\) with at least 2 dims, got 1D"),
            (torch.randn(8, 3, 5), r"UCBNorm: expected 4 channels in dim 1, got 3"),
            (
                torch.randn(1, 4),
                r"UCBNorm: expected more than 1 value per channel when training, got input of shape \(1, 4\)",
            ),
        ],
    )
    def test_bad_input(self, x, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.UCBNorm(4, 3, init="random")(x)


class TestUCBNormWeight:
    def test_train_equals_eval_and_batch_size_one(self):
        norm = cbnorm.UCBNorm(4, 3, update="weight")
        norm(bimodal(dtype=torch.float32))  # seeds the parameters
        x = bimodal(dtype=torch.float32)
        y_train = norm(x)
        torch.testing.assert_close(norm.eval()(x), y_train)
        torch.testing.assert_close(norm.train()(x[:1]), y_train[:1])

    def test_equation(self):
        state = mixture_state()
        norm = ucb_with_state(*state, update="weight")
        x = bimodal()
        expected = ref.ucb_eval(to_numpy(x), *map(to_numpy, state), 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x)), expected, rtol=1e-10)
        for got, want in zip((norm.prior, norm.mean, norm.var), state):
            torch.testing.assert_close(got, want)

    def test_gradients_reach_prior_mean_var(self):
        norm = cbnorm.UCBNorm(4, 3, update="weight", init="random")
        norm(bimodal(dtype=torch.float32)).square().sum().backward()
        assert set(name for name, _ in norm.named_parameters()) == {"prior_logits", "loc", "log_var"}
        for p in norm.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        assert torch.autograd.gradcheck(F.ucb_norm, (bimodal(4, 3, 3).requires_grad_(),
                                                     *[t.requires_grad_() for t in mixture_state(3, 2)]))

    def test_init_is_kmeans_on_first_training_batch(self):
        norm = cbnorm.UCBNorm(4, 2, update="weight")
        optimizer = torch.optim.SGD(norm.parameters(), lr=0.1)
        norm(bimodal(dtype=torch.float32)).square().mean().backward()
        torch.testing.assert_close(norm.mean, torch.tensor([[-2.0] * 4, [2.0] * 4]), atol=0.4, rtol=0)
        seeded = norm.loc.detach().clone()
        optimizer.step()  # the optimizer holds the parameters that were seeded in place
        assert not torch.equal(norm.loc, seeded)

    def test_state_dict_and_compile(self):
        norm = cbnorm.UCBNorm(4, 3, update="weight")
        x = bimodal(dtype=torch.float32)
        norm(x)
        assert set(norm.state_dict()) == {"prior_logits", "loc", "log_var", "initialized"}
        for copy in roundtrip(norm):
            torch.testing.assert_close(copy(x), norm(x))
        torch.testing.assert_close(compiled(norm, fullgraph=True)(x), norm(x), rtol=1e-5, atol=1e-5)

    def test_non_finite_batch_raises(self):
        norm = cbnorm.UCBNorm(4, 3, update="weight", init="random")
        before = {k: v.clone() for k, v in norm.state_dict().items()}
        with pytest.raises(ValueError, match="UCBNorm: the training batch contains non-finite values"):
            norm(torch.full((8, 4), float("inf")))
        for key, value in norm.state_dict().items():
            torch.testing.assert_close(value, before[key])
