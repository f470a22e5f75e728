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
with ``update="weight"`` (after its first batch) take no batch statistics and need none. On CUDA no
synchronised step reads a device value on the host, except the first batch's gathering of the ranks'
batch sizes for the k-means start: the global batch size stays on the device (:class:`GlobalSums`)
and is checked there.

Collectives are plain ``torch.distributed`` calls, so any backend with ``all_reduce``,
``all_gather`` and ``broadcast`` works: gloo (CPU, tested) and NCCL (CUDA; not tested here, as the
machine this was written on has no GPU). The layers are not traced by ``torch.compile`` while
synchronised.

This module holds the collectives only. :func:`convert_sync_cbnorm` and :class:`SyncBatchNorm` live in
:mod:`cbnorm.convert` with the rest of model conversion, and stay importable from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:  # imported lazily by __getattr__ below
    from .convert import SyncBatchNorm, convert_sync_cbnorm

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
        count: entries per channel of the global batch, set by the call: a 0-d float64 tensor on the sums'
            device, reduced with them, so that no step waits to read it on the host.

    Example::

        >>> sums = GlobalSums(x.numel() // x.shape[1])
        >>> y, stats = cbnorm.functional.ucb_norm_batch(x, prior, mean, var, reduce_sums=sums)
        >>> stats = stats._replace(count=sums.count)
    """

    def __init__(self, local_count: int, process_group=None) -> None:
        self.local_count = local_count
        self.process_group = process_group
        self.count: Optional[Tensor] = None

    def __call__(self, sums: Tensor) -> Tensor:
        count = sums.new_full((1,), float(self.local_count), dtype=torch.float64)
        packed = _AllReduceSum.apply(torch.cat([sums.reshape(-1).to(torch.float64), count]), self.process_group)
        self.count = packed[-1].detach()
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


def __getattr__(name: str):
    # Model conversion needs the layers, which need this module: imported on first use, not at import.
    if name in ("SyncBatchNorm", "convert_sync_cbnorm"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
