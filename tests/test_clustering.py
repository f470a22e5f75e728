import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import cbnorm
from cbnorm import clustering


def images(n=200, seed=0):
    """uint8 "images" (N, 3, 6, 6) from a few latent factors, so their spectrum decays."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [8.0, 4.0, 2.0, 1.0], dtype=torch.float64
    )
    pixels = latent @ torch.randn(4, 108, generator=g, dtype=torch.float64) + torch.randn(
        n, 108, generator=g, dtype=torch.float64
    )
    return (128 + 4 * pixels).clamp(0, 255).round().to(torch.uint8).reshape(n, 3, 6, 6)


def sized_blobs(sizes=(200, 500, 300), dims=5, seed=0):
    """Separated clusters of the given sizes; returns (features, ids ordered by size, 0 the largest)."""
    g = torch.Generator().manual_seed(seed)
    centers = 8 * torch.randn(len(sizes), dims, generator=g)
    labels = torch.cat([torch.full((size,), j) for j, size in enumerate(sizes)])
    x = centers[labels] + torch.randn(len(labels), dims, generator=g)
    rank = torch.tensor(sizes).argsort(descending=True).argsort()
    return x, rank[labels]


class TestImageFeatures:
    def test_principal_components(self):
        x = images().double()
        feats = cbnorm.image_features(x, 3)
        flat = x.reshape(len(x), -1).numpy()
        flat = flat - flat.mean(0)
        flat = flat / np.sqrt((flat**2).mean())
        _, _, vh = np.linalg.svd(flat, full_matrices=False)
        exact = flat @ vh[:3].T
        np.testing.assert_allclose(np.abs(feats.numpy()), np.abs(exact), atol=1e-8)  # up to each axis's sign
        loadings = torch.from_numpy(flat).T @ feats  # column j is proportional to axis j, by a positive factor
        assert (loadings.gather(0, loadings.abs().argmax(0, keepdim=True)) > 0).all()  # the largest loading is positive
        assert feats.dtype == torch.float64 and (feats.var(0)[:-1] >= feats.var(0)[1:]).all()

    def test_layout_scale_and_determinism(self):
        x = images()
        feats = cbnorm.image_features(x, 4)
        assert feats.shape == (200, 4) and feats.dtype == torch.float32
        assert torch.equal(feats, cbnorm.image_features(x.reshape(200, -1).numpy(), 4))
        scaled = 10 * x.reshape(200, -1).float() + 3  # the data's offset and overall scale do not matter
        torch.testing.assert_close(cbnorm.image_features(scaled, 4), feats, atol=1e-3, rtol=1e-4)
        constant = x.clone()
        constant[:, 0] = 17  # a constant colour channel is only centred
        assert torch.isfinite(cbnorm.image_features(constant, 4)).all()

    def test_rare_pixels_do_not_make_outlier_clusters(self):
        # digits' border pixels are almost always 0; scaling each pixel by its own deviation made
        # their rare non-zero values outliers, and a 3-cluster mixture put 2 of 1797 images alone
        digits = torch.from_numpy(load_digits().images)
        ids = cbnorm.cluster_dataset(cbnorm.image_features(digits), 3)
        assert torch.bincount(ids, minlength=3).min() > 0.1 * len(ids)

    @pytest.mark.parametrize(
        "x,dim,match",
        [
            (torch.zeros(5), 2, r"image_features: expected images of shape \(N, \*\) with N >= 2, got shape \(5,\)"),
            (torch.zeros(6, 3), 4, r"image_features: expected 1 <= dim <= min\(N, features\)=3, got dim=4"),
            (
                torch.tensor([[0.0, float("nan")], [1.0, 2.0]]),
                1,
                r"image_features: expected finite images, got NaN or Inf",
            ),
        ],
    )
    def test_bad_input(self, x, dim, match):
        with pytest.raises(ValueError, match=match):
            cbnorm.image_features(x, dim)


class TestClusterDataset:
    @pytest.mark.parametrize("method", ["gmm", "kmeans"])
    def test_finds_clusters_ordered_by_size(self, method):
        x, expected = sized_blobs()
        ids = cbnorm.cluster_dataset(x, 3, method=method, seed=1)
        assert ids.dtype == torch.int64 and torch.equal(ids, expected)
        assert torch.equal(torch.bincount(ids), torch.tensor([500, 300, 200]))
        assert torch.equal(ids, cbnorm.cluster_dataset(x.numpy(), 3, method=method, seed=1))

    def test_images_end_to_end(self):
        x, _ = sized_blobs(dims=40)
        pictures = (x.reshape(-1, 1, 5, 8) * 10 + 128).clamp(0, 255).to(torch.uint8)
        ids = cbnorm.cluster_dataset(cbnorm.image_features(pictures, 4), 3)
        assert torch.equal(torch.bincount(ids), torch.tensor([500, 300, 200]))

    def test_bad_input(self):
        with pytest.raises(
            ValueError, match=r"cluster_dataset: expected method to be one of \('gmm', 'kmeans'\), got 'em'"
        ):
            cbnorm.cluster_dataset(torch.randn(10, 2), 2, method="em")
        with pytest.raises(ValueError, match=r"GaussianMixture: expected finite features"):
            cbnorm.cluster_dataset(torch.full((10, 2), float("inf")), 2)
        with pytest.raises(ValueError, match=r"kmeans: expected at least k=3 distinct samples, got 1"):
            cbnorm.cluster_dataset(torch.ones(10, 2), 3, method="kmeans")


class TestClusterCache:
    def test_computes_once_then_loads(self, tmp_path):
        x, expected = sized_blobs()
        calls = []
        features = lambda: calls.append(1) or x  # noqa: E731
        ids = cbnorm.cached_cluster_ids(tmp_path / "cache", "blobs", 3, features, seed=2)
        path = cbnorm.cluster_cache_path(tmp_path / "cache", "blobs", 3, seed=2)
        assert path == tmp_path / "cache" / "blobs-k3-gmm-seed2.pt" and path.is_file()
        assert torch.equal(ids, expected) and len(calls) == 1
        again = cbnorm.cached_cluster_ids(tmp_path / "cache", "blobs", 3, features, seed=2, num_samples=1000)
        assert torch.equal(again, ids) and len(calls) == 1
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary file left
        cbnorm.cached_cluster_ids(tmp_path / "cache", "blobs", 3, features, method="kmeans", seed=2)
        cbnorm.cached_cluster_ids(tmp_path / "cache", "blobs", 2, features, seed=2)
        assert len(calls) == 3 and len(list((tmp_path / "cache").iterdir())) == 3

    @pytest.mark.parametrize(
        "spoil",
        [
            lambda path: path.write_bytes(b"not a torch file"),
            lambda path: path.write_bytes(path.read_bytes()[:40]),  # truncated
            lambda path: torch.save({**torch.load(path), "k": 4}, path),  # written for another key
            lambda path: torch.save({**torch.load(path), "ids": torch.full((1000,), 3)}, path),  # ids out of range
            lambda path: torch.save(
                {**torch.load(path), "ids": torch.zeros(999, dtype=torch.long)}, path
            ),  # wrong length
        ],
    )
    def test_invalid_file_is_recomputed(self, tmp_path, spoil):
        x, expected = sized_blobs()
        cbnorm.cached_cluster_ids(tmp_path, "blobs", 3, x)
        spoil(cbnorm.cluster_cache_path(tmp_path, "blobs", 3))
        assert torch.equal(cbnorm.cached_cluster_ids(tmp_path, "blobs", 3, x), expected)
        assert torch.equal(torch.load(cbnorm.cluster_cache_path(tmp_path, "blobs", 3))["ids"], expected)

    def test_failed_write_leaves_nothing(self, tmp_path, monkeypatch):
        def broken_save(obj, file):
            file.write(b"half a file")
            raise OSError("disk full")

        monkeypatch.setattr(clustering.torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            cbnorm.cached_cluster_ids(tmp_path, "blobs", 3, sized_blobs()[0])
        assert list(tmp_path.iterdir()) == []

    def test_bad_arguments(self, tmp_path):
        with pytest.raises(
            ValueError,
            match=r"cluster_cache_path: expected a dataset name of letters, digits, '_', '.', '-', got '../x'",
        ):
            cbnorm.cached_cluster_ids(tmp_path, "../x", 3, torch.randn(10, 2))
        with pytest.raises(ValueError, match=r"cached_cluster_ids: expected features of 12 samples, got 10"):
            cbnorm.cached_cluster_ids(tmp_path, "x", 2, lambda: sized_blobs((5, 5))[0], num_samples=12)


class TestTrainOnlyFit:
    """With ``fit_samples`` the rows after the first ``fit_samples`` (the test images) shape nothing."""

    def test_features_of_the_fitted_rows_ignore_the_others(self):
        train, test_a, test_b = images(150, seed=0), images(50, seed=1), 255 - images(50, seed=2)
        a = cbnorm.image_features(torch.cat([train, test_a]), 4, fit_samples=150)
        b = cbnorm.image_features(torch.cat([train, test_b]), 4, fit_samples=150)
        torch.testing.assert_close(a[:150], b[:150])
        assert torch.equal(a[:150], cbnorm.image_features(train, 4))

    def test_other_rows_get_the_fitted_mixtures_prediction(self):
        x, _ = sized_blobs()
        train, test = x[::2], x[1::2]
        ids = cbnorm.cluster_dataset(torch.cat([train, test]), 3, seed=0, fit_samples=len(train))
        assert torch.equal(ids[: len(train)], cbnorm.cluster_dataset(train, 3, seed=0))
        mixture = cbnorm.mixture.GaussianMixture(3, init="kmeans", max_iter=200, seed=0).fit(train)
        fitted, predicted = mixture.predict(train), mixture.predict(test)
        relabel = {int(f): int(i) for f, i in zip(fitted, ids[: len(train)])}
        assert ids[len(train) :].tolist() == [relabel[int(p)] for p in predicted]

    @pytest.mark.parametrize("method", ["gmm", "kmeans"])
    def test_far_test_rows_do_not_move_the_clusters(self, method):
        x, _ = sized_blobs()
        outliers = 1000 + torch.randn(300, x.shape[1], generator=torch.Generator().manual_seed(3))
        ids = cbnorm.cluster_dataset(torch.cat([x, outliers]), 3, method=method, seed=0, fit_samples=len(x))
        assert torch.equal(ids[: len(x)], cbnorm.cluster_dataset(x, 3, method=method, seed=0))

    def test_bad_fit_samples(self):
        with pytest.raises(ValueError, match=r"image_features: expected 2 <= fit_samples <= N=10, got fit_samples=11"):
            cbnorm.image_features(torch.zeros(10, 4), 2, fit_samples=11)
        with pytest.raises(ValueError, match=r"cluster_dataset: expected 1 <= fit_samples <= N=10, got 0"):
            cbnorm.cluster_dataset(torch.randn(10, 2), 2, fit_samples=0)


class TestMixtureClusters:
    """SCB-Norm's dataset clusters in the harness: fitted on the training images, cached per data set."""

    @staticmethod
    def dataset(test_images):
        from cbnorm.experiments.data import Dataset, Split

        train = images(120, seed=0)
        labels = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
        return Dataset("toy", Split(train, labels(120)), Split(test_images, labels(len(test_images))), ["a"])

    def test_test_images_do_not_shape_the_clusters(self, tmp_path):
        from cbnorm.experiments.clusters import mixture_clusters

        a = mixture_clusters(self.dataset(images(40, seed=1)), 3, cache_dir=tmp_path)
        b = mixture_clusters(self.dataset(255 - images(40, seed=2)), 3, cache_dir=tmp_path)
        assert torch.equal(a.train, b.train)
        features = cbnorm.image_features(torch.cat([images(120, seed=0), images(40, seed=1)]), fit_samples=120)
        expected = cbnorm.cluster_dataset(features, 3, fit_samples=120)
        assert torch.equal(torch.cat([a.train, a.test]), expected)

    def test_same_name_and_size_different_images_share_no_cache(self, tmp_path):
        from cbnorm.experiments.clusters import data_fingerprint, mixture_clusters

        first, second = self.dataset(images(40, seed=1)), self.dataset(images(40, seed=5))
        assert data_fingerprint(first) != data_fingerprint(second)
        mixture_clusters(first, 3, cache_dir=tmp_path)
        fresh = mixture_clusters(second, 3, cache_dir=tmp_path / "fresh")
        assert torch.equal(mixture_clusters(second, 3, cache_dir=tmp_path).test, fresh.test)
        assert len(list(tmp_path.glob("toy-*.pt"))) == 2


def test_cached_ids_get_a_new_files_mode(tmp_path):
    """Like any tool's output, the cache file's mode is 0o666 less the umask, not mkstemp's 0o600."""
    old = os.umask(0o022)
    try:
        cbnorm.cached_cluster_ids(tmp_path, "blobs", 2, lambda: torch.randn(40, 3))
    finally:
        os.umask(old)
    (path,) = tmp_path.glob("*.pt")
    assert path.stat().st_mode & 0o777 == 0o644
