"""Model conversion: BatchNorm layers replaced by a registered norm layer, or switched to global statistics.

* :func:`convert_batchnorm` puts any layer of the registry (:mod:`cbnorm.factory`) in place of a model's
  BatchNorm layers;
* :func:`convert_sync_cbnorm` makes every batch statistic of a model global across the ranks of
  distributed training, with :class:`SyncBatchNorm` (``torch.nn.SyncBatchNorm`` that also runs on
  CPU) in place of BatchNorm; the collectives it relies on are in :mod:`cbnorm.distributed`.

Both are also importable from :mod:`cbnorm`, and the distributed pair from :mod:`cbnorm.distributed`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import _RunningMixtureNorm
from .distributed import GlobalSums, all_reduce_sum, sync_active
from .factory import NormLayer, create_norm_layer, norm_layer_info

__all__ = ["SyncBatchNorm", "convert_batchnorm", "convert_sync_cbnorm"]


def convert_batchnorm(
    model: nn.Module, norm_layer: NormLayer, *, only: Iterable[str] | None = None, **kwargs
) -> nn.Module:
    """Replace BatchNorm layers of ``model`` with ``norm_layer`` built by :func:`create_norm_layer`.

    Args:
        model: the model; changed in place.
        norm_layer: a registered name, a class or a partial.
        only: names from ``model.named_modules()`` of the BatchNorm layers to replace; all when ``None``.
        kwargs: passed to :func:`create_norm_layer` (after ``num_features``), ``k=`` included.

    Returns:
        The model (the new layer itself when ``model`` is a BatchNorm layer). New layers take the
        device and dtype of the layers they replace and start in the model's training mode.

    Example::

        >>> net = convert_batchnorm(net, "ucb", only=["features.2"], k=3)
    """
    norm_layer_info(norm_layer)  # an unknown layer raises before the model is looked at
    batchnorms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    targets = set(batchnorms) if only is None else set(only)
    missing = targets - set(batchnorms)
    if missing:
        raise ValueError(f"convert_batchnorm: {sorted(missing)} are not BatchNorm layers of the model; "
                         f"its BatchNorm layers are {sorted(batchnorms)}")
    for name in targets:
        old = batchnorms[name]
        new = create_norm_layer(norm_layer, old.num_features, **kwargs)
        reference = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)
        new.train(old.training)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""``torch.nn.SyncBatchNorm`` that also synchronises CPU tensors (gloo).

    PyTorch's ``SyncBatchNorm`` refuses CPU input in distributed training, and DDP refuses it in CPU
    models. On CPU this layer computes the same thing with UCB-Norm's :math:`K = 1` transform, which
    is BatchNorm, and :class:`GlobalSums` (an all-reduce of the per-channel sums about the global
    mean, gradients through it, after one of the plain sums that gives that mean); on other devices it
    runs ``torch.nn.SyncBatchNorm``'s forward;
    without synchronisation it is BatchNorm. Parameters, buffers and ``state_dict`` are
    BatchNorm's. :func:`convert_sync_cbnorm` puts it in place of BatchNorm layers.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``torch.nn.SyncBatchNorm``'s.
        process_group: the group whose ranks share statistics. Default: ``None`` (the default group)

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape as input

    Example::

        >>> bn = cbnorm.distributed.SyncBatchNorm(64)   # as torch.nn.SyncBatchNorm(64), on CPU too
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: Tensor) -> Tensor:
        if input.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, input)
        if not sync_active(True, self.training, self.process_group):
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        tracking = self.track_running_stats and self.running_mean is not None
        channels = input.shape[1]
        count = input.numel() // channels
        # The moments are taken about the global mean (one more small all-reduce, without gradient: the
        # statistics do not depend on the center), so the variance suffers no cancellation.
        local = torch.cat([input.transpose(0, 1).reshape(channels, -1).sum(1, dtype=torch.float64),
                           input.new_full((1,), count, dtype=torch.float64)])
        total = all_reduce_sum(local, self.process_group)
        center = (total[:-1] / total[-1].clamp_min(1)).to(F.compute_dtype(input))
        sums = GlobalSums(count, self.process_group)
        y, stats = F.ucb_norm_batch(input, center.new_ones(1), center[None], center.new_ones(1, channels),
                                    self.weight, self.bias, self.eps, reduce_sums=sums)
        global_count = round(float(sums.count))  # a CPU tensor: reading it costs nothing
        if global_count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, got "
                             f"{global_count} in the global batch (input of shape {tuple(input.shape)} on this rank)")
        if tracking:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(stats.mean[0].to(self.running_mean.dtype), factor)
                unbiased = stats.var[0] * (global_count / (global_count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def _sync_batchnorm(bn: nn.modules.batchnorm._BatchNorm, process_group) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` sharing ``bn``'s parameters and buffers (as ``convert_sync_batchnorm`` does)."""
    sync = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
    if bn.affine:
        with torch.no_grad():
            sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
    sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    if hasattr(bn, "qconfig"):
        sync.qconfig = bn.qconfig
    return sync


def convert_sync_cbnorm(module: nn.Module, process_group=None, *, batchnorm: bool = True) -> nn.Module:
    r"""Make every batch statistic of ``module`` global across ranks, like ``SyncBatchNorm.convert_sync_batchnorm``.

    * :class:`~cbnorm.UCBNorm` and :class:`~cbnorm.MixtureNorm` layers are switched to synchronised
      statistics in place (``sync_statistics = True`` and ``process_group``): same class, same
      parameters and buffers, same ``state_dict``, same training flag; a UCB-Norm with
      ``update="weight"`` synchronises only its first-batch initialisation.
    * With ``batchnorm=True``, ``torch.nn`` BatchNorm layers (not already ``SyncBatchNorm``) are
      replaced by :class:`SyncBatchNorm`, which shares their parameters and buffers and also runs on CPU.
    * Everything else is left alone: SCB-Norm and SCB-Norm-base take no batch statistics.

    Call it before wrapping the model in ``DistributedDataParallel``. Outside distributed training
    (eval, no process group, one rank) converted layers compute exactly what they did before.

    Args:
        module: the model (or a single layer).
        process_group: the group whose ranks share statistics. Default: ``None`` (the default group)
        batchnorm: also convert BatchNorm layers. Default: ``True``

    Returns:
        ``module`` itself, converted, or the :class:`SyncBatchNorm` replacing it if it is a BatchNorm.

    Example::

        >>> model = cbnorm.convert_sync_cbnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    converted = module
    if isinstance(module, _RunningMixtureNorm):
        module.sync_statistics = True
        module.process_group = process_group
    elif batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        converted = _sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_cbnorm(child, process_group, batchnorm=batchnorm))
    return converted
