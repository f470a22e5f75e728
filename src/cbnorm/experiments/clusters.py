"""SCB-Norm's prior clusters: superclasses, a dataset-level mixture, or a file of ids.

    cbnorm clusters cifar10 --k 3 --out cifar10-k3.npz      # fit the dataset-level mixture, save the ids
    cbnorm train --norm scb --clusters cifar10-k3.npz ...   # the ids reach the layer through cbnorm.cluster_context

An ids file is an ``.npz`` with int64 arrays ``train`` and ``test`` (one id per image of the full
splits, in the dataset's order), the int ``k`` and the strings ``dataset`` and ``source``.

The paper takes SCB-Norm's clusters from the mixture fitted by MN's EM on the data set. Here the
mixture is fitted on PCA features of all images, train and test together (no labels are used), so
every test image has the id of the component it belongs to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from .data import Dataset, atomic_write

__all__ = ["ClusterIds", "cluster_dataset", "image_features", "load_cluster_ids", "prior_clusters", "save_cluster_ids"]

# -- INTERIM: the mixture issue (issue 3) brings cbnorm.cluster_dataset and an image-features helper.
# -- When it lands, replace this block (down to END INTERIM) with:
# --     from cbnorm import cluster_dataset, image_features


def image_features(images: Tensor, dim: int = 50, seed: int = 0, fit_size: int = 5000) -> Tensor:
    """Images ``(N, C, H, W)`` -> ``(N, dim)`` float32: flattened, centred per pixel and scaled by
    one global std, projected by a PCA fitted on at most ``fit_size`` of them. (A per-pixel std
    would blow up the near-constant border pixels of digit images.)"""
    from sklearn.decomposition import PCA

    flat = images.reshape(len(images), -1)
    fit = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:fit_size]].float()
    mean, scale = fit.mean(0), fit.std().clamp_min(1e-6)
    dim = min(dim, *fit.shape)
    pca = PCA(dim, svd_solver="randomized", random_state=seed).fit(((fit - mean) / scale).numpy())
    chunks = [pca.transform(((chunk.float() - mean) / scale).numpy()) for chunk in flat.split(8192)]
    return torch.from_numpy(np.concatenate(chunks)).float()


def cluster_dataset(features: Tensor, k: int, *, method: str = "gmm", seed: int = 0, fit_size: int = 20_000) -> Tensor:
    """One cluster id in ``[0, k)`` per row of ``features`` ``(N, D)``: a diagonal Gaussian mixture
    fitted by EM (``"gmm"``) or k-means (``"kmeans"``) on at most ``fit_size`` rows, seeded by ``seed``."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    if features.dim() != 2 or len(features) < k:
        raise ValueError(f"expected features (N, D) with N >= k={k}, got shape {tuple(features.shape)}")
    x = features.double().numpy()
    fit = x[np.random.default_rng(seed).permutation(len(x))[:fit_size]]
    if method == "gmm":
        model = GaussianMixture(k, covariance_type="diag", random_state=seed, reg_covar=1e-4)
    elif method == "kmeans":
        model = KMeans(k, n_init=4, random_state=seed)
    else:
        raise ValueError(f"unknown clustering method {method!r}; expected 'gmm' or 'kmeans'")
    return torch.from_numpy(model.fit(fit).predict(x)).long()


# -- END INTERIM


@dataclass
class ClusterIds:
    """Cluster ids of every training and test image (full splits), and their number ``k``."""

    train: Tensor
    test: Tensor
    k: int
    source: str


def save_cluster_ids(path: Union[str, os.PathLike], ids: ClusterIds, dataset: str) -> None:
    def write(f) -> None:
        np.savez(f, train=ids.train.numpy(), test=ids.test.numpy(), k=ids.k, dataset=dataset, source=ids.source)

    atomic_write(Path(path), write)


def load_cluster_ids(path: Union[str, os.PathLike], data: Dataset) -> ClusterIds:
    """Read an ids file and check it against ``data``: one id per image, each in ``[0, k)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster ids file {path} not found; write one with `cbnorm clusters {data.name} --out {path}`")
    with np.load(path) as z:
        missing = {"train", "test", "k"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: expected arrays train, test and k in the ids file, missing {sorted(missing)}")
        ids = ClusterIds(torch.from_numpy(z["train"]).long(), torch.from_numpy(z["test"]).long(), int(z["k"]),
                         str(z["source"]) if "source" in z.files else str(path))
    for name, split in (("train", data.train), ("test", data.test)):
        found = getattr(ids, name)
        if tuple(found.shape) != (len(split),):
            raise ValueError(f"{path}: expected {len(split)} {name} ids for {data.name}, got shape {tuple(found.shape)}")
        if len(found) and not 0 <= int(found.min()) <= int(found.max()) < ids.k:
            raise ValueError(f"{path}: {name} ids must lie in [0, k={ids.k}), got [{int(found.min())}, {int(found.max())}]")
    return ids


def mixture_clusters(data: Dataset, k: int, method: str = "gmm", seed: int = 0) -> ClusterIds:
    """The dataset-level mixture: ``k`` clusters of the PCA features of all images, train then test."""
    features = image_features(torch.cat([data.train.images, data.test.images]), seed=seed)
    ids = cluster_dataset(features, k, method=method, seed=seed)
    return ClusterIds(ids[: len(data.train)], ids[len(data.train) :], k, f"{method} k={k} seed={seed}")


def prior_clusters(
    data: Dataset, source: str, k: int = 3, method: str = "gmm", seed: int = 0, cache_dir: Optional[Path] = None
) -> ClusterIds:
    """SCB-Norm's clusters for ``data``: ``source`` is ``"superclass"``, ``"mixture"`` (cached in
    ``cache_dir`` under the dataset, method, ``k`` and seed) or the path of an ids file."""
    if source == "superclass":
        if data.train.coarse_labels is None:
            raise ValueError(f"{data.name} has no superclasses (cifar100 has); use clusters 'mixture' or an ids file")
        return ClusterIds(data.train.coarse_labels, data.test.coarse_labels, len(data.coarse_classes), "superclass")
    if source == "mixture":
        cache = Path(cache_dir or os.environ.get("CBNORM_CACHE") or Path.home() / ".cache" / "cbnorm")
        path = cache / f"clusters-{data.name}-{method}-k{k}-seed{seed}.npz"
        if path.exists():
            return load_cluster_ids(path, data)
        ids = mixture_clusters(data, k, method, seed)
        save_cluster_ids(path, ids, data.name)
        return ids
    return load_cluster_ids(source, data)
