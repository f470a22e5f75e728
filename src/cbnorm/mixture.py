"""Gaussian-mixture fitting on tensors: batched per-channel 1-D k-means++ seeding.

Every function here treats each row of a ``(C, M)`` tensor as an independent scalar data set (one
per channel of a layer), vectorised across rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["channel_samples", "kmeans_plusplus_1d", "kmeans_1d", "init_mixture_1d"]


def channel_samples(x: Tensor, max_per_channel: Optional[int] = None, generator=None) -> Tensor:
    """The entries of each channel of ``x`` ``(N, C, *)`` as rows ``(C, M)``, optionally subsampled.

    A subsample keeps the same random positions in every channel, drawn without replacement.
    """
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    if max_per_channel is not None and rows.shape[1] > max_per_channel:
        keep = torch.randperm(rows.shape[1], generator=generator, device=rows.device)[:max_per_channel]
        rows = rows[:, keep]
    return rows


def kmeans_plusplus_1d(x: Tensor, k: int, generator=None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) of every row of ``x`` ``(C, M)``.

    The first center is a uniformly drawn point; each next one is drawn with probability
    proportional to its squared distance to the nearest center chosen so far. A row whose points
    all coincide with its centers draws uniformly.

    Returns:
        ``(C, k)`` centers, sorted ascending in each row.
    """
    num_rows, num_points = x.shape
    rows = torch.arange(num_rows, device=x.device)
    centers = x.new_empty(num_rows, k)
    first = torch.randint(num_points, (num_rows,), generator=generator, device=x.device)
    centers[:, 0] = x[rows, first]
    dist2 = (x - centers[:, :1]).square()
    for j in range(1, k):  # sequential by definition; k is small
        weights = torch.where(dist2.sum(1, keepdim=True) > 0, dist2, torch.ones_like(dist2))
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        centers[:, j] = x[rows, pick]
        dist2 = torch.minimum(dist2, (x - centers[:, j : j + 1]).square())
    return centers.sort(dim=1).values


def _assign(x: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances ``(C, M, k)`` and the one-hot nearest-center assignment of each point."""
    dist2 = (x.unsqueeze(-1) - centers.unsqueeze(1)).square()
    return dist2, torch.nn.functional.one_hot(dist2.argmin(-1), centers.shape[1]).to(x.dtype)


def kmeans_1d(x: Tensor, k: int, iters: int = 10, generator=None) -> Tensor:
    """k-means of every row of ``x`` ``(C, M)``: k-means++ seeds, then ``iters`` Lloyd steps.

    A center that loses all its points stays where it is. Returns ``(C, k)`` sorted centers.
    """
    centers = kmeans_plusplus_1d(x, k, generator)
    for _ in range(iters):
        _, assigned = _assign(x, centers)
        counts = assigned.sum(1)
        sums = (assigned * x.unsqueeze(-1)).sum(1)
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers.sort(dim=1).values


def init_mixture_1d(x: Tensor, k: int, eps: float = 1e-5, generator=None) -> tuple[Tensor, Tensor, Tensor]:
    """Initial mixture of every row of ``x`` ``(C, M)`` from its k-means (:func:`kmeans_1d`).

    Means are the centers. Each point goes to its nearest center; a component's variance is the
    mean squared distance of its points to the center (the row's variance when it has fewer than
    two points), floored at ``eps``. Priors are shared by all rows: the fraction of points
    assigned to each component, Laplace-smoothed so that none is zero.

    Returns:
        ``(prior (k,), mean (k, C), var (k, C))``.
    """
    centers = kmeans_1d(x, k, generator=generator)
    dist2, assigned = _assign(x, centers)
    counts = assigned.sum(1)  # (C, k)
    var = (dist2 * assigned).sum(1) / counts.clamp_min(1)
    var = torch.where(counts >= 2, var, x.var(1, correction=0).unsqueeze(1)).clamp_min(eps)
    prior = (counts.sum(0) + 1) / (counts.sum() + k)
    return prior, centers.T.contiguous(), var.T.contiguous()
