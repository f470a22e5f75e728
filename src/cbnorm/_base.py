r"""What every cbnorm layer shares: its constructor's argument checks, the channel layout, the checks of a
training batch, and the running mixture state of UCB-Norm and Mixture Normalization with its update rule."""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed
from . import functional as F
from ._checks import check_positive_int
from .mixture import Mixture1d, channel_samples

# What a layer's state_dict holds besides its mixture: a load without them still describes the mixture.
_NOT_MIXTURE_STATE = ("weight", "bias", "initialized", "num_batches_tracked")

#: A component whose posterior mass in a channel's batch is below one activation's worth has
#: received "almost no responsibility" (SPEC): its running state is left where it was.
MIN_MASS = 1.0


def _host_checks(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values on the host: in eager mode on the CPU, where that costs no device
    synchronisation, or anywhere with ``CBNORM_SYNC_CHECKS=1``; never while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("CBNORM_SYNC_CHECKS", "0") == "1"


def _both(first: Optional[Tensor], second: Optional[Tensor]) -> Optional[Tensor]:
    """The conjunction of two masks of :meth:`_ClusterNorm._require` (``None``: checked, true)."""
    if first is None or second is None:
        return second if first is None else first
    return first & second


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
            raise ValueError(
                f"{layer}: expected channel_dim to be a non-zero int (dim 0 is the batch), got {channel_dim!r}"
            )
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

    def _require(self, ok: Tensor, message: str, detail: Optional[Callable[[], str]] = None) -> Optional[Tensor]:
        """Raise ``ValueError`` unless ``ok``, a bool tensor; ``None`` if checked, else ``ok`` to mask state updates by.

        Where reading ``ok`` costs no device synchronisation (eager on CPU, or ``CBNORM_SYNC_CHECKS=1``) it is
        read at once and the error names the offending value (``detail()``, default ``message``). Elsewhere (CUDA,
        ``torch.compile``) it becomes a device-side assertion with ``message`` (see ``docs/gpu-errors.md``), and the
        caller masks its state updates by the returned ``ok``, so that a rejected batch changes no state there either.
        """
        if _host_checks(ok):
            if not bool(ok):
                raise ValueError(detail() if detail is not None else message)
            return None
        torch._assert_async(ok, message)
        return ok

    def _check_finite(self, x: Tensor) -> Optional[Tensor]:
        """A training batch must be finite: one reduction, whose minimum and maximum carry any NaN or Inf."""
        if x.numel() == 0:
            return None
        low, high = torch.aminmax(x.detach())
        message = (f"{self._name}: the training batch contains non-finite values (NaN or Inf); "
                   f"the layer's state was left unchanged")
        return self._require(torch.isfinite(low) & torch.isfinite(high), message)

    def _check_batch_size(self, x: Tensor, least: int = 2) -> None:
        if x.numel() < least * x.shape[1]:
            what = "more than 1 value" if least == 2 else f"at least {least} value{'s' * (least > 1)}"
            raise ValueError(
                f"{self._name}: expected {what} per channel when training, got input of shape {tuple(x.shape)}"
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

    def _check_global_count(self, count: Union[int, Tensor], x: Tensor, least: int) -> Optional[Tensor]:
        """The check of :meth:`_check_batch_size` on the global batch; every rank raises alike.

        ``count`` (entries per channel) may be a tensor summed on the device: the check then follows
        :meth:`_require`, so that a synchronised step never reads it on the host.
        """
        ranks = distributed.world_size(self.process_group)
        what = (f"{self._name}: expected at least {least} value{'s' * (least > 1)} per channel in the global batch "
                "when training, got")
        where = f"over the {ranks} ranks (input of shape {tuple(x.shape)} on this rank)"
        return self._require(torch.as_tensor(count >= least), f"{what} fewer {where}",
                             lambda: f"{what} {int(count)} {where}")

    def _check_training_batch(self, x: Tensor, collective: bool, least: int) -> Optional[Tensor]:
        """Batch size and finiteness, before anything changes; see :meth:`_require` for the returned mask.

        ``collective``: a step with collectives checks both on the global batch instead, on every rank alike
        (:meth:`_global_initial_state`, :meth:`_batch_forward`, :meth:`_check_statistics`).
        """
        if collective:
            return None
        self._check_batch_size(x, least)
        return self._check_finite(x)

    def _check_statistics(self, x: Tensor, tensors, collective: bool) -> Optional[Tensor]:
        """The statistics a training batch would leave must be finite: those of a finite batch can still overflow."""
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        dtype = F.compute_dtype(x)
        if collective:
            message = (f"{self._name}: the global training batch contains non-finite values (NaN or Inf) on some "
                       f"rank, or values whose statistics overflow {dtype}; the layer's state was left unchanged")
            return self._require(ok, message)
        message = (f"{self._name}: the statistics of the training batch overflow {dtype}; scale the input down; "
                   f"the layer's state was left unchanged")

        def detail() -> str:
            return (f"{self._name}: the training batch is finite, but its statistics overflow {dtype}: its largest "
                    f"magnitude is {float(x.detach().abs().amax()):.3g} (the largest {dtype} is "
                    f"{torch.finfo(dtype).max:.3g}); scale the input down; the layer's state was left unchanged")

        return self._require(ok, message, detail)

    @torch.no_grad()
    def _global_initial_state(self, x: Tensor, max_per_channel: Optional[int], fit, least: int) -> list[Tensor]:
        """``fit(samples)`` of the global batch's entries, computed from rank 0's draw and broadcast from it.

        Every rank computes it from the same gathered samples (so all raise alike), then takes rank
        0's result, which holds even where the ranks' random generators differ. ``least``: the fewest
        entries per channel that the step needs in the global batch, checked before the fit.
        """
        rows = channel_samples(x.detach().to(F.compute_dtype(x)))
        gathered = distributed.gather_channel_samples(rows, max_per_channel, self.process_group)
        if not gathered.finite:
            raise ValueError(
                f"{self._name}: the training batch of some rank contains non-finite values (NaN or Inf); "
                f"the layer's state was left unchanged"
            )
        self._check_global_count(gathered.count, x, least)
        return distributed.broadcast_from_first_rank(list(fit(gathered.samples)), self.process_group)

    def _batch_forward(
        self, x: Tensor, state: Mixture1d, synchronised: bool
    ) -> tuple[Tensor, F.ComponentStats, Optional[Tensor]]:
        """Eq. 7-9: posteriors from ``state``, statistics of the batch (the global batch when ``synchronised``),
        and the mask of :meth:`_require` of the global batch's size check (``None``: checked, or none needed)."""
        if not synchronised:
            return (*F.ucb_norm_batch(x, *state, self.weight, self.bias, self.eps), None)
        sums = distributed.GlobalSums(x.numel() // x.shape[1], self.process_group)
        y, stats = F.ucb_norm_batch(x, *state, self.weight, self.bias, self.eps, reduce_sums=sums)
        return y, stats._replace(count=sums.count), self._check_global_count(sums.count, x, 2)

    def _register_running_state(
        self, num_components: int, factory_kwargs: dict, per_channel_prior: bool = False
    ) -> None:
        prior_shape = (num_components, self.num_features) if per_channel_prior else (num_components,)
        self.register_buffer("running_prior", torch.empty(prior_shape, **factory_kwargs))
        self.register_buffer("running_mean", torch.empty(num_components, self.num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.empty(num_components, self.num_features, **factory_kwargs))
        self.register_buffer(
            "num_batches_tracked",
            torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory_kwargs.items() if k != "dtype"}),
        )

    @property
    def _running_state(self) -> Mixture1d:
        return Mixture1d(self.running_prior, self.running_mean, self.running_var)

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
        self._initialized = value  # a Python mirror: forward never reads the buffer on the host

    @torch.no_grad()
    def _commit(self, ok: Optional[Tensor], values: dict[str, Tensor], count_batch: bool = True) -> None:
        """Store a training batch's state into the parameters or buffers of those names and mark the layer initialised.

        ``ok``, from device-side checks (:meth:`_require`), masks every update: a rejected batch changes nothing.
        """
        for name, value in values.items():
            target = getattr(self, name)
            value = value.to(target.dtype)
            target.copy_(value if ok is None else torch.where(ok, value, target))
        if count_batch:
            self.num_batches_tracked.add_(1 if ok is None else ok.long())
        if ok is None:
            self.initialized.fill_(True)
        else:
            self.initialized.logical_or_(ok)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """As ``nn.Module``'s, but a load that fails changes nothing here, and ``initialized`` follows the mixture.

        A size mismatch makes ``load_state_dict`` raise: every tensor of this layer is then left as it was. The
        mixture (its tensors and ``initialized``) loads whole or not at all: a state dict that lacks part of it
        leaves all of it as it was (and raises unless ``strict=False``), so the flag never claims a mixture
        that was not loaded.
        """
        own = {**dict(self.named_parameters(recurse=False)), **dict(self.named_buffers(recurse=False))}
        before = {name: t.detach().clone() for name, t in own.items()}
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        with torch.no_grad():
            if len(error_msgs) > errors:
                for name, value in before.items():
                    own[name].copy_(value)
            elif any(prefix + name not in state_dict for name in own if name not in _NOT_MIXTURE_STATE):
                for name, value in before.items():
                    if name not in ("weight", "bias"):
                        own[name].copy_(value)
        self._initialized = bool(self.initialized)

    def _momentum_factor(self, dtype: torch.dtype):
        if self.momentum is None:  # cumulative moving average, as in BatchNorm (a tensor: never read on the host)
            return (self.num_batches_tracked + 1).to(dtype).reciprocal()
        return self.momentum

    def _running_update(self, state: Mixture1d, stats: F.ComponentStats) -> Mixture1d:
        r"""The running state after folding one batch's component statistics into ``state`` (one online-EM step).

        :math:`\mu_k \leftarrow (1-m)\mu_k + m E_k`, :math:`\sigma^2_k \leftarrow (1-m)\sigma^2_k +
        m V_k \cdot n/(n-1)`, :math:`\lambda_k \leftarrow (1-m)\lambda_k + m\,\mathrm{mean}_i\tau_k(x_i)`,
        then the priors are renormalised. A component that received almost no responsibility keeps
        its state: a channel of it whose mass :math:`\sum_{B_c}\tau_k` is below one activation's
        worth (:data:`MIN_MASS`) keeps its mean and variance, and its prior is kept when its mass
        averaged over the channels (or, for per-channel priors, in the channel) is below that.
        Such a batch holds less than one sample of the component, so its :math:`E_k, V_k` estimate
        nothing; following them anyway drives the prior and variance of a fading component toward
        zero, and Eq. 15's :math:`\tau_k/\sqrt{\lambda_k}` then blows up the activations that
        land near it at inference.
        """
        dtype = state.mean.dtype
        factor = self._momentum_factor(dtype)
        filled = stats.mass >= MIN_MASS
        unbiased_var = stats.var * (stats.count / (stats.count - 1))
        mean, var = (torch.where(filled, torch.lerp(old, new.to(dtype), factor), old)
                     for old, new in ((state.mean, stats.mean), (state.var, unbiased_var)))
        # Priors shared by the channels (K,) pool the mass of all channels; per-channel (K, C) do not.
        mass = stats.mass.mean(1) if state.prior.dim() == 1 else stats.mass
        batch_prior = (mass / mass.sum(0)).to(dtype)
        prior = torch.where(mass >= MIN_MASS, torch.lerp(state.prior, batch_prior, factor), state.prior)
        return Mixture1d(prior / prior.sum(0), mean, var)

    def _commit_running(self, ok: Optional[Tensor], running: Mixture1d, **values: Tensor) -> None:
        self._commit(ok, {f"running_{name}": t for name, t in running._asdict().items()} | values)
