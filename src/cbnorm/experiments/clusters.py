"""SCB-Norm's prior clusters: superclasses, a dataset-level mixture, or a file of ids.

    cbnorm clusters cifar10 --k 3 --out cifar10-k3.npz      # fit the dataset-level mixture, save the ids
    cbnorm train --norm scb --clusters cifar10-k3.npz ...   # the ids reach the layer through cbnorm.cluster_context

An ids file is an ``.npz`` with int64 arrays ``train`` and ``test`` (one id per image of the full
splits, in the dataset's order), the int ``k`` and the strings ``dataset`` and ``source``.

The paper takes SCB-Norm's clusters from the mixture fitted by MN's EM on the data set. Here the
mixture (and the PCA features it is fitted on) is fitted on the training images only, without their
labels; each test image gets the component that the fitted mixture predicts for it, so no test
image shapes the clusters. (Until this change the fit took train and test together.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from cbnorm import _cache, cached_cluster_ids, image_features

from .data import Dataset, atomic_write

__all__ = ["ClusterIds", "data_fingerprint", "load_cluster_ids", "mixture_clusters", "prior_clusters",
           "save_cluster_ids"]


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
        raise FileNotFoundError(
            f"cluster ids file {path} not found; write one with `cbnorm clusters {data.name} --out {path}`"
        )
    with np.load(path) as z:
        missing = {"train", "test", "k"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: expected arrays train, test and k in the ids file, missing {sorted(missing)}")
        ids = ClusterIds(
            torch.from_numpy(z["train"]).long(),
            torch.from_numpy(z["test"]).long(),
            int(z["k"]),
            str(z["source"]) if "source" in z.files else str(path),
        )
    for name, split in (("train", data.train), ("test", data.test)):
        found = getattr(ids, name)
        if tuple(found.shape) != (len(split),):
            raise ValueError(
                f"{path}: expected {len(split)} {name} ids for {data.name}, got shape {tuple(found.shape)}"
            )
        if len(found) and not 0 <= int(found.min()) <= int(found.max()) < ids.k:
            raise ValueError(
                f"{path}: {name} ids must lie in [0, k={ids.k}), got [{int(found.min())}, {int(found.max())}]"
            )
    return ids


def data_fingerprint(data: Dataset) -> str:
    """16 hex digits of a BLAKE2b hash of every training and test image: two data sets that share a
    name and sizes but not their images never share cached cluster ids."""
    digest = hashlib.blake2b(digest_size=8)
    for split in (data.train, data.test):
        digest.update(str((tuple(split.images.shape), str(split.images.dtype))).encode())
        digest.update(split.images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def mixture_clusters(
    data: Dataset, k: int, method: str = "gmm", seed: int = 0, cache_dir: Optional[Path] = None
) -> ClusterIds:
    """The dataset-level mixture: ``k`` clusters of PCA features, both fitted on the training images;
    each test image gets the cluster the fit predicts for it.

    The ids are cached by :func:`cbnorm.cached_cluster_ids` in ``cache_dir`` (default ``clusters/``
    of cbnorm's cache folder, ``$CBNORM_CACHE_DIR``), keyed by the dataset's name and
    :func:`data_fingerprint`, ``k``, method, seed and the number of training images.
    """
    images = torch.cat([data.train.images, data.test.images])
    fit = len(data.train)
    cache = Path(cache_dir) if cache_dir else _cache.cache_dir("clusters")
    ids = cached_cluster_ids(
        cache,
        f"{data.name}-{data_fingerprint(data)}",
        k,
        lambda: image_features(images, seed=seed, fit_samples=fit),
        method=method,
        seed=seed,
        num_samples=len(images),
        fit_samples=fit,
    )
    return ClusterIds(ids[: len(data.train)], ids[len(data.train) :], k, f"{method} k={k} seed={seed}")


def prior_clusters(
    data: Dataset, source: str, k: int = 3, method: str = "gmm", seed: int = 0, cache_dir: Optional[Path] = None
) -> ClusterIds:
    """SCB-Norm's clusters for ``data``: ``source`` is ``"superclass"``, ``"shuffled-superclass"`` (the
    superclass ids permuted across the images of each split with ``seed``: a control), ``"mixture"`` (fitted on the
    training images, cached in ``cache_dir``: :func:`mixture_clusters`) or the path of an ids file."""
    if source in ("superclass", "shuffled-superclass"):
        if data.train.coarse_labels is None:
            raise ValueError(f"{data.name} has no superclasses (cifar100 has); use clusters 'mixture' or an ids file")
        train, test = data.train.coarse_labels, data.test.coarse_labels
        if source == "shuffled-superclass":  # the same cluster sizes, unrelated to the images (a control)
            generator = torch.Generator().manual_seed(seed)
            train = train[torch.randperm(len(train), generator=generator)]
            test = test[torch.randperm(len(test), generator=generator)]
        return ClusterIds(train, test, len(data.coarse_classes), source)
    if source == "mixture":
        return mixture_clusters(data, k, method, seed, cache_dir)
    return load_cluster_ids(source, data)
