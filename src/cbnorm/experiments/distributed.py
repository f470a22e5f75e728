"""The process group of ``cbnorm train`` under ``torchrun``: ranks, the DDP model, sums over ranks.

    torchrun --nproc_per_node=2 -m cbnorm train --dataset cifar10 --norm ucb --batch-size 256 --out runs/ucb

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`join` opens the process group
from them (NCCL on CUDA, gloo on CPU). ``--batch-size`` stays the global batch: each of the ``P``
ranks trains on its ``1/P`` share (:class:`~cbnorm.experiments.data.Loader`), every batch statistic
is taken over the global batch (:func:`cbnorm.convert_sync_cbnorm`), and the loss is scaled so that
DDP's averaged gradient is that of the global batch's mean loss. A run on ``P`` processes therefore
computes what one process computes with the same ``--batch-size``, up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

import cbnorm

__all__ = ["Ranks", "all_reduce_sum", "gather_objects", "join", "leave", "main_first", "wrap_model"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (``0`` of ``1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    opened_group: bool = False  # whether :func:`join` opened the process group (and :func:`leave` closes it)

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join(device: torch.device) -> Ranks:
    """The ranks ``torchrun`` describes in the environment, with the process group opened if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Ranks()
    opened = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        opened = True
    return Ranks(dist.get_rank(), dist.get_world_size(), opened)


def leave(ranks: Ranks) -> None:
    if ranks.opened_group:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block first (it may write caches), then the other ranks (they may read them)."""
    if ranks.distributed and not ranks.is_main:
        dist.barrier()
    yield
    if ranks.distributed and ranks.is_main:
        dist.barrier()


def wrap_model(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` for training: with global batch statistics and in DDP when distributed, else itself."""
    if not ranks.distributed:
        return model
    model = cbnorm.convert_sync_cbnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum(*tensors: Tensor) -> list[Tensor]:
    """Each tensor summed over the ranks (one collective; unchanged without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors)
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))  # NCCL: the GPU
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t).to(t.device, t.dtype) for piece, t in zip(pieces, tensors)]


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    values = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values
