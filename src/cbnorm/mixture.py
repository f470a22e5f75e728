r"""Gaussian mixtures on tensors: k-means++ seeding, k-means, and EM with diagonal covariances.

One vectorised core fits ``B`` independent mixtures at once, each to its own ``M`` points in ``D``
dims (``x`` of shape ``(B, M, D)``). It has two front ends:

* Per-channel scalar mixtures of a layer's activations, one per row of a ``(C, M)`` tensor
  (``B = C``, ``D = 1``): :func:`fit_mixture_1d` (Mixture Normalization refits these on every
  batch), :func:`init_mixture_1d` (UCB-Norm's first-batch state), :func:`kmeans_1d`,
  :func:`kmeans_plusplus_1d`.
* One mixture of ``(N, D)`` features (``B = 1``) for dataset-level clustering:
  :class:`GaussianMixture`, with scikit-learn's names, and :func:`kmeans`.

EM is scikit-learn's ``GaussianMixture(covariance_type="diag")``. The E-step normalises the
log-joint densities over the components with a max-shifted softmax (log-sum-exp, never raw
exponentials); with responsibilities :math:`\tau_{ik}` the M-step is

.. math::
    n_k = \sum_i \tau_{ik},\quad \lambda_k = \frac{n_k + 10\epsilon}{\sum_j (n_j + 10\epsilon)},\quad
    \mu_k = \frac{1}{n_k}\sum_i \tau_{ik} x_i,\quad
    \sigma^2_k = \max\Big(\frac{1}{n_k}\sum_i \tau_{ik} (x_i - \mu_k)^2 + r,\ f\Big)

with :math:`\epsilon` the machine epsilon (no weight is exactly zero), ``r`` an added regulariser
(``reg_covar``) and ``f`` a variance floor. One departure: a component with :math:`n_k \le
\epsilon` keeps its mean and variance (scikit-learn adds :math:`10\epsilon` to :math:`n_k` in the
divisions too, which drags a nearly empty component's mean toward zero); its weight goes to about zero.

Randomness (k-means++ only) comes from a ``torch.Generator``, an int seed, or, when neither is
given, torch's global generator; results are deterministic given any of them.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._checks import check_choice, check_non_negative_int, check_positive_int

__all__ = [
    "GaussianMixture",
    "Mixture1d",
    "channel_samples",
    "fit_mixture_1d",
    "init_mixture_1d",
    "kmeans",
    "kmeans_1d",
    "kmeans_plusplus_1d",
]

_LOG_2PI = math.log(2 * math.pi)
# Lloyd steps of the k-means that seeds per-channel mixtures (1-D, so they converge fast).
_SEED_LLOYD_STEPS = 10

Seed = Union[int, torch.Generator, None]


# -- the batched core: x (B, M, D); components (K, B, D); responsibilities (K, B, M) ---------------
# Components come first, as in cbnorm.functional: sums over K are then elementwise over (B, M).
class _Mixture(NamedTuple):
    weight: Tensor  # (K, B)
    mean: Tensor  # (K, B, D)
    var: Tensor  # (K, B, D)


def _generator(seed: Seed, device) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(seed)


def _sq_dist(x: Tensor, mean: Tensor, var: Optional[Tensor] = None) -> Tensor:
    r""":math:`\sum_d (x_{bmd} - \mu_{kbd})^2 / \sigma^2_{kbd}` (``var=None``: Euclidean), ``(K, B, M)``."""
    if x.shape[-1] == 1:  # exact, and in 1-D no larger than the result
        dist = (x[..., 0] - mean).square_()
        return dist if var is None else dist.div_(var)
    precision = torch.ones_like(mean) if var is None else var.reciprocal()
    dist = torch.einsum("kbd,bmd->kbm", precision, x.square()) - 2 * torch.einsum("kbd,bmd->kbm", mean * precision, x)
    return dist.add_((mean.square() * precision).sum(-1, keepdim=True)).clamp_min_(0)


def _log_joint(x: Tensor, mix: _Mixture) -> Tensor:
    r""":math:`\log\lambda_k + \log\mathcal{N}(x_{bm};\mu_{kb},\sigma^2_{kb})` of every point and component, ``(K, B, M)``."""
    log_weight = mix.weight.clamp_min(torch.finfo(mix.weight.dtype).tiny).log()
    log_norm = log_weight - 0.5 * (x.shape[-1] * _LOG_2PI + mix.var.log().sum(-1))
    return _sq_dist(x, mix.mean, mix.var).mul_(-0.5).add_(log_norm.unsqueeze(-1))


def _e_step(x: Tensor, mix: _Mixture) -> Tensor:
    """Responsibilities ``(K, B, M)``: a softmax over components (one fused kernel, no log-sum-exp pass)."""
    return _log_joint(x, mix).softmax(0)


def _m_step(x: Tensor, resp: Tensor, previous: _Mixture, reg: float, floor: float, reduce_sums=None) -> _Mixture:
    """Weights, means and variances from responsibilities ``(K, B, M)``; empty components keep ``previous``.

    ``reduce_sums`` (1-D only) is applied to the sums over the points before they are used: the
    mass with the first moment, then the second moment about the mean (two passes, as without it).
    """
    eps = torch.finfo(x.dtype).eps
    mass = resp.sum(-1, keepdim=True)
    if x.shape[-1] == 1:  # exact two-pass variance, as cheap as the moments in 1-D
        points = x[..., 0]
        first = (resp * points).sum(-1, keepdim=True)
        if reduce_sums is not None:
            mass, first = reduce_sums(torch.stack([mass, first])).unbind(0)
        empty, nk = mass <= eps, mass.clamp_min(eps)
        mean = first / nk
        var = (points - mean).square_().mul_(resp).sum(-1, keepdim=True)
        if reduce_sums is not None:
            var = reduce_sums(var)
    else:
        if reduce_sums is not None:
            raise ValueError("_m_step: reduce_sums is only supported for 1-D points")
        empty, nk = mass <= eps, mass.clamp_min(eps)
        mean = torch.einsum("kbm,bmd->kbd", resp, x) / nk
        var = (torch.einsum("kbm,bmd->kbd", resp, x.square()) - mass * mean.square()).clamp_min_(0)
    mean = torch.where(empty, previous.mean, mean)
    var = torch.where(empty, previous.var, (var / nk + reg).clamp_min_(floor))
    weight = (mass + 10 * eps).squeeze(-1)
    return _Mixture(weight / weight.sum(0), mean, var)


def _kmeans_plusplus(x: Tensor, k: int, seed: Seed) -> Tensor:
    """k-means++ seeds ``(k, B, D)`` of each of the ``B`` point sets (Arthur & Vassilvitskii, 2007)."""
    generator = _generator(seed, x.device)
    num_sets, num_points, _ = x.shape
    sets = torch.arange(num_sets, device=x.device)
    pick = torch.randint(num_points, (num_sets,), generator=generator, device=x.device)
    centers = [x[sets, pick]]
    dist2 = _sq_dist(x, centers[0].unsqueeze(0))[0]
    for _ in range(1, k):  # sequential by definition; k is small
        weights = torch.where(dist2.sum(1, keepdim=True) > 0, dist2, torch.ones_like(dist2))
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        centers.append(x[sets, pick])
        dist2 = torch.minimum(dist2, _sq_dist(x, centers[-1].unsqueeze(0))[0])
    return torch.stack(centers)


def _nearest(x: Tensor, centers: Tensor) -> Tensor:
    """One-hot assignment ``(K, B, M)`` of every point to its nearest center (ties: lowest index)."""
    labels = _sq_dist(x, centers).argmin(0)
    return torch.nn.functional.one_hot(labels, centers.shape[0]).permute(2, 0, 1).to(x.dtype)


def _lloyd(x: Tensor, centers: Tensor, max_steps: int, until_stable: bool = False) -> Tensor:
    """Lloyd's k-means steps; a center that loses all its points stays where it is."""
    for _ in range(max_steps):
        assigned = _nearest(x, centers)
        counts = assigned.sum(-1, keepdim=True)
        sums = torch.einsum("kbm,bmd->kbd", assigned, x)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        if until_stable and torch.equal(moved, centers):
            break
        centers = moved
    return centers


