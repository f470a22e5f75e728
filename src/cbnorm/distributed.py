r"""Batch statistics over the global batch under ``torch.distributed``: the mixture layers' SyncBatchNorm.

Under DDP each rank normalises its own share of the batch. After :func:`convert_sync_cbnorm`, UCB-Norm
(``update="moving_average"``) and Mixture Normalization take every batch statistic over the global
batch instead (SPEC, "Distributed training"), exactly as ``torch.nn.SyncBatchNorm`` does for
BatchNorm:

* the per-rank sums :math:`S_{r,k,c} = \sum_{j \in B_c} \tau_k(x_j)(x_j - \mu_{k,c})^r`, ``r = 0, 1, 2``
  (with the number of entries per channel) are all-reduced before any statistic is formed, through
  the ``reduce_sums`` seam of :func:`cbnorm.functional.ucb_norm_batch`, and gradients flow back
  through the reduction (its backward all-reduces the incoming gradient, so each rank's input gets
  the gradient of the sum of every rank's loss, as SyncBatchNorm's does);
* MixtureNorm's EM steps all-reduce their sums too, so its fit is that of the global batch;
* the first training batch's k-means++ start (UCB-Norm in both modes, MixtureNorm) is computed from
  the global batch's entries and rank 0's result is broadcast, so every rank holds the same state.

The result on ``P`` ranks with batches ``N_1 + ... + N_P = N`` equals one process with the ``N``
samples in rank order, up to float rounding, whatever the split: uneven batches and empty ones
(``N_p = 0``) included. A rank with an empty batch still takes part in every collective, so it neither
hangs nor changes the statistics. The running state stays identical on every rank.

Synchronisation is active only in training, with an initialised process group of more than one
rank; otherwise the layers run their single-process path. SCB-Norm, SCB-Norm-base and UCB-Norm
with ``update="weight"`` (after its first batch) take no batch statistics and need none.

Collectives are plain ``torch.distributed`` calls, so any backend with ``all_reduce``,
``all_gather`` and ``broadcast`` works: gloo (CPU, tested) and NCCL (CUDA; not tested here, as the
machine this was written on has no GPU). The layers are not traced by ``torch.compile`` while
synchronised.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F

__all__ = [
    "ChannelSamples",
    "GlobalSums",
    "SyncBatchNorm",
    "all_reduce_sum",
    "broadcast_from_first_rank",
    "convert_sync_cbnorm",
    "gather_channel_samples",
    "sync_active",
    "world_size",
]


def _group(process_group):
    return dist.group.WORLD if process_group is None else process_group


def sync_active(enabled: bool, training: bool, process_group=None) -> bool:
    """Whether a layer synchronises: ``enabled``, in training, with an initialised group of more than one rank."""
    return bool(enabled and training and world_size(process_group) > 1)


def world_size(process_group=None) -> int:
    """Ranks in the group (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_group(process_group))


def _first_rank(process_group) -> int:
    """The global rank of the group's rank 0 (the source of broadcasts)."""
    return 0 if process_group is None else dist.get_global_rank(process_group, 0)


