"""Mini-batches assembled on the training device: the data set, its epoch order and its augmentation
draws all live there, so a training step never waits on the host.

    >>> loader = DeviceLoader(split, 256, mean, std, train=True, flip=True, crop_padding=4, seed=0, device="cuda")
    >>> for images, labels, ids in loader.epoch(3): ...    # the batches Loader(...).epoch(3) gives, bitwise

:class:`~cbnorm.experiments.data.Loader` draws the order of an epoch and each batch's crop offsets and
flips from one generator keyed on ``(seed, epoch)``, one batch at a time. :class:`DeviceLoader` makes
the same draws, in the same order, all at the start of the epoch, moves them to the device in one
copy, and then cuts each batch out of them with device operations only (an index, a gather for the
crop, a ``where`` for the flip, the normalisation). The images, labels, cluster ids and every
random choice are the ones the :class:`Loader` makes, so a run resumed at epoch ``e`` redraws
exactly the epoch it lost, whichever of the two loaders ran before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from .data import Loader, Split, _epoch_generator, crop_flip

__all__ = ["DeviceLoader", "EpochDraws", "images_on"]


def images_on(split: Split, device: torch.device) -> Split:
    """``split`` with its images on ``device`` and its labels where they were: a loop that indexes the
    images there gets its batches, and augments them, on the device (AdaMatch's weak and strong
    augmentations run wherever their images are, with the same draws)."""
    return Split(split.images.to(device), split.labels, split.coarse_labels)


@dataclass
class EpochDraws:
    """Every random choice of one training epoch, by position in the epoch: sample ``order[j]`` comes
    ``j``-th and is cropped at ``(dy[j], dx[j])`` and mirrored where ``mirror[j]`` (``None``: not drawn)."""

    order: Tensor
    dy: Optional[Tensor] = None
    dx: Optional[Tensor] = None
    mirror: Optional[Tensor] = None

    def augment(self, images: Tensor, positions: slice, padding: int) -> Tensor:
        """Crop and flip ``images``, the samples at ``positions`` of the epoch, as drawn."""
        def at(draws: Optional[Tensor]) -> Optional[Tensor]:
            return None if draws is None else draws[positions]

        return crop_flip(images, padding, at(self.dy), at(self.dx), at(self.mirror))


class DeviceLoader(Loader):
    """:class:`~cbnorm.experiments.data.Loader` with the same batches, made without host round trips.

    Args (beyond :class:`Loader`'s):
        memory_format: of the normalised batches, e.g. ``torch.channels_last`` for convolutions on CUDA.
    """

    def __init__(self, *args, memory_format: torch.memory_format = torch.contiguous_format, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.memory_format = memory_format

    def draws(self, epoch: int) -> EpochDraws:
        """The draws of training epoch ``epoch``, made in :class:`Loader`'s order, on the device."""
        generator = _epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.labels), generator=generator)
        offsets, mirror = [], []
        for size in self.global_batch_sizes:  # the loader draws per global batch: crop offsets, then flips
            if self.crop_padding:
                offsets.append(torch.randint(0, 2 * self.crop_padding + 1, (2, size, 1), generator=generator)[..., 0])
            if self.flip:
                mirror.append(torch.rand(size, generator=generator) < 0.5)
        rows = [order]
        if offsets:
            rows += list(torch.cat(offsets, 1))  # dy, dx
        if mirror:
            rows.append(torch.cat(mirror).long())
        moved = torch.stack(rows).to(self.device, non_blocking=True)  # one copy per epoch
        dy, dx = moved[1:3] if offsets else (None, None)
        return EpochDraws(moved[0], dy, dx, moved[-1].bool() if mirror else None)

    def _share(self, batch: int, size: int) -> slice:
        """This rank's positions in global batch ``batch`` of ``size``: ``tensor_split``'s contiguous share."""
        base, extra = divmod(size, self.world_size)
        start = batch * self.batch_size + self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def epoch(self, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor, Optional[Tensor]]]:
        draws = self.draws(epoch) if self.train else None
        for batch, size in enumerate(self.global_batch_sizes):
            mine = self._share(batch, size)
            index = draws.order[mine] if self.train else mine
            images = self.images[index]
            if self.train:
                images = draws.augment(images, mine, self.crop_padding)
            images = ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yield images, self.labels[index], None if self.cluster_ids is None else self.cluster_ids[index]

    __iter__ = epoch
