import numpy as np
import pytest
import torch
from torch import nn

import cbnorm
from cbnorm import functional as F
from cbnorm.mixture import channel_samples, fit_mixture_1d
from tests import reference as ref
from tests.utils import compiled, roundtrip, to_numpy


def bimodal(n=24, c=4, length=6, dtype=torch.float64):
    """Activations with two modes per channel, of different weights and spreads per channel."""
    low = torch.rand(n, c, length) < torch.linspace(0.3, 0.6, c)[:, None]
    x = torch.where(low, -2.0 + 0.4 * torch.randn(n, c, length), 1.5 + 0.8 * torch.randn(n, c, length))
    return x.to(dtype)


def warm_mn(c=4, k=2, **kwargs):
    """A float64 layer whose fit and running state have already been set by training batches."""
    norm = cbnorm.MixtureNorm(c, k, **kwargs).double()
    for _ in range(2):
        norm(bimodal(c=c))
    return norm


def state(norm):
    return {name: value.clone() for name, value in norm.state_dict().items()}


class TestMixtureNorm:
    def test_smoke_shapes(self):
        for shape in [(8, 4), (8, 4, 5), (8, 4, 5, 6), (8, 4, 2, 3, 4)]:
            norm = cbnorm.MixtureNorm(4, 3)
            assert norm(torch.randn(shape)).shape == shape
            assert norm.eval()(torch.randn(shape)).shape == shape
        for t in (*norm.fitted, norm.prior, norm.mean, norm.var):
            assert t.shape == (3, 4)
        assert norm.weight.shape == norm.bias.shape == (4,)  # affine by default, as in BatchNorm

    def test_training_equations(self):
        norm = warm_mn(momentum=0.3)
        before = {name: to_numpy(t) for name, t in state(norm).items()}
        x = bimodal()
        y = norm(x)
        xs = to_numpy(x)
        fit = np.empty((3, 2, 4))
        for c in range(4):  # 2 EM steps per channel from the previous fit
            start = (before[f"fit_{name}"][:, c] for name in ("prior", "mean", "var"))
            fit[:, :, c] = ref.em_1d(xs[:, c].ravel(), *start, 2, 1e-5)
        for i, name in enumerate(("prior", "mean", "var")):
            np.testing.assert_allclose(to_numpy(getattr(norm, f"fit_{name}")), fit[i], rtol=1e-9, atol=1e-12)
        y_ref, mass, E, V = ref.ucb_train(xs, *fit, 1e-5)
        np.testing.assert_allclose(to_numpy(y), y_ref, rtol=1e-9, atol=1e-9)  # affine is the identity at init
        running = (before["running_prior"], before["running_mean"], before["running_var"])
        expected = ref.running_update(*running, mass, E, V, x.numel() // 4, 0.3)
        for got, want in zip((norm.prior, norm.mean, norm.var), expected):
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-9, atol=1e-12)
        assert int(norm.num_batches_tracked) == 3

    def test_inference_equation(self):
        norm = warm_mn().eval()
        x = bimodal()
        before = state(norm)
        expected = ref.ucb_eval(to_numpy(x), to_numpy(norm.prior), to_numpy(norm.mean), to_numpy(norm.var), 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x)), expected, rtol=1e-10, atol=1e-12)
        for name, value in norm.state_dict().items():
            assert torch.equal(value, before[name]), name

    def test_first_batch_fits_from_kmeans(self):
        norm = cbnorm.MixtureNorm(4, 2).double()
        assert not norm.initialized
        x = bimodal()
        norm.eval()(x)
        assert not norm.initialized  # eval neither fits nor initialises
        torch.manual_seed(3)
        expected = fit_mixture_1d(channel_samples(x), 2, steps=2)
        torch.manual_seed(3)
        norm.train()(x)
        assert norm.initialized and norm._initialized
        for got, want in zip(norm.fitted, expected):
            torch.testing.assert_close(got, want)
        # near the two modes, sorted, priors near the per-channel fraction of the lower mode
        modes = torch.tensor([[-2.0] * 4, [1.5] * 4], dtype=torch.float64)
        torch.testing.assert_close(norm.fit_mean, modes, atol=0.3, rtol=0)
        torch.testing.assert_close(norm.fit_prior[0], (x < -0.5).double().mean((0, 2)), atol=0.02, rtol=0)
        norm.reset_running_stats()  # back to the start: the next batch fits from k-means again
        assert not norm.initialized and not norm._initialized and int(norm.num_batches_tracked) == 0
        assert torch.equal(norm.fit_mean, torch.zeros(2, 4, dtype=torch.float64))
        assert torch.equal(norm.running_prior, torch.full((2, 4), 0.5, dtype=torch.float64))

    def test_warm_start_from_previous_fit(self):
        norm = warm_mn(em_steps=3)
        previous = [t.clone() for t in norm.fitted]
        x = bimodal()
        norm(x)
        for got, want in zip(norm.fitted, fit_mixture_1d(channel_samples(x), 2, steps=3, init=previous)):
            torch.testing.assert_close(got, want)

    def test_single_component_is_batchnorm(self):
        norm, bn = cbnorm.MixtureNorm(4, 1), nn.BatchNorm2d(4)
        nn.init.uniform_(bn.weight), nn.init.uniform_(bn.bias)
        norm.load_state_dict({"weight": bn.weight, "bias": bn.bias}, strict=False)
        for _ in range(3):
            x = 3 * torch.randn(16, 4, 5, 5) + 2
            torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_mean[0], bn.running_mean)
        torch.testing.assert_close(norm.running_var[0], bn.running_var)
        assert torch.equal(norm.running_prior, torch.ones(1, 4))
        norm.eval(), bn.eval()
        torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)

    def test_gradcheck(self):
        x = bimodal(4, 3, 3)
        fit = fit_mixture_1d(channel_samples(x), 2, steps=2, generator=0)  # the fit is a constant of the step
        weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
        fn = lambda x, w, b: F.ucb_norm_batch(x, *fit, w, b)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))
        assert torch.autograd.gradcheck(lambda x: F.ucb_norm(x, *fit), (x,))

    def test_module_equals_functional(self):
        norm = warm_mn()
        previous = [t.clone() for t in norm.fitted]
        x = bimodal().requires_grad_()
        y = norm(x)
        x_ref = x.detach().clone().requires_grad_()
        fit = fit_mixture_1d(channel_samples(x_ref.detach()), 2, steps=2, init=previous)
        y_ref = F.ucb_norm_batch(x_ref, *fit, norm.weight, norm.bias)[0]
        torch.testing.assert_close(y, y_ref)
        y.square().sum().backward(), y_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        norm.eval()
        torch.testing.assert_close(norm(x), F.ucb_norm(x, norm.prior, norm.mean, norm.var, norm.weight, norm.bias))

    def test_constant_channel(self):
        x = bimodal(dtype=torch.float32)
        x[:, 2] = 5.0
        norm = cbnorm.MixtureNorm(4, 3)
        nn.init.constant_(norm.bias, 0.25)
        for _ in range(3):
            y = norm(x)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y[:, 2], torch.full_like(y[:, 2], 0.25))  # beta, as in BatchNorm
        for t in norm.state_dict().values():
            assert torch.isfinite(t.float()).all()
        assert float(norm.fit_prior[:, 2].max()) > 1 - 1e-5  # one component holds the channel
        torch.testing.assert_close(norm.fit_mean[:, 2], torch.full((3,), 5.0))
        assert torch.isfinite(norm.eval()(x)).all()

    def test_more_components_than_distinct_values(self):
        x = bimodal(dtype=torch.float32)
        x[:, 1] = torch.where(torch.rand(24, 6) < 0.3, -1.0, 1.0)  # 2 values, 3 components
        norm = cbnorm.MixtureNorm(4, 3)
        x.requires_grad_()
        for _ in range(3):
            y = norm(x)
            y.square().sum().backward()
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        empty = norm.fit_prior[:, 1] < 1e-5
        assert int(empty.sum()) == 1  # the surplus component drops out
        occupied = norm.fit_mean[~empty, 1]
        torch.testing.assert_close(occupied, torch.tensor([-1.0, 1.0]))
        # each value is standardised within its own component: 0 before affine
        torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]), atol=2e-3, rtol=0)
        assert torch.isfinite(norm.eval()(x)).all()

    @pytest.mark.parametrize("bad,match", [
        *[(bad, r"MixtureNorm: the training batch contains non-finite values \(NaN or Inf\); the layer's state was "
                r"left unchanged") for bad in (float("nan"), float("inf"), -float("inf"))],
        (1e30, r"MixtureNorm: the training batch is finite, but its statistics overflow torch.float32: its largest "
               r"magnitude is 1e\+30 \(the largest torch.float32 is 3.4e\+38\); scale the input down; the layer's "
               r"state was left unchanged"),
    ])
    def test_non_finite_batch_leaves_state_unchanged(self, bad, match):
        norm = cbnorm.MixtureNorm(4, 3)
        norm(bimodal(dtype=torch.float32))
        before = state(norm)
        x = bimodal(dtype=torch.float32)
        x[3, 1, 2] = bad  # 1e30 is finite, but its square overflows the statistics
        with pytest.raises(ValueError, match=match):
            norm(x)
        for name, value in norm.state_dict().items():
            assert torch.equal(value, before[name]), name

    def test_non_finite_first_batch_does_not_initialise(self):
        norm = cbnorm.MixtureNorm(4, 3)
        with pytest.raises(ValueError, match="MixtureNorm: the training batch contains non-finite values"):
            norm(torch.full((8, 4), float("nan")))
        assert not norm.initialized and int(norm.num_batches_tracked) == 0

    def test_non_finite_entry_in_eval_stays_local(self):
        norm = warm_mn().eval()
        x = bimodal()
        x[0, 1, 0] = float("nan")
        y = norm(x)
        assert torch.isnan(y[0, 1, 0]) and int(torch.isfinite(y).logical_not().sum()) == 1

    def test_empty_input(self):
        norm = cbnorm.MixtureNorm(4, 3)
        message = (
            r"MixtureNorm: expected more than 1 value per channel when training, got input of shape \(0, 4, 3\)"
        )
        with pytest.raises(ValueError, match=message):
            norm(torch.randn(0, 4, 3))
        assert norm.eval()(torch.randn(0, 4, 3)).shape == (0, 4, 3)

    def test_state_dict_roundtrip(self):
        norm = cbnorm.MixtureNorm(4, 3)
        norm(bimodal(dtype=torch.float32))
        assert set(norm.state_dict()) == {"weight", "bias", "running_prior", "running_mean", "running_var",
                                          "num_batches_tracked", "fit_prior", "fit_mean", "fit_var", "initialized"}
        fresh = cbnorm.MixtureNorm(4, 3, channel_dim=-1)
        fresh.load_state_dict(norm.state_dict())
        x = bimodal(dtype=torch.float32)
        for copy in roundtrip(norm) + [fresh]:
            assert copy.initialized and copy._initialized
            for name, value in norm.state_dict().items():
                assert torch.equal(copy.state_dict()[name], value), name
        # a loaded layer warm-starts from the saved fit instead of re-seeding
        torch.testing.assert_close(fresh(x.transpose(1, 2)), norm(x).transpose(1, 2))
        for a, b in zip(fresh.fitted, norm.fitted):
            torch.testing.assert_close(a, b)
        fresh.eval(), norm.eval()
        torch.testing.assert_close(fresh(x.transpose(1, 2)), norm(x).transpose(1, 2))

    def test_compile(self):
        norm, eager = cbnorm.MixtureNorm(4, 3), cbnorm.MixtureNorm(4, 3)
        norm(bimodal(dtype=torch.float32))  # the first batch (k-means++) runs eagerly
        eager.load_state_dict(norm.state_dict())
        fn = compiled(norm, fullgraph=True)
        for _ in range(2):
            x = bimodal(dtype=torch.float32)
            torch.testing.assert_close(fn(x), eager(x), rtol=1e-5, atol=1e-5)
        for a, b in zip(norm.state_dict().values(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        norm.eval(), eager.eval()
        torch.testing.assert_close(fn(x), eager(x), rtol=1e-5, atol=1e-5)

    def test_autocast_and_dtypes(self):
        norm = cbnorm.MixtureNorm(4, 3)
        x = bimodal(dtype=torch.float32)
        norm(x)
        reference = cbnorm.MixtureNorm(4, 3)
        reference.load_state_dict(norm.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert all(t.dtype == torch.float32 for t in (*norm.fitted, norm.running_mean))
        torch.testing.assert_close(y.float(), reference(x.bfloat16().float()), atol=0.03, rtol=0.03)
        torch.testing.assert_close(norm.fit_mean, reference.fit_mean)
        torch.testing.assert_close(norm.running_mean, reference.running_mean)
        double = cbnorm.MixtureNorm(4, 3).double()
        assert double(x.double()).dtype == torch.float64
        assert all(t.dtype == torch.float64 for t in (*double.fitted, double.running_var, double.weight))

    def test_registry_and_convert(self):
        assert cbnorm.get_norm_layer("mn") is cbnorm.MixtureNorm and "mn" in cbnorm.norm_layer_names()
        net = cbnorm.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "mn", num_components=2)
        assert isinstance(net[1], cbnorm.MixtureNorm) and net[1].num_components == 2
        assert net(torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)

    def test_repr(self):
        assert repr(cbnorm.MixtureNorm(4)) == (
            "MixtureNorm(4, 3, em_steps=2, eps=1e-05, momentum=0.1, affine=True, channel_dim=1)"
        )

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"em_steps": 0}, r"MixtureNorm: expected em_steps to be a positive int, got 0"),
            ({"momentum": -0.1}, r"MixtureNorm: expected momentum in \[0, 1\] or None, got -0.1"),
            ({"num_components": 0}, r"MixtureNorm: expected the number of components to be a positive int, got 0"),
            ({"eps": 0.0}, r"MixtureNorm: expected eps > 0, got 0.0"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.MixtureNorm(4, **kwargs)

    @pytest.mark.parametrize(
        "x,match",
        [
            (torch.randn(4), r"MixtureNorm: expected input of shape \(N, C, \*\) with at least 2 dims, got 1D"),
            (torch.randn(8, 3, 5), r"MixtureNorm: expected 4 channels in dim 1, got 3"),
            (
                torch.randn(1, 4),
                r"MixtureNorm: expected more than 1 value per channel when training, got input of shape \(1, 4\)",
            ),
            (torch.ones(8, 4, dtype=torch.long), r"MixtureNorm: expected a floating-point input, got torch.int64"),
        ],
    )
    def test_bad_input(self, x, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.MixtureNorm(4, 3)(x)