class GlobalSums:
    r"""The ``reduce_sums`` of :func:`cbnorm.functional.ucb_norm_batch` that makes every statistic global.

    Called with this rank's ``(3, K, C)`` sums, it all-reduces them (in float64) together with the
    number of entries per channel, differentiably: its
    backward all-reduces the incoming gradient, so gradients flow through the reduction as in
    ``torch.nn.SyncBatchNorm``. Every rank must call it, in the same order as the other collectives.

    Args:
        local_count: entries per channel in this rank's batch, :math:`N L` for input ``(N, C, L)``.
        process_group: the group to reduce over. Default: ``None`` (the default group)

    Attributes:
        count: entries per channel of the global batch, set by the call.

    Example::

        >>> sums = GlobalSums(x.numel() // x.shape[1])
        >>> y, stats = cbnorm.functional.ucb_norm_batch(x, prior, mean, var, reduce_sums=sums)
        >>> stats = stats._replace(count=sums.count)
    """

    def __init__(self, local_count: int, process_group=None) -> None:
        self.local_count = local_count
        self.process_group = process_group
        self.count: Optional[int] = None

    def __call__(self, sums: Tensor) -> Tensor:
        count = sums.new_full((1,), float(self.local_count), dtype=torch.float64)
        packed = _AllReduceSum.apply(torch.cat([sums.reshape(-1).to(torch.float64), count]), self.process_group)
        self.count = round(packed[-1].item())
        return packed[:-1].to(sums.dtype).view_as(sums)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; backward sums the incoming gradients over the ranks, as SyncBatchNorm's does.

    (``torch.distributed.nn.functional.all_reduce`` computes the same and is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        return all_reduce_sum(tensor, process_group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_sum(grad, ctx.process_group), None


@torch.no_grad()
def all_reduce_sum(tensor: Tensor, process_group=None) -> Tensor:
    """Sum of ``tensor`` over the group's ranks (a new tensor, no gradient): MixtureNorm's EM sums."""
    total = tensor.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=_group(process_group))
    return total


@torch.no_grad()
def broadcast_from_first_rank(tensors: Sequence[Tensor], process_group=None) -> list[Tensor]:
    """The group's rank-0 values of ``tensors`` (same shapes and dtype on every rank), in one broadcast."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=_first_rank(process_group), group=_group(process_group))
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class ChannelSamples(NamedTuple):
    """What :func:`gather_channel_samples` returns: the samples ``(C, M)`` (``None`` if not ``finite``),
    the global number of entries per channel, and whether every rank's entries were finite."""

    samples: Optional[Tensor]
    count: int
    finite: bool


@torch.no_grad()
def gather_channel_samples(rows: Tensor, max_per_channel: Optional[int] = None, process_group=None) -> ChannelSamples:
    r"""The global batch's entries of each channel, as :func:`cbnorm.mixture.channel_samples` takes them.

    ``rows`` ``(C, M_p)`` are this rank's entries (``channel_samples(x)``); the global batch is the
    ranks' batches concatenated in rank order. With more than ``max_per_channel`` entries in all, the
    same random subset is taken on every rank, drawn on rank 0 exactly as ``channel_samples`` draws it
    (``torch.randperm`` from the global generator), so a process holding the whole batch with the same
    generator state gets the same samples. Each rank contributes its own entries of the subset and
    one all-reduce assembles them: the traffic is ``C x min(M, max_per_channel)`` values.

    Every rank must call it (an empty batch included). If any rank's entries are not finite, all ranks
    get ``finite=False`` and no samples, so they can raise together.

    Args:
        rows: this rank's entries ``(C, M_p)``, the same dtype and ``C`` on every rank.
        max_per_channel: subsample to at most this many entries per channel. Default: ``None`` (all)
        process_group: the group. Default: ``None`` (the default group)

    Returns:
        :class:`ChannelSamples`; ``samples`` is ``(C, min(M, max_per_channel))``, identical on every rank.
    """
    group = _group(process_group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.tensor([rows.shape[1], float(bool(torch.isfinite(rows).all()))], dtype=torch.float64,
                         device=rows.device)
    everyone = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(everyone, local, group=group)
    counts = [int(t[0]) for t in everyone]
    total = sum(counts)
    if not all(bool(t[1]) for t in everyone):
        return ChannelSamples(None, total, False)
    if max_per_channel is not None and total > max_per_channel:
        keep = torch.randperm(total, device=rows.device)[:max_per_channel]
        dist.broadcast(keep, src=_first_rank(process_group), group=group)
    else:
        keep = torch.arange(total, device=rows.device)
    position = keep - sum(counts[:rank])
    mine = (position >= 0) & (position < rows.shape[1])
    samples = rows.new_zeros(rows.shape[0], keep.numel())
    samples[:, mine] = rows[:, position[mine]]
    dist.all_reduce(samples, group=group)  # each entry comes from exactly one rank; the others add zeros
    return ChannelSamples(samples, total, True)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""``torch.nn.SyncBatchNorm`` that also synchronises CPU tensors (gloo).

    PyTorch's ``SyncBatchNorm`` refuses CPU input in distributed training, and DDP refuses it in CPU
    models. On CPU this layer computes the same thing with UCB-Norm's :math:`K = 1` transform, which
    is BatchNorm, and :class:`GlobalSums` (an all-reduce of the per-channel sums about the global
    mean, gradients through it, after one of the plain sums that gives that mean); on other devices it runs ``torch.nn.SyncBatchNorm``'s forward;
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

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
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
        if sums.count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, got "
                             f"{sums.count} in the global batch (input of shape {tuple(input.shape)} on this rank)")
        if tracking:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / int(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(stats.mean[0].to(self.running_mean.dtype), factor)
                unbiased = stats.var[0] * (sums.count / (sums.count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def _sync_batchnorm(bn: nn.modules.batchnorm._BatchNorm, process_group) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` sharing ``bn``'s parameters and buffers (as ``convert_sync_batchnorm`` does)."""
    sync = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
    if bn.affine:
        with torch.no_grad():
            sync.weight, sync.bias = bn.weight, bn.bias
    sync.running_mean, sync.running_var, sync.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
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
    from .layers import _RunningMixtureNorm

    converted = module
    if isinstance(module, _RunningMixtureNorm):
        module.sync_statistics = True
        module.process_group = process_group
    elif batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        converted = _sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_cbnorm(child, process_group, batchnorm=batchnorm))
    return converted
