r"""Dataset-level clusters, the "prior knowledge" SCB-Norm is trained with.

The paper gives SCB-Norm and SCB-Norm-base clusters found by EM on the data (:math:`K = 3` for the
shallow CNN, :math:`K = 5` for DenseNet). Here that is three steps, each a function:

1. :func:`image_features`: images ``(N, C, H, W)`` (or any ``(N, *)``) flattened, standardised
   per input feature, and projected on their first ``dim`` principal components (default 32).
2. :func:`cluster_dataset`: one cluster id per sample, by a diagonal Gaussian mixture fitted with
   EM (:class:`cbnorm.mixture.GaussianMixture`) or by k-means.
3. :func:`cached_cluster_ids`: the ids of step 2 kept in a file keyed by dataset, ``k``, method,
   seed and fitted rows, computed (and written atomically) only when no valid file exists.

Steps 1 and 2 take ``fit_samples``: everything is fitted on the first rows (the training images)
and the other rows (the test images) only get the cluster the fit predicts for them.

Everything is torch and deterministic given the seed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Union

import torch
from torch import Tensor

from ._checks import check_choice
from ._files import atomic_write
from .mixture import GaussianMixture, kmeans

__all__ = ["FEATURE_DIM", "METHODS", "cached_cluster_ids", "cluster_cache_path", "cluster_dataset", "image_features"]

FEATURE_DIM = 32
METHODS = ("gmm", "kmeans")
# Bump when the ids a given (dataset, k, method, seed) produces change, so old cache files are recomputed.
_CACHE_FORMAT = 2
_OVERSAMPLE, _POWER_ITERS = 10, 7


def _principal_axes(x: Tensor, dim: int, seed: int) -> Tensor:
    """The top ``dim`` principal axes ``(dim, D)`` of centred ``x`` ``(N, D)``, by randomized SVD.

    Halko, Martinsson & Tropp (2011): a Gaussian sketch with ``dim + 10`` columns, seven power
    iterations re-orthonormalised by QR, then an exact SVD in the sketch's span. Each axis's sign
    makes its largest loading positive, so the result does not depend on the SVD's sign choices.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)
    width = min(dim + _OVERSAMPLE, *x.shape)
    basis = x @ torch.randn(x.shape[1], width, generator=generator, dtype=x.dtype, device=x.device)
    for _ in range(_POWER_ITERS):
        basis = x @ torch.linalg.qr(x.T @ torch.linalg.qr(basis).Q).Q
    basis = torch.linalg.qr(basis).Q
    axes = torch.linalg.svd(basis.T @ x, full_matrices=False).Vh[:dim]
    signs = axes.gather(1, axes.abs().argmax(1, keepdim=True)).sign()
    return axes * signs


def image_features(images, dim: int = FEATURE_DIM, *, seed: int = 0, fit_samples: Union[int, None] = None) -> Tensor:
    """Features for dataset-level clustering: flatten, standardise, PCA to ``dim`` dims.

    Every input feature (pixel and colour channel) is centred over the data set, and all are
    divided by one scale, the root mean square of their standard deviations (so the features have
    unit variance on average); the result is projected on its first ``dim`` principal axes
    (randomized SVD, deterministic given ``seed``). One scale for all features, not one each:
    dividing a nearly constant pixel (a digit's border) by its tiny deviation would turn its rare
    non-zero values into outliers that dominate the principal axes and the clusters.

    Args:
        images: ``(N, C, H, W)``, ``(N, D)`` or any ``(N, *)`` tensor or array; integer (e.g.
            uint8) or floating point. The layout does not matter, only that it is the same for every sample.
        dim: number of principal components kept. Default: ``32``
        seed: seed of the randomized SVD's sketch. Default: ``0``
        fit_samples: take the centring, the scale and the principal axes from the first
            ``fit_samples`` images only (the training images), and project every image on them, so
            that the other images (the test images) shape nothing. Default: ``None`` (all images)

    Returns:
        ``(N, dim)`` features, float32 (float64 for float64 input), with decreasing variance per column.

    Example::

        >>> feats = cbnorm.image_features(torch.from_numpy(x_train).permute(0, 3, 1, 2))  # (50000, 32)
    """
    x = torch.as_tensor(images)
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"image_features: expected images of shape (N, *) with N >= 2, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    fit = len(x) if fit_samples is None else fit_samples
    if not 2 <= fit <= len(x):
        raise ValueError(f"image_features: expected 2 <= fit_samples <= N={len(x)}, got fit_samples={fit_samples}")
    if not 1 <= dim <= min(fit, x.shape[1]):
        raise ValueError(f"image_features: expected 1 <= dim <= min(N, features)={min(fit, x.shape[1])}, got dim={dim}")
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image_features: expected finite images, got NaN or Inf")
    x = x - x[:fit].mean(0)
    scale = x[:fit].square().mean().sqrt()
    x = x / scale if scale > 0 else x
    return x @ _principal_axes(x[:fit], dim, seed).T