def _partition_mixture(x: Tensor, centers: Tensor, reg: float, floor: float) -> tuple[_Mixture, Tensor]:
    """The mixture of the nearest-center partition, and the cluster sizes ``(K, B)``.

    Weights are the cluster fractions, means the cluster means (an empty cluster keeps its
    center), variances the cluster variances; a cluster of fewer than two points has no spread
    and takes the variance of its whole point set instead.
    """
    assigned = _nearest(x, centers)
    overall = (x.var(1, correction=0) + reg).clamp_min(floor).expand_as(centers)
    mix = _m_step(x, assigned, _Mixture(None, centers, overall), reg, floor)
    counts = assigned.sum(-1)
    return mix._replace(var=torch.where(counts.unsqueeze(-1) < 2, overall, mix.var)), counts


# -- per-channel scalar mixtures: rows of (C, M) ----------------------------------------------------
class Mixture1d(NamedTuple):
    """Per-channel scalar mixtures: priors, means, variances, each ``(K, C)`` (a column per channel)."""

    prior: Tensor
    mean: Tensor
    var: Tensor


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
    return _kmeans_plusplus(x.unsqueeze(-1), k, generator)[..., 0].T.sort(dim=1).values


def kmeans_1d(x: Tensor, k: int, iters: int = _SEED_LLOYD_STEPS, generator=None) -> Tensor:
    """k-means of every row of ``x`` ``(C, M)``: k-means++ seeds, then ``iters`` Lloyd steps.

    A center that loses all its points stays where it is. Returns ``(C, k)`` sorted centers.
    """
    seeds = _kmeans_plusplus(x.unsqueeze(-1), k, generator)
    return _lloyd(x.unsqueeze(-1), seeds, iters)[..., 0].T.sort(dim=1).values


