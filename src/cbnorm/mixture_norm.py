r"""Mixture Normalization (Kalayeh & Shah, 2019): the MN baseline of the CB-Norm paper (II-B, Eq. 4-9)."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import distributed
from . import functional as F
from ._base import _both, _RunningMixtureNorm
from ._checks import check_positive_int
from .mixture import Mixture1d, channel_samples, fit_mixture_1d

__all__ = ["MixtureNorm"]


class MixtureNorm(_RunningMixtureNorm):
    r"""Mixture Normalization (MN): a Gaussian mixture per channel, refitted by EM on every batch.

    Each channel's activations :math:`B_c` are modelled by their own mixture of :math:`K`
    Gaussians :math:`(\lambda_{k,c}, \mu_{k,c}, \sigma^2_{k,c})`, all ``(K, C)``. In training the
    layer first refits that mixture on the batch, without gradient: ``em_steps`` EM steps
    warm-started from the previous batch's fit (the first batch starts from each channel's k-means
    partition: k-means++ seeds, Lloyd steps). Then, with :math:`\tau_k` the posteriors under the
    fit, it normalises with Eq. 7-9, exactly as :func:`cbnorm.functional.ucb_norm_batch`:

    .. math::
        \hat\tau_k(x_i) = \frac{\tau_k(x_i)}{\sum_{j\in B_c}\tau_k(x_j)},\quad
        E_k = \sum_{j\in B_c}\hat\tau_k(x_j)\,x_j,\quad
        V_k = \sum_{j\in B_c}\hat\tau_k(x_j)\,(x_j-E_k)^2

    .. math::
        y_i = \sum_{k=1}^{K} \frac{\tau_k(x_i)}{\sqrt{\lambda_{k,c}}}\,
              \frac{x_i - E_k}{\sqrt{V_k + \epsilon}} \cdot \gamma_c + \beta_c

    Gradients flow through :math:`\tau`, :math:`E` and :math:`V` (the fit is a constant, as
    BatchNorm's statistics are not). The running state then moves toward
    :math:`(\mathrm{mean}\,\tau, E, V\cdot m/(m-1))` with ``momentum``, and inference uses it in
    Eq. 15, :func:`cbnorm.functional.ucb_norm`. With :math:`K=1` the layer is BatchNorm.

    The fit lives in buffers of its own (``fit_prior``, ``fit_mean``, ``fit_var``), so it is saved,
    loaded and copied with the layer, and a loaded layer goes on from it.

    Degenerate input never gives NaN. A channel with fewer distinct values than :math:`K` (a
    constant channel, a dead ReLU) leaves the surplus components empty: their fitted prior goes to
    about zero, their posteriors to zero, so they drop out of the output, and they keep their
    previous mean and variance. Fitted variances are floored at ``eps``. A constant channel
    therefore comes out as :math:`\beta_c` (0 without ``affine``), as in BatchNorm. A training
    batch with NaN or Inf, or whose statistics overflow, raises ``ValueError`` (on CUDA a device-side
    assertion: ``docs/gpu-errors.md``) and leaves every buffer (fit and running state) unchanged;
    in eval a non-finite entry gives a non-finite output at that entry only, as
    BatchNorm's does. Training needs more than one value per channel.

    Distributed training: after :func:`cbnorm.convert_sync_cbnorm`, the EM fit, the first batch's
    k-means start and the batch statistics are those of the global batch of all ranks
    (:mod:`cbnorm.distributed`).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, *)`.
        num_components: :math:`K`, the number of mixture components per channel. Default: ``3``
        em_steps: EM steps per training batch, warm-started from the previous fit. Default: ``2``
            (on the shallow CNN's conv3 activations, 2 warm steps leave the fit about 1.5e-3
            nats per activation below the batch's maximum likelihood; each step costs about a
            third of a UCB-Norm training step)
        eps: added to the variances :math:`V_k` and the floor of the fitted variances. Default: ``1e-5``
        momentum: weight of the batch in the running update, or ``None`` for a cumulative
            average. Default: ``0.1``
        affine: add a per-channel :math:`\gamma, \beta` after normalisation. Default: ``True``
        channel_dim: the channel dim of the input; ``-1`` for ``(N, L, C)`` tokens. Default: ``1``

    Shape:
        - Input: :math:`(N, C, *)`, or :math:`(N, *, C)` with ``channel_dim=-1``
        - Output: same shape as input

    Examples::

        >>> norm = cbnorm.MixtureNorm(128, num_components=3)
        >>> y = norm(torch.randn(256, 128, 8, 8))   # fit by k-means + EM, then Eq. 7-9
        >>> norm.fit_prior.shape, norm.prior.shape  # (3, 128) each: a mixture per channel
        >>> y = norm.eval()(torch.randn(4, 128, 8, 8))  # Eq. 15 with the running state
    """

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        *,
        em_steps: int = 2,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        channel_dim: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(num_features, num_components, eps, affine, channel_dim, factory_kwargs)
        check_positive_int(self._name, "em_steps", em_steps)
        self._set_momentum(momentum)
        self.num_components = num_components
        self.em_steps = em_steps
        self._register_running_state(num_components, factory_kwargs, per_channel_prior=True)
        for name in Mixture1d._fields:
            self.register_buffer(f"fit_{name}", torch.empty(num_components, num_features, **factory_kwargs))
        self._register_initialized(device)
        self.reset_parameters()

    # -- state ---------------------------------------------------------------------------------
    @property
    def prior(self) -> Tensor:
        """Running component priors :math:`\\lambda` used at inference, ``(K, C)``."""
        return self.running_prior

    @property
    def mean(self) -> Tensor:
        """Running component means :math:`\\mu` used at inference, ``(K, C)``."""
        return self.running_mean

    @property
    def var(self) -> Tensor:
        """Running component variances :math:`\\sigma^2` used at inference, ``(K, C)``."""
        return self.running_var

    @property
    def fitted(self) -> Mixture1d:
        """The last training batch's fit ``(prior, mean, var)``, each ``(K, C)``."""
        return Mixture1d(self.fit_prior, self.fit_mean, self.fit_var)

    def reset_running_stats(self) -> None:
        """Running state and fit back to :math:`\\lambda=1/K, \\mu=0, \\sigma^2=1`.

        The next batch refits from k-means.
        """
        for prior, mean, var in ((self.running_prior, self.running_mean, self.running_var), self.fitted):
            prior.fill_(1.0 / self.num_components)
            mean.zero_()
            var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self._mark_initialized(False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.reset_running_stats()

    # -- forward -------------------------------------------------------------------------------
    @torch.no_grad()
    def _refit(self, x: Tensor, synchronised: bool) -> Mixture1d:
        """EM on the batch ``(N, C, *)``, from the previous fit or (first batch) k-means.

        ``synchronised``: EM on the global batch (its sums all-reduced), and the first batch's
        k-means taken on the global batch's entries, gathered, and broadcast from rank 0.
        """
        rows = channel_samples(x.detach().to(F.compute_dtype(x)))
        init = self.fitted if self._initialized else None
        reduce_sums = None
        if synchronised:
            reduce_sums = functools.partial(distributed.all_reduce_sum, process_group=self.process_group)
            if init is None:
                init = self._global_initial_state(x, None, functools.partial(
                    fit_mixture_1d, k=self.num_components, steps=0, var_floor=self.eps), least=2)
        return fit_mixture_1d(rows, self.num_components, steps=self.em_steps, init=init, var_floor=self.eps,
                              reduce_sums=reduce_sums)

    def forward(self, x: Tensor) -> Tensor:
        xc = self._channels_first(x)
        if not self.training:
            y = F.ucb_norm(
                xc, self.running_prior, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
            return self._restore_layout(y)
        # Every check runs before any state changes: the fit and the running update are computed first,
        # checked, and only then stored.
        synchronised = self._synchronised()
        ok = self._check_training_batch(xc, synchronised, 2)
        fit = self._refit(xc, synchronised)
        y, stats, counted = self._batch_forward(xc, fit, synchronised)
        ok = _both(_both(ok, counted), self._check_statistics(xc, [*fit, stats.mass, stats.mean, stats.var],
                                                             synchronised))
        fitted = {f"fit_{name}": t for name, t in fit._asdict().items()}
        self._commit_running(ok, self._running_update(self._running_state, stats), **fitted)
        return self._restore_layout(y)

    def extra_repr(self) -> str:
        return (
            "{num_features}, {num_components}, em_steps={em_steps}, eps={eps}, momentum={momentum}, "
            "affine={affine}, channel_dim={channel_dim}".format(**self.__dict__)
        )
