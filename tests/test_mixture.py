import gzip
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import cbnorm
from cbnorm.mixture import GaussianMixture, fit_mixture_1d, init_mixture_1d, kmeans, kmeans_plusplus_1d
from tests import reference as ref
from tests.utils import to_numpy


def blobs(n, weights, means, stds, seed=0):
    """``n`` samples of a diagonal Gaussian mixture with known parameters; returns (x float64, labels)."""
    g = torch.Generator().manual_seed(seed)
    means, stds = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(stds, dtype=torch.float64)
    labels = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)
    return means[labels] + stds[labels] * torch.randn(n, means.shape[1], generator=g, dtype=torch.float64), labels


def overlapping(seed, n=1500, dims=3, k=3):
    """Overlapping components with unequal spreads: EM needs tens of iterations."""
    g = torch.Generator().manual_seed(100 + seed)
    means = 1.5 * torch.randn(k, dims, generator=g, dtype=torch.float64)
    stds = 0.5 + torch.rand(k, dims, generator=g, dtype=torch.float64)
    return blobs(n, torch.softmax(torch.randn(k, generator=g), 0), means, stds, seed)[0]


def sklearn_from(start, **kwargs):
    """scikit-learn's GaussianMixture starting from (weights, means, variances), with our default tol."""
    weights, means, variances = (np.asarray(t, dtype=np.float64) for t in start)
    return SkGaussianMixture(len(weights), covariance_type="diag", weights_init=weights, means_init=means,
                             precisions_init=1 / variances, **{"tol": 1e-4, **kwargs})


def random_start(x, k, seed):
    """A poor start: k data points as means, equal weights, unit variances."""
    g = torch.Generator().manual_seed(seed)
    return np.full(k, 1 / k), to_numpy(x[torch.randperm(len(x), generator=g)[:k]]), np.ones((k, x.shape[1]))