def _kmeans_mixture_1d(x: Tensor, k: int, floor: float, generator) -> tuple[_Mixture, Tensor]:
    """The mixture of each row's k-means partition (components sorted by mean), and cluster sizes."""
    return _partition_mixture(x.unsqueeze(-1), kmeans_1d(x, k, generator=generator).T.unsqueeze(-1), 0.0, floor)


def init_mixture_1d(x: Tensor, k: int, eps: float = 1e-5, generator=None) -> tuple[Tensor, Tensor, Tensor]:
    """UCB-Norm's initial mixture of every row of ``x`` ``(C, M)``, from its k-means (:func:`kmeans_1d`).

    Each point goes to its nearest center; a component's mean and variance are those of its
    points (an empty component keeps its center; one with fewer than two points takes the row's
    variance), floored at ``eps``. Priors are shared by all rows: the fraction of points assigned
    to each component over all rows, Laplace-smoothed so that none is zero.

    Returns:
        ``(prior (k,), mean (k, C), var (k, C))``, components sorted by mean in each row.
    """
    mix, counts = _kmeans_mixture_1d(x, k, eps, generator)
    prior = (counts.sum(1) + 1) / (counts.sum() + k)
    return prior, mix.mean[..., 0], mix.var[..., 0]


def fit_mixture_1d(
    x: Tensor,
    k: int,
    *,
    steps: int = 10,
    init: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    var_floor: float = 1e-5,
    generator=None,
    reduce_sums: Optional[Callable[[Tensor], Tensor]] = None,
) -> Mixture1d:
    r"""Fit an independent ``k``-component Gaussian mixture to every row of ``x`` ``(C, M)`` by EM.

    Without ``init``, each row starts from its k-means partition (k-means++ seeds, then 10 Lloyd
    steps; components sorted by mean), as :func:`init_mixture_1d` but with per-row priors. With
    ``init = (prior, mean, var)``, each ``(K, C)``, EM warm-starts from that mixture (and nothing
    is random). Then ``steps`` EM steps (M-step in the module docstring, no regulariser, variances
    floored at ``var_floor``). The number of steps is fixed, so there is no host synchronisation
    and the function traces under ``torch.compile``. The fit carries no gradient, and runs in
    ``x.dtype`` with autocast off.

    Degenerate rows never give NaN: a component that receives no points (a row with fewer
    distinct values than ``k``, a constant row) gets a prior of about zero and keeps its mean and
    variance; a component that collapses onto one value gets variance ``var_floor``. ``x`` must be
    finite (not checked here: that would synchronise with the device).

    Args:
        x: the data, one row per mixture, ``(C, M)``; the fit runs in ``x.dtype``.
        k: number of components.
        steps: EM steps. Default: ``10``
        init: ``(prior, mean, var)`` to warm-start from, each ``(K, C)``; ``None`` for k-means. Default: ``None``
        var_floor: lower bound of the variances. Default: ``1e-5``
        generator: an int seed or ``torch.Generator`` for the k-means++ draws. Default: torch's global one
        reduce_sums: the distributed seam, as in :func:`cbnorm.functional.ucb_norm_batch`: applied to
            every sum over a row's points (``(K, C, 1)`` tensors, stacked ``(2, K, C, 1)`` for the mass
            and first moment) before it is used, so that an all-reduce makes the fit that of the rows of
            every process together. Needs ``init``; ``x`` may then have no points. Default: ``None``

    Returns:
        :class:`Mixture1d` ``(prior, mean, var)``, each ``(K, C)``.

    Example::

        >>> rows = cbnorm.mixture.channel_samples(activations)      # (N, C, H, W) -> (C, N*H*W)
        >>> fit = cbnorm.mixture.fit_mixture_1d(rows, 3, steps=5)
        >>> fit = cbnorm.mixture.fit_mixture_1d(next_rows, 3, steps=2, init=fit)  # warm start
    """
    check_positive_int("fit_mixture_1d", "k", k)
    if x.dim() != 2 or not x.is_floating_point() or (x.shape[1] == 0 and reduce_sums is None):
        raise ValueError(f"fit_mixture_1d: expected a floating-point (C, M) tensor with M > 0, "
                         f"got {x.dtype} of shape {tuple(x.shape)}")
    if reduce_sums is not None and init is None:
        raise ValueError("fit_mixture_1d: reduce_sums needs init: the k-means start is not distributed")
    if init is not None and any(tuple(t.shape) != (k, x.shape[0]) for t in init):
        raise ValueError(f"fit_mixture_1d: expected init (prior, mean, var) of shape ({k}, {x.shape[0]}) each, "
                         f"got {[tuple(t.shape) for t in init]}")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # EM in x.dtype even under autocast
        points = x.unsqueeze(-1)
        if init is None:
            mix = _kmeans_mixture_1d(x, k, var_floor, generator)[0]
        else:
            prior, mean, var = (t.to(x.dtype) for t in init)
            mix = _Mixture(prior, mean.unsqueeze(-1), var.unsqueeze(-1))
        for _ in range(steps):
            mix = _m_step(points, _e_step(points, mix), mix, 0.0, var_floor, reduce_sums)
    return Mixture1d(mix.weight, mix.mean[..., 0], mix.var[..., 0])


