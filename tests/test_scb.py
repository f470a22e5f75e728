import itertools

import numpy as np
import pytest
import torch
from torch import nn

import cbnorm
from cbnorm import functional as F
from tests import reference as ref
from tests.utils import compiled, roundtrip, to_numpy


def trained_scb(num_features=4, num_clusters=3, **kwargs):
    """An SCB layer with distinct, non-trivial cluster statistics."""
    norm = cbnorm.SCBNorm(num_features, num_clusters, **kwargs).double()
    with torch.no_grad():
        norm.loc.copy_(torch.linspace(-2, 2, num_clusters).unsqueeze(1) + 0.1 * torch.randn(num_clusters, num_features))
        norm.log_var.copy_(0.5 * torch.randn(num_clusters, num_features))
    return norm


class TestSCBNorm:
    def test_smoke_shapes(self):
        for shape in [(8, 4), (8, 4, 5), (8, 4, 5, 6), (8, 4, 2, 3, 4)]:
            norm = cbnorm.SCBNorm(4, 3)
            ids = torch.randint(0, 3, (8,))
            assert norm(torch.randn(shape), ids).shape == shape
            assert norm.eval()(torch.randn(shape)).shape == shape
        assert cbnorm.SCBNorm(4, 3).mean.shape == cbnorm.SCBNorm(4, 3).var.shape == (3, 4)

    def test_new_layer_is_identity(self):
        x = torch.randn(8, 4, 5)
        y = cbnorm.SCBNorm(4, 3)(x, torch.randint(0, 3, (8,)))
        torch.testing.assert_close(y, x / (1 + 1e-5) ** 0.5)

    def test_known_cluster_equation(self):
        norm = trained_scb()
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
        mean, var = to_numpy(norm.mean), to_numpy(norm.var)
        expected = ref.sample_norm(to_numpy(x), mean[ids.numpy()], var[ids.numpy()], 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x, ids)), expected, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("rule,scope", list(itertools.product(F.UNKNOWN_RULES, F.POSTERIOR_SCOPES)))
    def test_unknown_cluster_equations(self, rule, scope):
        norm = trained_scb(unknown=rule, posterior=scope).eval()
        x = 2 * torch.randn(6, 4, 5, dtype=torch.float64)
        expected = ref.scb_unknown(to_numpy(x), to_numpy(norm.mean), to_numpy(norm.var), 1e-5, rule, scope)
        np.testing.assert_allclose(to_numpy(norm(x)), expected, rtol=1e-10, atol=1e-10)

    def test_single_cluster_unknown_equals_known(self):
        norm = trained_scb(num_clusters=1).eval()
        x = torch.randn(6, 4, 5, dtype=torch.float64)
        torch.testing.assert_close(norm(x), norm(x, torch.zeros(6, dtype=torch.long)))

    @pytest.mark.parametrize(
        "rule,scope", [("paper", "element"), ("posterior", "sample"), ("map", "element"), (None, None)]
    )
    def test_gradcheck(self, rule, scope):
        norm = trained_scb(num_features=3, num_clusters=2)
        x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
        ids = None if rule is None else torch.tensor([0, 1, 1, 0])

        def fn(x, loc, log_var, weight, bias):
            return F.scb_norm(x, ids, loc, log_var.exp(), weight, bias, 1e-5, rule or "paper", scope or "element")

        params = (norm.loc, norm.log_var, torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64))
        assert torch.autograd.gradcheck(fn, (x, *[p.detach().requires_grad_() for p in params]))

    def test_module_equals_functional(self):
        norm = trained_scb(affine=True)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2)
            norm.bias.normal_()
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        torch.testing.assert_close(norm(x, ids), F.scb_norm(x, ids, norm.mean, norm.var, norm.weight, norm.bias))
        norm.eval()
        torch.testing.assert_close(norm(x), F.scb_norm(x, None, norm.mean, norm.var, norm.weight, norm.bias))

    def test_gradients_reach_statistics(self):
        norm = cbnorm.SCBNorm(4, 3)
        norm(torch.randn(8, 4, 5), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])).square().sum().backward()
        assert norm.loc.grad[:2].abs().sum() > 0 and norm.log_var.grad[:2].abs().sum() > 0
        assert norm.loc.grad[2].abs().sum() == 0  # no sample of cluster 2

    def test_channel_last(self):
        first, last = trained_scb(), trained_scb(channel_dim=-1)
        last.load_state_dict(first.state_dict())
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        torch.testing.assert_close(last(x.transpose(1, 2), ids), first(x, ids).transpose(1, 2))
        first.eval(), last.eval()
        torch.testing.assert_close(last(x.transpose(1, 2)), first(x).transpose(1, 2))

    def test_cluster_context(self):
        model = nn.Sequential(nn.Linear(5, 4), cbnorm.SCBNorm(4, 3), nn.ReLU(), cbnorm.SCBNormBase(4, 3))
        x, ids = torch.randn(6, 5), torch.randint(0, 3, (6,))
        with cbnorm.cluster_context(ids):
            y = model(x)
        h = model[0](x)
        torch.testing.assert_close(y, model[3](model[2](model[1](h, ids)), ids))
        with pytest.raises(ValueError, match="cluster ids are required"):
            model(x)

    def test_explicit_cluster_wins_over_context(self):
        norm = trained_scb()
        x, ids = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        with cbnorm.cluster_context((ids + 1) % 3):
            torch.testing.assert_close(norm(x, ids), norm.eval()(x, ids))
            norm.train()
            assert not torch.allclose(norm(x, ids), norm(x))

    def test_state_dict_roundtrip(self):
        norm = trained_scb(affine=True)
        fresh = cbnorm.SCBNorm(4, 3, affine=True, channel_dim=-1).double()
        fresh.load_state_dict(norm.state_dict())
        assert set(norm.state_dict()) == {"loc", "log_var", "weight", "bias"}
        for copy in roundtrip(norm) + [fresh]:
            torch.testing.assert_close(copy.mean, norm.mean)
            torch.testing.assert_close(copy.var, norm.var)

    def test_double_and_half_module(self):
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        assert cbnorm.SCBNorm(4, 3).double()(x, ids).dtype == torch.float64
        y = cbnorm.SCBNorm(4, 3).bfloat16()(x.bfloat16(), ids)
        assert y.dtype == torch.bfloat16

    def test_autocast(self):
        norm, conv = trained_scb().float(), nn.Conv2d(3, 4, 3, padding=1)
        x, ids = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            y = norm(h, ids)
        assert h.dtype == y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), norm(h.float(), ids), atol=0.02, rtol=0.02)

    def test_compile(self):
        norm = trained_scb().float()
        x, ids = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
        fn = compiled(norm, fullgraph=True)
        torch.testing.assert_close(fn(x, ids), norm(x, ids))
        with cbnorm.cluster_context(ids):  # a ContextVar: read between graphs, so not under fullgraph
            torch.testing.assert_close(compiled(norm)(x), norm(x, ids))
        norm.eval()
        torch.testing.assert_close(fn(x), norm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fn(x, ids), norm(x, ids))

    def test_finite_batch_whose_sum_overflows_passes(self):
        x = torch.full((6, 4), 3e38)
        y = cbnorm.SCBNorm(4, 3)(x, torch.zeros(6, dtype=torch.long))
        assert torch.isfinite(y).all()

    def test_repr(self):
        assert repr(cbnorm.SCBNorm(4, 3)) == (
            "SCBNorm(4, 3, eps=1e-05, affine=False, channel_dim=1, unknown='paper', posterior='element')"
        )

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"num_features": 0, "num_clusters": 3}, r"SCBNorm: expected num_features to be a positive int, got 0"),
            ({"num_features": 4, "num_clusters": 0}, r"expected the number of components to be a positive int, got 0"),
            ({"num_features": 4, "num_clusters": 3, "eps": 0}, r"expected eps > 0, got 0"),
            ({"num_features": 4, "num_clusters": 3, "channel_dim": 0}, r"channel_dim to be a non-zero int"),
            (
                {"num_features": 4, "num_clusters": 3, "unknown": "mean"},
                r"expected unknown to be one of .*'paper'.*got 'mean'",
            ),
            (
                {"num_features": 4, "num_clusters": 3, "posterior": "batch"},
                r"expected posterior to be one of .*got 'batch'",
            ),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.SCBNorm(**kwargs)

    @pytest.mark.parametrize(
        "x,ids,match",
        [
            (torch.randn(4), None, r"SCBNorm: expected input of shape \(N, C, \*\) with at least 2 dims, got 1D"),
            (
                torch.randn(6, 5, 3),
                None,
                r"SCBNorm: expected 4 channels in dim 1, got 5 \(input of shape \(6, 5, 3\)\)",
            ),
            (torch.randint(0, 3, (6, 4)), None, r"expected a floating-point input, got torch.int64"),
            (torch.randn(6, 4), torch.zeros(6), r"expected cluster ids of dtype torch.int64, got torch.float32"),
            (
                torch.randn(6, 4),
                torch.zeros(5, dtype=torch.long),
                r"expected cluster ids of shape \(6,\) for a batch of 6, got shape \(5,\)",
            ),
            (
                torch.randn(6, 4),
                torch.tensor([0, 1, 2, 3, 0, 0]),
                r"cluster id 3 is out of range for num_clusters=3; expected ids in \[0, 3\)",
            ),
            (torch.randn(6, 4), torch.tensor([0, 1, -1, 2, 0, 0]), r"cluster id -1 is out of range for num_clusters=3"),
            (torch.randn(6, 4), [0, 1, 2, 0, 1, 2], r"expected cluster ids as a torch.Tensor, got list"),
            (torch.randn(6, 4), None, r"SCBNorm: cluster ids are required in training mode"),
            (
                torch.full((6, 4), float("nan")),
                torch.zeros(6, dtype=torch.long),
                r"SCBNorm: the training batch contains non-finite values",
            ),
        ],
    )
    def test_bad_input(self, x, ids, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.SCBNorm(4, 3)(x, ids)


class TestSCBNormBase:
    def test_smoke_shapes(self):
        for shape in [(8, 4), (8, 4, 5), (8, 4, 5, 6)]:
            norm = cbnorm.SCBNormBase(4, 3)
            assert norm(torch.randn(shape), torch.randint(0, 3, (8,))).shape == shape
            assert norm.eval()(torch.randn(shape)).shape == shape

    def test_new_layer_is_identity(self):
        x = torch.randn(8, 4, 5)
        torch.testing.assert_close(cbnorm.SCBNormBase(4, 3)(x, torch.randint(0, 3, (8,))), x / (1 + 1e-5) ** 0.5)

    def _trained(self, **kwargs):
        norm = cbnorm.SCBNormBase(4, 3, **kwargs).double()
        for p in norm.parameters():
            nn.init.normal_(p, std=0.5)
        return norm

    def test_equation(self):
        norm = self._trained()
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
        W_mu, b_mu = to_numpy(norm.mean_proj.weight), to_numpy(norm.mean_proj.bias)
        W_s, b_s = to_numpy(norm.log_var_proj.weight), to_numpy(norm.log_var_proj.bias)
        onehot = np.eye(3)[ids.numpy()]
        expected = ref.sample_norm(to_numpy(x), onehot @ W_mu.T + b_mu, np.exp(onehot @ W_s.T + b_s), 1e-5)
        np.testing.assert_allclose(to_numpy(norm(x, ids)), expected, rtol=1e-12, atol=1e-12)
        # the per-cluster statistics exposed as (K, C)
        np.testing.assert_allclose(to_numpy(norm.mean), W_mu.T + b_mu)
        np.testing.assert_allclose(to_numpy(norm.var), np.exp(W_s.T + b_s))

    def test_soft_assignment_and_unknown(self):
        norm = self._trained()
        x = torch.randn(6, 4, 5, dtype=torch.float64)
        ids = torch.randint(0, 3, (6,))
        torch.testing.assert_close(norm(x, nn.functional.one_hot(ids, 3).double()), norm(x, ids))
        soft = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
        a = soft.numpy()
        expected = ref.sample_norm(
            to_numpy(x),
            a @ to_numpy(norm.mean_proj.weight).T + to_numpy(norm.mean_proj.bias),
            np.exp(a @ to_numpy(norm.log_var_proj.weight).T + to_numpy(norm.log_var_proj.bias)),
            1e-5,
        )
        np.testing.assert_allclose(to_numpy(norm(x, soft)), expected, rtol=1e-12)
        norm.eval()
        torch.testing.assert_close(norm(x), norm(x, torch.full((6, 3), 1 / 3, dtype=torch.float64)))

    def test_gradcheck(self):
        norm = self._trained()
        x = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
        soft = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1).requires_grad_()
        params = [p.detach().requires_grad_() for p in (norm.mean_proj.weight, norm.mean_proj.bias,
                                                        norm.log_var_proj.weight, norm.log_var_proj.bias)]
        assert torch.autograd.gradcheck(F.scb_base_norm, (x, soft, *params))

    def test_module_equals_functional(self):
        norm = self._trained(affine=True)
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        expected = F.scb_base_norm(x, nn.functional.one_hot(ids, 3), norm.mean_proj.weight, norm.mean_proj.bias,
                                   norm.log_var_proj.weight, norm.log_var_proj.bias, norm.weight, norm.bias)
        torch.testing.assert_close(norm(x, ids), expected)

    def test_state_dict_and_channel_last(self):
        norm = self._trained()
        last = cbnorm.SCBNormBase(4, 3, channel_dim=-1).double()
        last.load_state_dict(norm.state_dict())
        x, ids = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
        torch.testing.assert_close(last(x.transpose(1, 2), ids), norm(x, ids).transpose(1, 2))
        for copy in roundtrip(norm):
            torch.testing.assert_close(copy(x, ids), norm(x, ids))

    def test_autocast_keeps_statistics_in_float32(self):
        norm = self._trained().float()
        x, ids = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.bfloat16(), ids)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), norm(x.bfloat16().float(), ids), atol=0.02, rtol=0.02)

    def test_compile(self):
        norm = self._trained().float()
        x, ids = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
        torch.testing.assert_close(compiled(norm, fullgraph=True)(x, ids), norm(x, ids))

    @pytest.mark.parametrize(
        "cluster,match",
        [
            (torch.ones(6, 2) / 2, r"SCBNormBase: expected a cluster assignment of shape \(6, 3\), got shape \(6, 2\)"),
            (
                torch.ones(6, 3),
                r"expected a cluster assignment with non-negative rows summing to 1, got row sums in \[3, 3\]",
            ),
            (torch.tensor([[1.5, -0.5, 0.0]] * 6), r"non-negative rows summing to 1.*minimum -0.5"),
            (torch.tensor([0, 1, 2, 3, 0, 0]), r"SCBNormBase: cluster id 3 is out of range for num_clusters=3"),
            (None, r"SCBNormBase: cluster ids are required in training mode"),
        ],
    )
    def test_bad_input(self, cluster, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.SCBNormBase(4, 3)(torch.randn(6, 4), cluster)