def rows_1d(c=4, m=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    modes = torch.where(torch.rand(c, m, generator=g) < 0.35, -1.5, 1.0)
    return (modes + 0.6 * torch.randn(c, m, generator=g)).double()


def start_1d(k=2, c=4):
    return (torch.full((k, c), 1.0 / k, dtype=torch.float64),
            torch.linspace(-1, 1, k, dtype=torch.float64).unsqueeze(1).repeat(1, c),
            torch.ones(k, c, dtype=torch.float64))


class TestFitMixture1d:
    def test_em_steps_match_reference(self):
        x, start = rows_1d(), start_1d()
        fit = fit_mixture_1d(x, 2, steps=4, init=start)
        for c in range(4):
            expected = ref.em_1d(to_numpy(x[c]), *(to_numpy(t[:, c]) for t in start), 4, 1e-5)
            for got, want in zip(fit, expected):
                np.testing.assert_allclose(to_numpy(got[:, c]), want, rtol=1e-10, atol=1e-13)

    def test_matches_sklearn_step_for_step(self):
        x, start = rows_1d(seed=1), start_1d()
        fit = fit_mixture_1d(x, 2, steps=6, init=start)
        for c in range(4):
            prior, mean, var = (to_numpy(t[:, c]) for t in start)
            sk = sklearn_from((prior, mean[:, None], var[:, None]), max_iter=6, tol=0, reg_covar=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "did not converge": tol=0 runs exactly max_iter steps
                sk.fit(to_numpy(x[c]).reshape(-1, 1))
            for got, want in zip(fit, (sk.weights_, sk.means_[:, 0], sk.covariances_[:, 0])):
                np.testing.assert_allclose(to_numpy(got[:, c]), want, rtol=1e-10, atol=1e-13)

    def test_cold_start_is_the_kmeans_partition(self):
        x = rows_1d().float()
        fit = fit_mixture_1d(x, 2, steps=0, generator=3)
        prior, mean, var = init_mixture_1d(x, 2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(fit.mean, mean)
        torch.testing.assert_close(fit.var, var)
        torch.testing.assert_close(fit.prior.mean(1), prior, atol=1e-2, rtol=0)  # per-row vs pooled, smoothed
        assert (fit.mean[0] < fit.mean[1]).all()  # sorted by mean

    def test_recovers_known_mixtures(self):
        g = torch.Generator().manual_seed(0)
        prior = torch.tensor([[0.2, 0.5], [0.5, 0.3], [0.3, 0.2]])
        mean = torch.tensor([[-4.0, -1.0], [0.0, 2.0], [3.0, 6.0]])
        std = torch.tensor([[0.5, 0.3], [1.0, 0.6], [0.4, 1.0]])
        z = torch.stack([torch.multinomial(prior[:, c], 10000, replacement=True, generator=g) for c in range(2)])
        x = mean.T.gather(1, z) + std.T.gather(1, z) * torch.randn(2, 10000, generator=g)
        fit = fit_mixture_1d(x, 3, steps=30, generator=0)
        torch.testing.assert_close(fit.prior, prior, atol=0.015, rtol=0)
        torch.testing.assert_close(fit.mean, mean, atol=0.05, rtol=0)
        torch.testing.assert_close(fit.var.sqrt(), std, atol=0.04, rtol=0)

    def test_deterministic_and_warm_start_draws_nothing(self):
        x = rows_1d().float()
        a, b = fit_mixture_1d(x, 3, generator=7), fit_mixture_1d(x, 3, generator=torch.Generator().manual_seed(7))
        for t, u in zip(a, b):
            assert torch.equal(t, u)
        state = torch.get_rng_state()
        fit_mixture_1d(x, 3, init=a)
        assert torch.equal(torch.get_rng_state(), state)

    def test_degenerate_rows_are_finite(self):
        x = torch.randn(4, 50)
        x[0] = 2.0  # constant
        x[1] = torch.where(torch.arange(50) < 20, -1.0, 1.0)  # 2 distinct values for 3 components
        x[2, :49] = 0.0  # one outlier
        fit = fit_mixture_1d(x, 3, steps=5, generator=0)
        for t in fit:
            assert torch.isfinite(t).all()
        torch.testing.assert_close(fit.prior.sum(0), torch.ones(4))
        assert (fit.var >= 1e-5).all()
        assert fit.prior[:, 0].max() > 1 - 1e-5
        torch.testing.assert_close(fit.mean[:, 0], torch.full((3,), 2.0))
        occupied = (fit.prior[:, 1] > 1e-5).sum()
        assert occupied == 2 and (fit.prior[:, 1] <= 1e-5).sum() == 1  # the surplus component is empty
        torch.testing.assert_close(fit.mean[fit.prior[:, 1] > 1e-5, 1], torch.tensor([-1.0, 1.0]))

    def test_single_point_component_takes_the_row_variance(self):
        x = torch.cat([torch.linspace(-1, 1, 49), torch.tensor([30.0])]).unsqueeze(0)
        fit = fit_mixture_1d(x, 2, steps=0, generator=0)  # the outlier is a cluster of its own
        torch.testing.assert_close(fit.mean[:, 0], torch.tensor([0.0, 30.0]), atol=1e-6, rtol=0)
        torch.testing.assert_close(fit.var[1, 0], x.var(correction=0))
        torch.testing.assert_close(fit.var[0, 0], torch.linspace(-1, 1, 49).var(correction=0))

    def test_empty_component_keeps_its_state(self):
        x = torch.randn(2, 40, dtype=torch.float64)
        start = (torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64),
                 torch.tensor([[0.0, 0.0], [1e3, 1e3]], dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
        fit = fit_mixture_1d(x, 2, steps=3, init=start)
        torch.testing.assert_close(fit.mean[1], start[1][1])
        torch.testing.assert_close(fit.var[1], start[2][1])
        assert (fit.prior[1] < 1e-12).all()

    @pytest.mark.parametrize(
        "x,kwargs,match",
        [
            (
                torch.randn(10),
                {},
                r"fit_mixture_1d: expected a floating-point \(C, M\) tensor with M > 0, "
                r"got torch.float32 of shape \(10,\)",
            ),
            (torch.zeros(3, 0), {}, r"got torch.float32 of shape \(3, 0\)"),
            (
                torch.randn(3, 8),
                {"init": start_1d(2, 2)},
                r"expected init \(prior, mean, var\) of shape \(2, 3\) each, got \[\(2, 2\)",
            ),
        ],
    )
    def test_bad_arguments(self, x, kwargs, match):
        with pytest.raises(ValueError, match=match):
            fit_mixture_1d(x, 2, **kwargs)

    def test_kmeans_plusplus_draws_data_points(self):
        x = torch.tensor([[0.0, 0.0, 0.0, 5.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
        centers = kmeans_plusplus_1d(x, 3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(centers[0], torch.tensor([0.0, 5.0, 9.0]))  # distinct points win by D^2 sampling
        assert torch.equal(centers[1], torch.ones(3))  # a constant row repeats its value


class TestGaussianMixture:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    @pytest.mark.parametrize("init", ["kmeans", "kmeans++"])
    def test_log_likelihood_matches_sklearn(self, seed, init):
        x = overlapping(seed)
        ours = GaussianMixture(3, init=init, n_init=3, seed=seed).fit(x)
        sk = SkGaussianMixture(3, covariance_type="diag", tol=1e-4, n_init=3, random_state=seed).fit(to_numpy(x))
        assert ours.converged_
        assert abs(ours.score(x) - sk.score(to_numpy(x))) <= 1e-3 * abs(sk.score(to_numpy(x)))

    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_same_start_never_worse(self, seed):
        x = overlapping(seed)
        start = random_start(x, 3, seed)
        ours = GaussianMixture(3, weights_init=start[0], means_init=start[1], variances_init=start[2]).fit(x)
        sk = sklearn_from(start).fit(to_numpy(x))
        assert ours.score(x) >= sk.score(to_numpy(x)) - 1e-3 * abs(sk.score(to_numpy(x)))
        # the same algorithm: the same iterations and, to rounding, the same parameters
        assert ours.n_iter_ == sk.n_iter_ and ours.converged_ == sk.converged_
        for got, want in zip((ours.weights_, ours.means_, ours.variances_), (sk.weights_, sk.means_, sk.covariances_)):
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(to_numpy(ours.score_samples(x)), sk.score_samples(to_numpy(x)), rtol=1e-9)
        np.testing.assert_allclose(to_numpy(ours.predict_proba(x)), sk.predict_proba(to_numpy(x)), atol=1e-7)

    def test_kmeans_init_is_converged_kmeans(self):
        x = overlapping(0, n=600)
        for init, lloyd in (("kmeans", True), ("kmeans++", False)):
            gmm = GaussianMixture(3, init=init, max_iter=0, seed=4).fit(x)  # the initial mixture
            centers, labels = kmeans(x, 3, seed=4)
            assert gmm.n_iter_ == 0 and torch.allclose(gmm.means_, centers) == lloyd
            counts = torch.bincount(labels, minlength=3).double()
            assert torch.allclose(gmm.weights_, counts / 600, atol=1e-12) == lloyd

    def test_means_init_alone(self):
        x, _ = blobs(600, [0.5, 0.5], [[-3.0, 0.0], [3.0, 1.0]], [[1.0, 1.0], [0.5, 2.0]])
        ours = GaussianMixture(2, means_init=[[-1.0, 0.0], [1.0, 0.0]]).fit(x)
        centres = torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
        torch.testing.assert_close(ours.means_, centres, atol=0.2, rtol=0)

    def test_recovers_known_parameters(self):
        weights = [0.5, 0.3, 0.2]
        means = [[-5.0, 0.0, 1.0], [0.0, 4.0, -2.0], [6.0, -3.0, 0.0]]
        stds = [[1.0, 0.5, 0.8], [0.6, 1.2, 0.4], [0.9, 0.7, 1.5]]
        x, labels = blobs(8000, weights, means, stds)
        gmm = GaussianMixture(3, seed=0).fit(x)
        order = gmm.means_[:, 0].argsort()
        torch.testing.assert_close(gmm.weights_[order], torch.tensor(weights, dtype=torch.float64), atol=0.02, rtol=0)
        torch.testing.assert_close(gmm.means_[order], torch.tensor(means, dtype=torch.float64), atol=0.06, rtol=0)
        expected_stds = torch.tensor(stds, dtype=torch.float64)
        torch.testing.assert_close(gmm.variances_[order].sqrt(), expected_stds, atol=0.05, rtol=0)
        assert (gmm.predict(x) == order[labels]).double().mean() > 0.995

    def test_real_features_match_sklearn(self, data_root):
        with gzip.open(data_root / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        features = cbnorm.image_features(torch.from_numpy(images[:3000].copy()), 10).double()
        ours = GaussianMixture(3, init="kmeans", seed=0).fit(features)
        sk = SkGaussianMixture(3, covariance_type="diag", tol=1e-4, random_state=0).fit(to_numpy(features))
        assert abs(ours.score(features) - sk.score(to_numpy(features))) <= 1e-3 * abs(sk.score(to_numpy(features)))
        start = random_start(features, 5, 0)
        ours = GaussianMixture(5, weights_init=start[0], means_init=start[1], variances_init=start[2]).fit(features)
        sk = sklearn_from(start).fit(to_numpy(features))
        assert ours.score(features) >= sk.score(to_numpy(features)) - 1e-3 * abs(sk.score(to_numpy(features)))

    def test_predictions(self):
        x = overlapping(0, n=300)
        gmm = GaussianMixture(3, seed=0).fit(x)
        proba = gmm.predict_proba(x)
        assert proba.shape == (300, 3) and proba.dtype == torch.float64
        torch.testing.assert_close(proba.sum(1), torch.ones(300, dtype=torch.float64))
        assert torch.equal(gmm.predict(x), proba.argmax(1)) and gmm.predict(x).dtype == torch.int64
        assert gmm.score(x) == pytest.approx(float(gmm.score_samples(x).mean()))
        assert gmm.score(x) >= gmm.lower_bound_  # the last M-step only raises the likelihood

    def test_inputs_numpy_and_float32(self):
        x = overlapping(1, n=400)
        a = GaussianMixture(3, seed=5).fit(x)
        b = GaussianMixture(3, seed=torch.Generator().manual_seed(5)).fit(to_numpy(x).astype(np.float32))
        assert a.means_.dtype == b.means_.dtype == torch.float64
        torch.testing.assert_close(a.means_, b.means_, atol=1e-4, rtol=0)
        c = GaussianMixture(3, seed=5).fit(x)
        assert torch.equal(a.means_, c.means_) and torch.equal(a.predict(x), c.predict(x))

    def test_not_converged_warns(self):
        x = overlapping(0)
        with pytest.warns(RuntimeWarning, match=r"GaussianMixture: EM did not converge in max_iter=2 iterations"):
            gmm = GaussianMixture(3, max_iter=2, seed=0).fit(x)
        assert not gmm.converged_ and gmm.n_iter_ == 2

    @pytest.mark.parametrize(
        "x,match",
        [
            (
                torch.randn(2, 3),
                r"GaussianMixture: expected at least n_components=3 distinct samples, got 2 \(of 2 samples\)",
            ),
            (
                torch.tensor([[0.0, 1.0], [2.0, 3.0]]).repeat(10, 1),
                r"expected at least n_components=3 distinct samples, got 2 \(of 20 samples\)",
            ),
            (torch.zeros(0, 3), r"GaussianMixture: expected a non-empty \(N, D\) input, got shape \(0, 3\)"),
            (torch.randn(10), r"GaussianMixture: expected features of shape \(N, D\), got shape \(10,\)"),
            (
                torch.tensor([[0.0, float("nan")], [1.0, 2.0], [2.0, 0.0], [3.0, 1.0]]),
                r"expected finite features, got NaN or Inf in 1 of 4 rows",
            ),
            (torch.tensor([[float("inf"), 0.0]] * 4), r"expected finite features, got NaN or Inf in 4 of 4 rows"),
        ],
    )
    def test_bad_input(self, x, match):
        with pytest.raises(ValueError, match=match):
            GaussianMixture(3).fit(x)

    def test_bad_use(self):
        with pytest.raises(ValueError, match=r"GaussianMixture: this instance is not fitted yet; call fit\(X\) first"):
            GaussianMixture(2).predict(torch.randn(4, 2))
        gmm = GaussianMixture(2, seed=0).fit(torch.randn(20, 2))
        with pytest.raises(ValueError, match=r"GaussianMixture: expected 2 features per sample \(as in fit\), got 3"):
            gmm.predict(torch.randn(4, 3))
        with pytest.raises(ValueError, match=r"expected finite features"):
            gmm.score(torch.full((4, 2), float("nan")))

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"n_components": 0}, r"GaussianMixture: expected n_components to be a positive int, got 0"),
            ({"init": "random"}, r"expected init to be one of \('kmeans\+\+', 'kmeans'\), got 'random'"),
            ({"max_iter": -1}, r"expected max_iter to be a non-negative int, got -1"),
            ({"tol": -1.0}, r"expected tol >= 0, got -1.0"),
            ({"reg_covar": float("nan")}, r"expected reg_covar >= 0, got nan"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            GaussianMixture(**{"n_components": 2, **kwargs})

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"weights_init": [0.5, 0.6]}, r"expected weights_init to sum to 1, got 1.1"),
            ({"means_init": [[0.0, 0.0]]}, r"expected means_init of shape \(2, 2\), got \(1, 2\)"),
            ({"variances_init": [[1.0, 0.0], [1.0, 1.0]]}, r"expected variances_init to be finite and positive"),
        ],
    )
    def test_bad_initial_values(self, kwargs, match):
        with pytest.raises(ValueError, match=f"GaussianMixture: {match}"):
            GaussianMixture(2, **kwargs).fit(torch.randn(20, 2))


class TestKMeans:
    def test_finds_separated_clusters(self):
        x, labels = blobs(900, [0.2, 0.3, 0.5], [[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]], [[1.0, 1.0]] * 3)
        centers, found = kmeans(x, 3, seed=0)
        assert centers.shape == (3, 2) and found.dtype == torch.int64
        mapping = torch.stack([found[labels == j].mode().values for j in range(3)])
        assert len(mapping.unique()) == 3 and (mapping[labels] == found).all()
        for j in range(3):  # a fixed point of Lloyd's steps: each center is the mean of its cluster
            torch.testing.assert_close(centers[j], x[found == j].mean(0))

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"kmeans: expected at least k=4 distinct samples, got 3"):
            kmeans(torch.eye(3).repeat(5, 1), 4)