# -- one mixture of (N, D) features -----------------------------------------------------------------
def _check_features(owner: str, features, min_rows: int, what: str) -> Tensor:
    """``features`` as a finite float64 ``(N, D)`` tensor with at least ``min_rows`` distinct rows."""
    x = torch.as_tensor(features).detach()
    if x.dim() != 2:
        raise ValueError(f"{owner}: expected features of shape (N, D), got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{owner}: expected a non-empty (N, D) input, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"{owner}: expected finite features, got NaN or Inf in {bad} of {x.shape[0]} rows")
    if min_rows > 1:
        distinct = x.shape[0] if x.shape[0] < min_rows else torch.unique(x, dim=0).shape[0]
        if distinct < min_rows:
            raise ValueError(f"{owner}: expected at least {what}={min_rows} distinct samples, got {distinct} "
                             f"(of {x.shape[0]} samples)")
    return x


def kmeans(features, k: int, *, max_iter: int = 300, seed: Seed = None) -> tuple[Tensor, Tensor]:
    """k-means of ``(N, D)`` features: k-means++ seeds, then Lloyd steps until no center moves.

    Runs in float64 on the features' device.

    Args:
        features: ``(N, D)`` tensor or array, finite, with at least ``k`` distinct rows.
        k: number of clusters.
        max_iter: at most this many Lloyd steps. Default: ``300``
        seed: an int or ``torch.Generator`` for the k-means++ draws. Default: torch's global generator

    Returns:
        ``(centers (k, D), labels (N,))``: float64 centers and int64 nearest-center labels.

    Example::

        >>> centers, labels = cbnorm.mixture.kmeans(features, 3, seed=0)
    """
    check_positive_int("kmeans", "k", k)
    x = _check_features("kmeans", features, k, "k").unsqueeze(0)
    centers = _lloyd(x, _kmeans_plusplus(x, k, seed), max_iter, until_stable=True)
    return centers[:, 0], _sq_dist(x, centers)[:, 0].argmin(0)


class GaussianMixture:
    r"""Gaussian mixture with diagonal covariances fitted by EM, in torch, with scikit-learn's API.

    .. math::
        p(x) = \sum_{k=1}^{K} \lambda_k \prod_{d=1}^{D} \mathcal{N}(x_d;\ \mu_{kd}, \sigma^2_{kd})

    The same algorithm as ``sklearn.mixture.GaussianMixture(covariance_type="diag")`` (see the
    module docstring for the M-step): EM stops when the mean log-likelihood of an E-step changes by
    less than ``tol`` (scikit-learn's default ``tol`` is ``1e-3``). Everything runs in float64,
    vectorised, on the device of the data.

    Initialisation (``init``): ``"kmeans++"`` seeds the means by k-means++ and takes the weights
    and variances of the nearest-seed partition; ``"kmeans"`` runs Lloyd's k-means from those
    seeds to convergence first (scikit-learn's default). ``means_init``, ``weights_init`` and
    ``variances_init`` start EM from given values instead; when only the means are given, the
    weights and variances come from the partition of the data by nearest initial mean.

    Args:
        n_components: :math:`K`, the number of components.
        max_iter: at most this many EM iterations. Default: ``100``
        tol: convergence threshold on the change of the mean log-likelihood. Default: ``1e-4``
        reg_covar: added to every variance, so none is zero. Default: ``1e-6``
        init: ``"kmeans++"`` or ``"kmeans"``. Default: ``"kmeans++"``
        n_init: initialisations to run EM from; the fit with the highest final mean
            log-likelihood is kept. Default: ``1``
        seed: an int or ``torch.Generator`` making the initialisation deterministic; ``None``
            draws from torch's global generator. Default: ``None``
        weights_init: initial weights ``(K,)``, positive and summing to one. Default: ``None``
        means_init: initial means ``(K, D)``. Default: ``None``
        variances_init: initial variances ``(K, D)``, positive. Default: ``None``

    Attributes:
        weights_: ``(K,)`` component weights :math:`\lambda`.
        means_: ``(K, D)`` means :math:`\mu`.
        variances_: ``(K, D)`` variances :math:`\sigma^2` (scikit-learn's ``covariances_`` for ``"diag"``).
        converged_: whether EM met ``tol`` within ``max_iter`` iterations.
        n_iter_: the number of EM iterations run.
        lower_bound_: the mean log-likelihood of the last E-step.

    Example::

        >>> gmm = cbnorm.mixture.GaussianMixture(3, seed=0).fit(features)   # features (N, D)
        >>> labels, mean_log_lik = gmm.predict(features), gmm.score(features)
    """

    INITS = ("kmeans++", "kmeans")

    def __init__(
        self,
        n_components: int,
        *,
        max_iter: int = 100,
        tol: float = 1e-4,
        reg_covar: float = 1e-6,
        init: str = "kmeans++",
        n_init: int = 1,
        seed: Seed = None,
        weights_init=None,
        means_init=None,
        variances_init=None,
    ) -> None:
        check_positive_int("GaussianMixture", "n_components", n_components)
        check_non_negative_int("GaussianMixture", "max_iter", max_iter)
        check_positive_int("GaussianMixture", "n_init", n_init)
        for name, value in (("tol", tol), ("reg_covar", reg_covar)):
            if not value >= 0:
                raise ValueError(f"GaussianMixture: expected {name} >= 0, got {value!r}")
        check_choice("GaussianMixture", "init", init, self.INITS)
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.init = init
        self.n_init = n_init
        self.seed = seed
        self.weights_init = weights_init
        self.means_init = means_init
        self.variances_init = variances_init

    def __repr__(self) -> str:
        return (f"GaussianMixture({self.n_components}, max_iter={self.max_iter}, tol={self.tol}, "
                f"reg_covar={self.reg_covar}, init={self.init!r}, n_init={self.n_init}, seed={self.seed!r})")

    # -- fitting ----------------------------------------------------------------------------------
    def _given(self, name: str, value, shape: tuple, x: Tensor) -> Optional[Tensor]:
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if tuple(value.shape) != shape:
            raise ValueError(f"GaussianMixture: expected {name} of shape {shape}, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()) or (name != "means_init" and not bool((value > 0).all())):
            raise ValueError(f"GaussianMixture: expected {name} to be finite" + ("" if name == "means_init" else " and positive"))
        if name == "weights_init" and abs(float(value.sum()) - 1) > 1e-6:
            raise ValueError(f"GaussianMixture: expected weights_init to sum to 1, got {float(value.sum()):.6g}")
        return value.unsqueeze(1)

    def _initial(self, x: Tensor, generator: Optional[torch.Generator]) -> _Mixture:
        k, dims = self.n_components, x.shape[-1]
        weight = self._given("weights_init", self.weights_init, (k,), x)
        mean = self._given("means_init", self.means_init, (k, dims), x)
        var = self._given("variances_init", self.variances_init, (k, dims), x)
        if mean is None:  # the mixture of a (k-means) partition: an M-step from hard assignments
            centers = _kmeans_plusplus(x, k, generator)
            if self.init == "kmeans":
                centers = _lloyd(x, centers, 300, until_stable=True)
            partition = _partition_mixture(x, centers, self.reg_covar, 0.0)[0]
            mean = partition.mean
        else:
            mean = mean - self._offset
            partition = _partition_mixture(x, mean, self.reg_covar, 0.0)[0]
        return _Mixture(partition.weight if weight is None else weight, mean, partition.var if var is None else var)

    def _em(self, x: Tensor, mix: _Mixture) -> tuple[float, _Mixture, bool, int]:
        """EM from ``mix`` until the mean log-likelihood moves less than ``tol``: ``(bound, mixture, converged, iterations)``."""
        floor = torch.finfo(x.dtype).tiny
        bound, converged, iterations = -math.inf, False, 0
        while iterations < self.max_iter and not converged:
            log_joint = _log_joint(x, mix)
            mix = _m_step(x, log_joint.softmax(0), mix, self.reg_covar, floor)
            previous, bound = bound, float(log_joint.logsumexp(0).mean())
            converged, iterations = abs(bound - previous) < self.tol, iterations + 1
        return bound, mix, converged, iterations

    def fit(self, X) -> "GaussianMixture":
        """Fit the mixture to ``X`` ``(N, D)`` (tensor or array) by EM; returns ``self``.

        Raises ``ValueError`` for input that is not 2-D, is empty, has NaN or Inf, or has fewer
        than ``n_components`` distinct rows.
        """
        x = _check_features("GaussianMixture", X, self.n_components, "n_components")
        self._offset = x.mean(0)  # EM on centred data: the variance expansion then loses no digits
        x = (x - self._offset).unsqueeze(0)
        generator = _generator(self.seed, x.device)
        runs = 1 if self.means_init is not None else self.n_init
        best = max((self._em(x, self._initial(x, generator)) for _ in range(runs)), key=lambda run: run[0])
        self.lower_bound_, mix, self.converged_, self.n_iter_ = best
        self.weights_, self.means_, self.variances_ = mix.weight[:, 0], mix.mean[:, 0] + self._offset, mix.var[:, 0]
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(f"GaussianMixture: EM did not converge in max_iter={self.max_iter} iterations "
                          f"(tol={self.tol}); raise max_iter or tol", RuntimeWarning, stacklevel=2)
        return self

    # -- using the fit ----------------------------------------------------------------------------
    def _log_joint(self, X) -> Tensor:
        """Log-joint ``(K, N)`` of every component and sample of ``X``, under the fitted mixture."""
        if not hasattr(self, "means_"):
            raise ValueError("GaussianMixture: this instance is not fitted yet; call fit(X) first")
        x = _check_features("GaussianMixture", X, 1, "")
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(f"GaussianMixture: expected {self.means_.shape[1]} features per sample "
                             f"(as in fit), got {x.shape[1]}")
        x = (x.to(self.means_.device) - self._offset).unsqueeze(0)
        mix = _Mixture(self.weights_[:, None], (self.means_ - self._offset)[:, None], self.variances_[:, None])
        return _log_joint(x, mix)[:, 0]

    def score_samples(self, X) -> Tensor:
        """Log-likelihood :math:`\\log p(x_n)` of every sample, ``(N,)`` float64."""
        return self._log_joint(X).logsumexp(0)

    def score(self, X) -> float:
        """Mean log-likelihood per sample of ``X`` under the fitted mixture."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X) -> Tensor:
        """Posterior probability of every component for every sample, ``(N, K)`` float64."""
        return self._log_joint(X).softmax(0).T

    def predict(self, X) -> Tensor:
        """The most probable component of every sample, ``(N,)`` int64."""
        return self.predict_proba(X).argmax(1)
