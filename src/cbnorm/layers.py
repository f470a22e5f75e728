r"""Cluster-based normalization layers: SCB-Norm, SCB-Norm-base and UCB-Norm.

The modules own parameters, buffers and mode; :mod:`cbnorm.functional` does the math. Every layer
takes ``num_features`` first, accepts ``(N, C, *)`` input (``(N, *, C)`` with ``channel_dim=-1``),
computes its statistics in float32 under autocast and returns the input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import distributed
from . import functional as F
from ._checks import check_choice, check_positive_int
from .context import current_cluster
from .mixture import channel_samples, init_mixture_1d

__all__ = ["SCBNorm", "SCBNormBase", "UCBNorm"]

# k-means++ initialisation looks at no more than this many entries of each channel.
_INIT_SAMPLES = 4096

#: A component whose posterior mass in a channel's batch is below one activation's worth has
#: received "almost no responsibility" (SPEC): its running state is left where it was.
MIN_MASS = 1.0


class _ClusterNorm(nn.Module):
    """Common state of every cbnorm layer: channel layout, ``eps`` and the optional affine map."""

    def __init__(
        self,
        num_features: int,
        num_components: int,
        eps: float,
        affine: bool,
        channel_dim: int,
        factory_kwargs: dict,
    ) -> None:
        super().__init__()
        layer = type(self).__name__
        check_positive_int(layer, "num_features", num_features)
        check_positive_int(layer, "the number of components", num_components)
        if not eps > 0:
            raise ValueError(f"{layer}: expected eps > 0, got {eps!r}")
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int) or channel_dim == 0:
            raise ValueError(f"{layer}: expected channel_dim to be a non-zero int (dim 0 is the batch), got {channel_dim!r}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.channel_dim = channel_dim
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _channels_first(self, x: Tensor) -> Tensor:
        """Validate ``x`` and view it as ``(N, C, *)``."""
        if not isinstance(x, Tensor):
            raise ValueError(f"{self._name}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"{self._name}: expected input of shape (N, C, *) with at least 2 dims, "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{self._name}: expected a floating-point input, got {x.dtype}")
        if not -x.dim() <= self.channel_dim < x.dim() or self.channel_dim % x.dim() == 0:
            raise ValueError(
                f"{self._name}: channel_dim={self.channel_dim} does not select a channel dim of "
                f"{x.dim()}D input of shape {tuple(x.shape)}"
            )
        if x.shape[self.channel_dim] != self.num_features:
            raise ValueError(
                f"{self._name}: expected {self.num_features} channels in dim {self.channel_dim}, "
                f"got {x.shape[self.channel_dim]} (input of shape {tuple(x.shape)})"
            )
        return x.movedim(self.channel_dim, 1)

    def _restore_layout(self, y: Tensor) -> Tensor:
        return y.movedim(1, self.channel_dim)

    def _check_finite(self, values: Tensor) -> None:
        # One reduction (a NaN or Inf anywhere makes the sum non-finite); the exact check runs
        # only when the sum trips, so a finite batch whose sum overflows still passes.
        total = values.sum(dtype=F.compute_dtype(values))
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"{self._name}: the training batch contains non-finite values (NaN or Inf); "
                f"the layer's state was left unchanged"
            )

    def _check_batch_size(self, x: Tensor) -> None:
        if x.numel() <= x.shape[1]:
            raise ValueError(
                f"{self._name}: expected more than 1 value per channel when training, "
                f"got input of shape {tuple(x.shape)}"
            )


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
        if batch:
            low, high = torch.aminmax(ids)
            low, high = int(low), int(high)
            if low < 0 or high >= self.num_clusters:
                raise ValueError(
                    f"{self._name}: cluster id {low if low < 0 else high} is out of range for "
                    f"num_clusters={self.num_clusters}; expected ids in [0, {self.num_clusters})"
                )
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
            return nn.functional.one_hot(self._check_ids(cluster, x), self.num_clusters)
        if tuple(cluster.shape) != (batch, self.num_clusters):
            raise ValueError(
                f"{self._name}: expected a cluster assignment of shape ({batch}, {self.num_clusters}), "
                f"got shape {tuple(cluster.shape)}"
            )
        rows = cluster.sum(1)
        if batch and (bool((cluster < 0).any()) or not torch.allclose(rows, torch.ones_like(rows), atol=1e-4)):
            raise ValueError(
                f"{self._name}: expected a cluster assignment with non-negative rows summing to 1, "
                f"got row sums in [{float(rows.min()):.4g}, {float(rows.max()):.4g}] and minimum {float(cluster.min()):.4g}"
            )
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


class _RunningMixtureNorm(_ClusterNorm):
    """Running mixture state ``(running_prior, running_mean, running_var)`` and its update rule.

    Shared by UCB-Norm's ``moving_average`` mode (priors ``(K,)`` shared by the channels) and
    Mixture Normalization (a mixture per channel, priors ``(K, C)``), with ``momentum``, the
    ``initialized`` flag that the first training batch sets, and the switch to statistics of the
    global batch under ``torch.distributed`` (:func:`cbnorm.convert_sync_cbnorm`).
    """

    #: Take batch statistics (and the first batch's initialisation) over the global batch of
    #: ``process_group`` in distributed training; set by :func:`cbnorm.convert_sync_cbnorm`.
    sync_statistics: bool = False
    #: The group whose ranks share statistics; ``None`` for the default group.
    process_group = None

    def _synchronised(self) -> bool:
        return distributed.sync_active(self.sync_statistics, self.training, self.process_group)

    def _check_global_count(self, count: int, x: Tensor, least: int) -> None:
        """The check of :meth:`_check_batch_size` (``least=2``) on the global batch; every rank raises alike."""
        if count < least:
            raise ValueError(
                f"{self._name}: expected at least {least} value{'s' * (least > 1)} per channel in the global batch "
                f"when training, got {count} over the {distributed.world_size(self.process_group)} ranks "
                f"(input of shape {tuple(x.shape)} on this rank)"
            )

    @torch.no_grad()
    def _global_initial_state(self, x: Tensor, max_per_channel: Optional[int], fit) -> list[Tensor]:
        """``fit(samples)`` of the global batch's entries, computed from rank 0's draw and broadcast from it.

        Every rank computes it from the same gathered samples (so all raise alike), then takes rank
        0's result, which holds even where the ranks' random generators differ.
        """
        rows = channel_samples(x.detach().to(F.compute_dtype(x)))
        gathered = distributed.gather_channel_samples(rows, max_per_channel, self.process_group)
        if not gathered.finite:
            raise ValueError(
                f"{self._name}: the training batch of some rank contains non-finite values (NaN or Inf); "
                f"the layer's state was left unchanged"
            )
        self._check_global_count(gathered.count, x, 1)
        return distributed.broadcast_from_first_rank(list(fit(gathered.samples)), self.process_group)

    def _normalize_batch(self, x: Tensor, prior: Tensor, mean: Tensor, var: Tensor, synchronised: bool) -> Tensor:
        """Eq. 7-9 with the statistics of the batch (the global batch when ``synchronised``), then the running update."""
        sums = distributed.GlobalSums(x.numel() // x.shape[1], self.process_group) if synchronised else None
        y, stats = F.ucb_norm_batch(x, prior, mean, var, self.weight, self.bias, self.eps, reduce_sums=sums)
        if sums is not None:
            self._check_global_count(sums.count, x, 2)
            stats = stats._replace(count=sums.count)
        self._track(stats)
        return y

    def _register_running_state(self, num_components: int, factory_kwargs: dict, per_channel_prior: bool = False) -> None:
        prior_shape = (num_components, self.num_features) if per_channel_prior else (num_components,)
        self.register_buffer("running_prior", torch.empty(prior_shape, **factory_kwargs))
        self.register_buffer("running_mean", torch.empty(num_components, self.num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.empty(num_components, self.num_features, **factory_kwargs))
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory_kwargs.items() if k != "dtype"}),
        )

    def _set_momentum(self, momentum: Optional[float]) -> None:
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{self._name}: expected momentum in [0, 1] or None, got {momentum!r}")
        self.momentum = momentum

    def _register_initialized(self, device) -> None:
        """A boolean buffer saying whether the first training batch has set up the state."""
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self._initialized = False

    def _mark_initialized(self, value: bool) -> None:
        self.initialized.fill_(value)
        self._initialized = value  # a Python mirror, so that torch.compile does not branch on a tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def _momentum_factor(self) -> float:
        if self.momentum is None:  # cumulative moving average, as in BatchNorm
            return 1.0 / (int(self.num_batches_tracked) + 1)
        return self.momentum

    @torch.no_grad()
    def _track(self, stats: F.ComponentStats) -> None:
        r"""Fold one batch's component statistics into the running state (one online-EM step).

        :math:`\mu_k \leftarrow (1-m)\mu_k + m E_k`, :math:`\sigma^2_k \leftarrow (1-m)\sigma^2_k +
        m V_k \cdot n/(n-1)`, :math:`\lambda_k \leftarrow (1-m)\lambda_k + m\,\mathrm{mean}_i\tau_k(x_i)`,
        then the priors are renormalised. A component that received almost no responsibility keeps
        its state: a channel of it whose mass :math:`\sum_{B_c}\tau_k` is below one activation's
        worth (:data:`MIN_MASS`) keeps its mean and variance, and its prior is kept when its mass
        averaged over the channels (or, for per-channel priors, in the channel) is below that.
        Such a batch holds less than one sample of the component, so its :math:`E_k, V_k` estimate
        nothing; following them anyway drives the prior and variance of a fading component toward
        zero, and Eq. 15's :math:`\tau_k/\sqrt{\lambda_k}` then blows up the activations that
        land near it at inference. A non-finite batch raises and changes nothing.
        """
        self._check_finite(torch.cat([stats.mass.flatten(), stats.mean.flatten(), stats.var.flatten()]))
        factor = self._momentum_factor()
        filled = stats.mass >= MIN_MASS
        unbiased_var = stats.var * (stats.count / (stats.count - 1))
        for running, batch in ((self.running_mean, stats.mean), (self.running_var, unbiased_var)):
            running.copy_(torch.where(filled, torch.lerp(running, batch.to(running.dtype), factor), running))
        # Priors shared by the channels (K,) pool the mass of all channels; per-channel (K, C) do not.
        mass = stats.mass.mean(1) if self.running_prior.dim() == 1 else stats.mass
        batch_prior = (mass / mass.sum(0)).to(self.running_prior.dtype)
        prior = torch.where(mass >= MIN_MASS, torch.lerp(self.running_prior, batch_prior, factor), self.running_prior)
        self.running_prior.copy_(prior / prior.sum(0))
        self.num_batches_tracked.add_(1)


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
    Inference uses Eq. 15 with the running state. With :math:`K=1` the layer is BatchNorm.

    ``update="weight"``: :math:`\lambda` (as softmax logits), :math:`\mu`, :math:`\sigma^2` (as
    ``log_var``) are parameters learned by backpropagation, and training and inference both use
    Eq. 15: no batch statistics, identical output in both modes, any batch size.

    Initial state: on the first training batch, :math:`\mu` is set per channel by k-means
    (k-means++ seeds, then 10 Lloyd steps) on up to 4096 of the channel's activations, and
    :math:`\sigma^2, \lambda` from that assignment (``init="kmeans++"``). Before that, the state is :math:`\mu=0, \sigma^2=1,
    \lambda=1/K`. ``init="random"`` draws the paper's reference start at construction:
    :math:`\mu\sim U(-1,1)`, :math:`\sigma^2\sim U(10^{-3}, 10^{-2})`, random normalised priors.

    Departures from the paper (see SPEC.md): the running update tracks the component statistics
    :math:`E_k, V_k` (Algorithm 2 writes the mean and variance of :math:`\hat x^k`, which are
    about 0 and 1 by construction); :math:`E_k` is a sum over :math:`\hat\tau`, not a mean;
    ``update="weight"`` uses Eq. 15 in training too; densities keep their normalising term and
    posteriors use log-sum-exp; a training batch with NaN or Inf raises ``ValueError`` and leaves
    the state unchanged.

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

    @torch.no_grad()
    def _set_state(self, prior: Tensor, mean: Tensor, var: Tensor) -> None:
        if self.update == "weight":
            self.prior_logits.copy_(prior.log())
            self.loc.copy_(mean)
            self.log_var.copy_(var.log())
        else:
            self.running_prior.copy_(prior)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        self._mark_initialized(True)

    def reset_running_stats(self) -> None:
        """Back to the initial state; with ``init="kmeans++"`` the next training batch re-seeds it."""
        k, c = self.num_components, self.num_features
        factory = {"device": self.initialized.device}
        if self.init == "random":
            prior = torch.empty(k, **factory).uniform_(0.01, 0.99)
            self._set_state(prior / prior.sum(), torch.empty(k, c, **factory).uniform_(-1, 1),
                            torch.empty(k, c, **factory).uniform_(1e-3, 1e-2))
        else:
            self._set_state(torch.full((k,), 1.0 / k, **factory), torch.zeros(k, c, **factory), torch.ones(k, c, **factory))
            self._mark_initialized(False)
        if self.update == "moving_average":
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_running_stats()

    @torch.no_grad()
    def _initialize(self, x: Tensor, synchronised: bool) -> None:
        def fit(samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return init_mixture_1d(samples, self.num_components, self.eps)

        if synchronised:
            self._set_state(*self._global_initial_state(x, _INIT_SAMPLES, fit))
            return
        self._check_finite(x)
        self._set_state(*fit(channel_samples(x.detach().to(F.compute_dtype(x)), _INIT_SAMPLES)))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        xc = self._channels_first(x)
        synchronised = self._synchronised()
        if self.training and not self._initialized:
            self._initialize(xc, synchronised)
        if self.training and self.update == "moving_average":
            if not synchronised:
                self._check_batch_size(xc)
            y = self._normalize_batch(xc, self.running_prior, self.running_mean, self.running_var, synchronised)
        else:
            if self.training:
                self._check_finite(xc)
            y = F.ucb_norm(xc, self.prior, self.mean, self.var, self.weight, self.bias, self.eps)
        return self._restore_layout(y)

    def extra_repr(self) -> str:
        return (
            "{num_features}, {num_components}, update={update!r}, init={init!r}, eps={eps}, "
            "momentum={momentum}, affine={affine}, channel_dim={channel_dim}".format(**self.__dict__)
        )