def cluster_dataset(features, k: int, *, method: str = "gmm", seed: int = 0,
                    fit_samples: Union[int, None] = None) -> Tensor:
    """One cluster id per sample of ``features`` ``(N, D)``.

    ``method="gmm"``: the most probable component of a diagonal Gaussian mixture fitted by EM
    (:class:`~cbnorm.mixture.GaussianMixture` with ``init="kmeans"``, ``max_iter=200``). ``"kmeans"``:
    the nearest center of a k-means (k-means++ seeds, Lloyd steps to convergence). Ids are ordered
    by cluster size, 0 the largest, so they do not depend on the order the algorithm found the
    clusters in.

    Args:
        features: ``(N, D)`` tensor or array, e.g. from :func:`image_features`; finite, at least ``k`` distinct rows.
        k: number of clusters.
        method: ``"gmm"`` or ``"kmeans"``. Default: ``"gmm"``
        seed: seed of the k-means++ draws. Default: ``0``
        fit_samples: fit the mixture (or the centers) on the first ``fit_samples`` rows only (the
            training images); every row gets the component the fit predicts for it (the nearest
            center), and the ids are ordered by the fitted rows' cluster sizes. Default: ``None`` (all rows)

    Returns:
        ``(N,)`` int64 ids in ``[0, k)``.

    Example::

        >>> ids = cbnorm.cluster_dataset(cbnorm.image_features(images), 3)
    """
    check_choice("cluster_dataset", "method", method, METHODS)
    features = torch.as_tensor(features)
    fit = len(features) if fit_samples is None else fit_samples
    if not 1 <= fit <= len(features):
        raise ValueError(f"cluster_dataset: expected 1 <= fit_samples <= N={len(features)}, got {fit_samples}")
    if method == "gmm":
        mixture = GaussianMixture(k, init="kmeans", max_iter=200, seed=seed)
        labels = mixture.fit(features[:fit]).predict(features)
    else:
        centers = kmeans(features[:fit], k, seed=seed)[0]
        labels = torch.cdist(features.to(centers), centers).argmin(1)
    order = torch.bincount(labels[:fit], minlength=k).argsort(descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(k, device=order.device))[labels]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def cluster_cache_path(
    cache_dir: Union[str, os.PathLike], dataset: str, k: int, *, method: str = "gmm", seed: int = 0
) -> Path:
    """The file :func:`cached_cluster_ids` uses: ``cache_dir/{dataset}-k{k}-{method}-seed{seed}.pt``."""
    if not isinstance(dataset, str) or not _NAME.fullmatch(dataset):
        raise ValueError(
            f"cluster_cache_path: expected a dataset name of letters, digits, '_', '.', '-', got {dataset!r}"
        )
    check_choice("cluster_cache_path", "method", method, METHODS)
    return Path(cache_dir) / f"{dataset}-k{k}-{method}-seed{seed}.pt"


def _load_valid(path: Path, key: dict, num_samples) -> Union[Tensor, None]:
    """The ids stored at ``path`` if the file is readable, was written for ``key`` and holds sane ids."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or not a torch file: all mean "compute again"
        return None
    ids = stored.get("ids") if isinstance(stored, dict) else None
    if not isinstance(ids, Tensor) or any(stored.get(name) != value for name, value in key.items()):
        return None
    if ids.dtype != torch.int64 or ids.dim() != 1 or (num_samples is not None and len(ids) != num_samples):
        return None
    if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < key["k"]):
        return None
    return ids


def cached_cluster_ids(
    cache_dir: Union[str, os.PathLike],
    dataset: str,
    k: int,
    features: Union[Tensor, Callable[[], Tensor]],
    *,
    method: str = "gmm",
    seed: int = 0,
    num_samples: Union[int, None] = None,
    fit_samples: Union[int, None] = None,
) -> Tensor:
    """Cluster ids of a data set, read from a cache file or computed by :func:`cluster_dataset` and cached.

    The file (:func:`cluster_cache_path`) is used when it loads and records the same ``dataset``,
    ``k``, ``method``, ``seed`` and cache format, and its ids are int64 in ``[0, k)`` (and
    ``num_samples`` of them, when given; a tensor ``features`` gives its own length). Otherwise
    the ids are computed and the file is written atomically (a temporary file in ``cache_dir``,
    then a rename), so a crash or a concurrent reader never sees half a file.

    Args:
        cache_dir: folder of the cache files; created if missing.
        dataset: the data set's name, part of the file name (e.g. ``"cifar10-train"``).
        k: number of clusters.
        features: ``(N, D)`` features, or a function returning them, called only when the ids
            must be computed (features are the slow part).
        method: ``"gmm"`` or ``"kmeans"``. Default: ``"gmm"``
        seed: the clustering's seed. Default: ``0``
        num_samples: the expected number of ids. Default: ``None`` (the length of a tensor ``features``)
        fit_samples: passed to :func:`cluster_dataset` (fit on the first rows only); part of the key.
            Default: ``None``

    Returns:
        ``(N,)`` int64 cluster ids, on the CPU.

    Example::

        >>> ids = cbnorm.cached_cluster_ids("runs/clusters", "cifar10-train", 3, lambda: cbnorm.image_features(x))
    """
    path = cluster_cache_path(cache_dir, dataset, k, method=method, seed=seed)
    key = {
        "format": _CACHE_FORMAT,
        "dataset": dataset,
        "k": k,
        "method": method,
        "seed": seed,
        "fit_samples": fit_samples,
    }
    if num_samples is None and isinstance(features, Tensor):
        num_samples = len(features)
    ids = _load_valid(path, key, num_samples)
    if ids is not None:
        return ids
    ids = cluster_dataset(
        features() if callable(features) else features, k, method=method, seed=seed, fit_samples=fit_samples
    ).cpu()
    if num_samples is not None and len(ids) != num_samples:
        raise ValueError(f"cached_cluster_ids: expected features of {num_samples} samples, got {len(ids)}")
    atomic_write(path, lambda file: torch.save({**key, "ids": ids}, file))
    return ids
