r"""Cluster-based normalization layers: SCB-Norm, SCB-Norm-base and UCB-Norm.

The modules own parameters, buffers and mode; :mod:`cbnorm.functional` does the math. Every layer
takes ``num_features`` first, accepts ``(N, C, *)`` input (``(N, *, C)`` with ``channel_dim=-1``),
computes its statistics in float32 under autocast and returns the input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import MIN_MASS, _both, _ClusterNorm, _RunningMixtureNorm  # noqa: F401 (cbnorm.layers.MIN_MASS)
from ._checks import check_choice
from .context import current_cluster
from .mixture import Mixture1d, channel_samples, init_mixture_1d

__all__ = ["SCBNorm", "SCBNormBase", "UCBNorm"]

# k-means++ initialisation looks at no more than this many entries of each channel.
_INIT_SAMPLES = 4096

class _SupervisedClusterNorm(_ClusterNorm):
    """Cluster-id handling shared by SCB-Norm and SCB-Norm-base."""

    def __init__(self, num_features, num_clusters, eps, affine, channel_dim, factory_kwargs) -> None:
        super().__init__(num_features, num_clusters, eps, affine, channel_dim, factory_kwargs)
        self.num_clusters = num_clusters

    def _cluster(self, cluster: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        """The explicit ``cluster`` or the one of the enclosing :func:`cbnorm.cluster_context`."""
        if cluster is None:
            cluster = current_cluster()
        if cluster is None and self.training:
            raise ValueError(
                f"{self._name}: cluster ids are required in training mode; pass forward(x, cluster=ids) "
                f"or run the model inside cbnorm.cluster_context(ids)"
            )
        if cluster is not None and not isinstance(cluster, Tensor):
            raise ValueError(f"{self._name}: expected cluster ids as a torch.Tensor, got {type(cluster).__name__}")
        return cluster

    def _check_ids(self, ids: Tensor, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if ids.dtype != torch.int64:
            raise ValueError(f"{self._name}: expected cluster ids of dtype torch.int64, got {ids.dtype}")
        if tuple(ids.shape) != (batch,):
            raise ValueError(
                f"{self._name}: expected cluster ids of shape ({batch},) for a batch of {batch}, "
                f"got shape {tuple(ids.shape)}"
            )
        k = self.num_clusters

        def detail() -> str:
            low, high = (int(t) for t in torch.aminmax(ids))
            return (f"{self._name}: cluster id {low if low < 0 else high} is out of range for num_clusters={k}; "
                    f"expected ids in [0, {k})")

        message = f"{self._name}: a cluster id is out of range for num_clusters={k}; expected ids in [0, {k})"
        self._require(((ids >= 0) & (ids < k)).all(), message, detail)
        return ids.to(x.device)


class SCBNorm(_SupervisedClusterNorm):
    r"""Supervised Cluster-Based Normalization (SCB-Norm, paper III-A, Eq. 10-13).

    Each sample carries a known cluster id :math:`z_n \in [0, K)`; every cluster has learned
    per-channel statistics :math:`\mu, \sigma^2` of shape ``(K, C)`` (trained by backpropagation
    only; there are no running statistics):

    .. math::
        y_{n,c,l} = \frac{x_{n,c,l} - \mu_{z_n,c}}{\sqrt{\sigma^2_{z_n,c} + \epsilon}} \cdot \gamma_c + \beta_c

    When the cluster is unknown (inference only), with uniform priors and the posterior
    :math:`\tau_k(x_i) = \mathcal{N}(x_i;\mu_{k,c},\sigma^2_{k,c}) / \sum_j \mathcal{N}(x_i;\mu_{j,c},\sigma^2_{j,c})`:

    .. math::
        y_i = \sqrt{K} \sum_k \tau_k(x_i)\,\frac{x_i - \mu_{k,c}}{\sqrt{\sigma^2_{k,c} + \epsilon}}

    ``unknown="posterior"`` drops the :math:`\sqrt K`; ``unknown="map"`` uses Eq. 10 with
    :math:`\arg\max_k \tau_k`. ``posterior="sample"`` takes one posterior per sample from the
    log-likelihood summed over its channels and positions instead of one per activation.

    Clusters come from ``forward(x, cluster=ids)`` or, for layers deep inside a model, from
    :func:`cbnorm.cluster_context`; an explicit argument wins.

    Departures from the paper (see SPEC.md): the statistics start at :math:`\mu=0, \sigma^2=1` (an
    identity layer) rather than random values; :math:`\sigma^2` is stored as ``log_var`` so it stays
    positive; Eq. 13's extra :math:`1/K` is read as a typo (:math:`\tau` is a true posterior).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, *)`.
        num_clusters: :math:`K`, the number of clusters.
        eps: added to the variance for numerical stability. Default: ``1e-5``
        affine: add a per-channel :math:`\gamma, \beta` after normalisation. Default: ``False``
        channel_dim: the channel dim of the input; ``-1`` for ``(N, L, C)`` tokens. Default: ``1``
        unknown: rule for unknown clusters, ``"paper"``, ``"posterior"`` or ``"map"``. Default: ``"paper"``
        posterior: scope of the unknown-cluster posterior, ``"element"`` or ``"sample"``. Default: ``"element"``

    Shape:
        - Input: :math:`(N, C, *)`, or :math:`(N, *, C)` with ``channel_dim=-1``
        - cluster: :math:`(N,)` int64 ids in :math:`[0, K)`, or ``None``
        - Output: same shape as input

    Examples::

        >>> norm = cbnorm.SCBNorm(64, num_clusters=3)
        >>> x, ids = torch.randn(32, 64, 8, 8), torch.randint(0, 3, (32,))
        >>> y = norm(x, cluster=ids)
        >>> norm.eval()
        >>> y_unknown = norm(x)  # Eq. 12, clusters inferred
    """

    def __init__(
        self,
        num_features: int,
        num_clusters: int,
        *,
        eps: float = 1e-5,
        affine: bool = False,
        channel_dim: int = 1,
        unknown: str = "paper",
        posterior: str = "element",
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, num_clusters, eps, affine, channel_dim, factory_kwargs)
        check_choice(self._name, "unknown", unknown, F.UNKNOWN_RULES)
        check_choice(self._name, "posterior", posterior, F.POSTERIOR_SCOPES)
        self.unknown = unknown
        self.posterior = posterior
        self.loc = nn.Parameter(torch.empty(num_clusters, num_features, **factory_kwargs))
        self.log_var = nn.Parameter(torch.empty(num_clusters, num_features, **factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.loc)
        nn.init.zeros_(self.log_var)

    @property
    def mean(self) -> Tensor:
        """Cluster means :math:`\\mu`, ``(K, C)``."""
        return self.loc

    @property
    def var(self) -> Tensor:
        """Cluster variances :math:`\\sigma^2`, ``(K, C)``."""
        return self.log_var.exp()

    def forward(self, x: Tensor, cluster: Optional[Tensor] = None) -> Tensor:
        xc = self._channels_first(x)
        cluster = self._cluster(cluster, xc)
        if cluster is not None:
            cluster = self._check_ids(cluster, xc)
        if self.training:
            self._check_finite(xc)
        y = F.scb_norm(xc, cluster, self.mean, self.var, self.weight, self.bias, self.eps, self.unknown, self.posterior)
        return self._restore_layout(y)

    def extra_repr(self) -> str:
        return (
            "{num_features}, {num_clusters}, eps={eps}, affine={affine}, channel_dim={channel_dim}, "
            "unknown={unknown!r}, posterior={posterior!r}".format(**self.__dict__)
        )


class SCBNormBase(_SupervisedClusterNorm):
    r"""SCB-Norm-base: SCB-Norm whose statistics come from two linear maps of the cluster code.

    With :math:`a_n` the one-hot code of sample :math:`n`'s cluster (or a soft assignment whose
    rows sum to one):

    .. math::
        \mu_n = W_\mu a_n + b_\mu, \qquad \sigma^2_n = \exp(W_s a_n + b_s), \qquad
        y_{n,c,l} = \frac{x_{n,c,l} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}} \cdot \gamma_c + \beta_c

    The maps start at zero, so a new layer is the identity. With unknown clusters (inference
    only) the code is the uniform assignment :math:`a_n = 1/K`. The paper does not say how the
    second map's output is kept positive; here it is a log-variance.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, *)`.
        num_clusters: :math:`K`, the number of clusters.
        eps: added to the variance for numerical stability. Default: ``1e-5``
        affine: add a per-channel :math:`\gamma, \beta` after normalisation. Default: ``False``
        channel_dim: the channel dim of the input; ``-1`` for ``(N, L, C)`` tokens. Default: ``1``

    Shape:
        - Input: :math:`(N, C, *)`, or :math:`(N, *, C)` with ``channel_dim=-1``
        - cluster: :math:`(N,)` int64 ids, :math:`(N, K)` float assignment, or ``None``
        - Output: same shape as input

    Examples::

        >>> norm = cbnorm.SCBNormBase(64, num_clusters=2)
        >>> y = norm(torch.randn(32, 64, 8, 8), cluster=torch.randint(0, 2, (32,)))
    """

    def __init__(
        self,
        num_features: int,
        num_clusters: int,
        *,
        eps: float = 1e-5,
        affine: bool = False,
        channel_dim: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, num_clusters, eps, affine, channel_dim, factory_kwargs)
        self.mean_proj = nn.Linear(num_clusters, num_features, **factory_kwargs)
        self.log_var_proj = nn.Linear(num_clusters, num_features, **factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for proj in (self.mean_proj, self.log_var_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    @property
    def mean(self) -> Tensor:
        """Per-cluster means :math:`W_\\mu + b_\\mu`, ``(K, C)``."""
        return self.mean_proj.weight.T + self.mean_proj.bias

    @property
    def var(self) -> Tensor:
        """Per-cluster variances :math:`\\exp(W_s + b_s)`, ``(K, C)``."""
        return (self.log_var_proj.weight.T + self.log_var_proj.bias).exp()

    def _assignment(self, cluster: Optional[Tensor], x: Tensor) -> Tensor:
        batch = x.shape[0]
        if cluster is None:
            return x.new_full((batch, self.num_clusters), 1.0 / self.num_clusters, dtype=F.compute_dtype(x))
        if not cluster.is_floating_point():
            # a comparison, not nn.functional.one_hot, which reads the ids' range on the host on the CPU
            ids = self._check_ids(cluster, x)
            return ids.unsqueeze(1) == torch.arange(self.num_clusters, device=ids.device)
        if tuple(cluster.shape) != (batch, self.num_clusters):
            raise ValueError(
                f"{self._name}: expected a cluster assignment of shape ({batch}, {self.num_clusters}), "
                f"got shape {tuple(cluster.shape)}"
            )
        rows = cluster.sum(1)

        def detail() -> str:
            return (f"{self._name}: expected a cluster assignment with non-negative rows summing to 1, got row sums in "
                    f"[{float(rows.min()):.4g}, {float(rows.max()):.4g}] and minimum {float(cluster.min()):.4g}")

        valid = (cluster >= 0).all() & torch.isclose(rows, torch.ones_like(rows), atol=1e-4).all()
        message = f"{self._name}: expected a cluster assignment with non-negative rows summing to 1"
        self._require(valid, message, detail)
        return cluster.to(x.device)

    def forward(self, x: Tensor, cluster: Optional[Tensor] = None) -> Tensor:
        xc = self._channels_first(x)
        assignment = self._assignment(self._cluster(cluster, xc), xc)
        if self.training:
            self._check_finite(xc)
        y = F.scb_base_norm(
            xc,
            assignment,
            self.mean_proj.weight,
            self.mean_proj.bias,
            self.log_var_proj.weight,
            self.log_var_proj.bias,
            self.weight,
            self.bias,
            self.eps,
        )
        return self._restore_layout(y)

    def extra_repr(self) -> str:
        return "{num_features}, {num_clusters}, eps={eps}, affine={affine}, channel_dim={channel_dim}".format(
            **self.__dict__
        )


class UCBNorm(_RunningMixtureNorm):
    r"""Unsupervised Cluster-Based Normalization (UCB-Norm, paper III-B, Eq. 7-9, 14-15).

    Each channel's activations are a mixture of :math:`K` Gaussians with priors :math:`\lambda`
    ``(K,)`` (shared by all channels), means :math:`\mu` and variances :math:`\sigma^2` ``(K, C)``.
    Every activation is normalised by every component, weighted by its posterior

    .. math::
        \tau_k(x_i) = \frac{\lambda_k\,\mathcal{N}(x_i;\mu_{k,c},\sigma^2_{k,c})}
                           {\sum_j \lambda_j\,\mathcal{N}(x_i;\mu_{j,c},\sigma^2_{j,c})}, \qquad
        y_i = \sum_{k=1}^{K} \frac{\tau_k(x_i)}{\sqrt{\lambda_k}}\,
              \frac{x_i - \mu_{k,c}}{\sqrt{\sigma^2_{k,c} + \epsilon}} \cdot \gamma_c + \beta_c \quad\text{(Eq. 15)}

    ``update="moving_average"`` (default): :math:`\lambda, \mu, \sigma^2` are running buffers. In
    training, :math:`\tau` comes from the running state and the components are re-estimated on
    the batch, :math:`E_k = \sum_{j\in B_c}\hat\tau_k(x_j)x_j`, :math:`V_k = \sum_{j\in B_c}\hat\tau_k(x_j)(x_j-E_k)^2`
    with :math:`\hat\tau_k = \tau_k / \sum_{B_c}\tau_k`, and :math:`E_k, V_k` replace
    :math:`\mu, \sigma^2` above (Eq. 7-9). The running state then moves toward
    :math:`(\mathrm{mean}\,\tau, E, V\cdot m/(m-1))` with ``momentum``: one step of online EM.
    Inference uses Eq. 15 with the running state.

    With :math:`K=1` the training output is BatchNorm's, and so is the running update. The running state
    starts elsewhere: from the first batch's k-means start (its mean and biased variance) where BatchNorm's
    starts from :math:`(0, 1)`. After :math:`t` batches the running mean and variance therefore exceed
    BatchNorm's by :math:`(1-m)^t` times the first batch's mean and (biased variance - 1), and so differ
    eval outputs; with ``momentum=None`` they are BatchNorm's exactly. Loading BatchNorm's initial state
    with ``initialized=True`` gives BatchNorm step for step.

    ``update="weight"``: :math:`\lambda` (as softmax logits), :math:`\mu`, :math:`\sigma^2` (as
    ``log_var``) are parameters learned by backpropagation, and training and inference both use
    Eq. 15: no batch statistics, identical output in both modes, any batch size.

    Initial state: on the first training batch, :math:`\mu` is set per channel by k-means
    (k-means++ seeds, then 10 Lloyd steps) on up to 4096 of the channel's activations, and
    :math:`\sigma^2, \lambda` from that assignment (``init="kmeans++"``). Before that, the state is
    :math:`\mu=0, \sigma^2=1, \lambda=1/K`. ``init="random"`` draws the paper's reference start at construction:
    :math:`\mu\sim U(-1,1)`, :math:`\sigma^2\sim U(10^{-3}, 10^{-2})`, random normalised priors.

    Departures from the paper (see SPEC.md): the running update tracks the component statistics
    :math:`E_k, V_k` (Algorithm 2 writes the mean and variance of :math:`\hat x^k`, which are
    about 0 and 1 by construction); :math:`E_k` is a sum over :math:`\hat\tau`, not a mean;
    ``update="weight"`` uses Eq. 15 in training too; densities keep their normalising term and
    posteriors use log-sum-exp; a training batch with NaN or Inf, or whose statistics overflow, raises
    ``ValueError`` and leaves the state unchanged (on CUDA a device-side assertion: ``docs/gpu-errors.md``).
    For inputs so large (float32 beyond about :math:`10^{18}\sigma`) that the log-densities would overflow,
    the posteriors take their limit, so every finite input gives a finite output.

    Distributed training: after :func:`cbnorm.convert_sync_cbnorm`, the batch statistics and the
    first batch's k-means start are those of the global batch of all ranks (:mod:`cbnorm.distributed`).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, *)`.
        num_components: :math:`K`, the number of mixture components. Default: ``3``
        update: ``"moving_average"`` or ``"weight"``. Default: ``"moving_average"``
        init: ``"kmeans++"`` (first training batch) or ``"random"``. Default: ``"kmeans++"``
        eps: added to variances for numerical stability. Default: ``1e-5``
        momentum: weight of the batch in the running update, or ``None`` for a cumulative
            average (``moving_average`` only). Default: ``0.1``
        affine: add a per-channel :math:`\gamma, \beta` after normalisation. Default: ``False``
        channel_dim: the channel dim of the input; ``-1`` for ``(N, L, C)`` tokens. Default: ``1``

    Shape:
        - Input: :math:`(N, C, *)`, or :math:`(N, *, C)` with ``channel_dim=-1``
        - Output: same shape as input

    Examples::

        >>> norm = cbnorm.UCBNorm(64, num_components=3)
        >>> y = norm(torch.randn(32, 64, 8, 8))  # first batch: k-means++ init, then Eq. 7-9
        >>> norm.prior, norm.mean.shape, norm.var.shape
        >>> learned = cbnorm.UCBNorm(64, 3, update="weight")  # Eq. 15 in train and eval
    """

    UPDATES = ("moving_average", "weight")
    INITS = ("kmeans++", "random")

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        *,
        update: str = "moving_average",
        init: str = "kmeans++",
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        channel_dim: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, num_components, eps, affine, channel_dim, factory_kwargs)
        check_choice(self._name, "update", update, self.UPDATES)
        check_choice(self._name, "init", init, self.INITS)
        self._set_momentum(momentum)
        self.num_components = num_components
        self.update = update
        self.init = init
        if update == "weight":
            self.prior_logits = nn.Parameter(torch.empty(num_components, **factory_kwargs))
            self.loc = nn.Parameter(torch.empty(num_components, num_features, **factory_kwargs))
            self.log_var = nn.Parameter(torch.empty(num_components, num_features, **factory_kwargs))
        else:
            self._register_running_state(num_components, factory_kwargs)
        self._register_initialized(device)
        self.reset_parameters()

    # -- state ---------------------------------------------------------------------------------
    @property
    def prior(self) -> Tensor:
        """Component priors :math:`\\lambda`, ``(K,)``."""
        return self.prior_logits.softmax(0) if self.update == "weight" else self.running_prior

    @property
    def mean(self) -> Tensor:
        """Component means :math:`\\mu`, ``(K, C)``."""
        return self.loc if self.update == "weight" else self.running_mean

    @property
    def var(self) -> Tensor:
        """Component variances :math:`\\sigma^2`, ``(K, C)``."""
        return self.log_var.exp() if self.update == "weight" else self.running_var

    def _set_state(self, prior: Tensor, mean: Tensor, var: Tensor, ok: Optional[Tensor] = None) -> None:
        if self.update == "weight":
            values = {"prior_logits": prior.log(), "loc": mean, "log_var": var.log()}
        else:
            values = {"running_prior": prior, "running_mean": mean, "running_var": var}
        self._commit(ok, values, count_batch=False)

    def reset_running_stats(self) -> None:
        """Back to the initial state; with ``init="kmeans++"`` the next training batch re-seeds it."""
        k, c = self.num_components, self.num_features
        factory = {"device": self.initialized.device}
        if self.init == "random":
            prior = torch.empty(k, **factory).uniform_(0.01, 0.99)
            self._set_state(prior / prior.sum(), torch.empty(k, c, **factory).uniform_(-1, 1),
                            torch.empty(k, c, **factory).uniform_(1e-3, 1e-2))
        else:
            self._set_state(
                torch.full((k,), 1.0 / k, **factory), torch.zeros(k, c, **factory), torch.ones(k, c, **factory)
            )
            self._mark_initialized(False)
        if self.update == "moving_average":
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_running_stats()

    @torch.no_grad()
    def _initial_state(self, x: Tensor, synchronised: bool, least: int) -> Mixture1d:
        """The first training batch's k-means start (of the global batch when ``synchronised``), not yet stored."""
        def fit(samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return init_mixture_1d(samples, self.num_components, self.eps)

        if synchronised:
            state = self._global_initial_state(x, _INIT_SAMPLES, fit, least)
        else:
            state = fit(channel_samples(x.detach().to(F.compute_dtype(x)), _INIT_SAMPLES))
        return Mixture1d(*(t.to(self.mean.dtype) for t in state))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        xc = self._channels_first(x)
        if not self.training:
            y = F.ucb_norm(xc, self.prior, self.mean, self.var, self.weight, self.bias, self.eps)
            return self._restore_layout(y)
        # Every check runs before any state changes: the k-means start and the running update are computed
        # first, checked, and only then stored.
        synchronised = self._synchronised()
        batch_statistics = self.update == "moving_average"
        least = 2 if batch_statistics else int(not self._initialized)  # Eq. 15 alone needs no batch statistics
        ok = self._check_training_batch(xc, synchronised and (batch_statistics or not self._initialized), least)
        start = None if self._initialized else self._initial_state(xc, synchronised, least)
        if batch_statistics:
            state = self._running_state if start is None else start
            y, stats, counted = self._batch_forward(xc, state, synchronised)
            checked = [*state, stats.mass, stats.mean, stats.var]
            ok = _both(_both(ok, counted), self._check_statistics(xc, checked, synchronised))
            self._commit_running(ok, self._running_update(state, stats))
            return self._restore_layout(y)
        if start is not None:
            self._set_state(*start, ok=_both(ok, self._check_statistics(xc, start, synchronised)))
        return self._restore_layout(F.ucb_norm(xc, self.prior, self.mean, self.var, self.weight, self.bias, self.eps))

    def extra_repr(self) -> str:
        return (
            "{num_features}, {num_components}, update={update!r}, init={init!r}, eps={eps}, "
            "momentum={momentum}, affine={affine}, channel_dim={channel_dim}".format(**self.__dict__)
        )
