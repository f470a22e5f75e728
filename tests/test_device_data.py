import pytest
import torch

from cbnorm.experiments.data import Loader, Split
from cbnorm.experiments.device_data import DeviceLoader

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = (torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.3, 0.2, 0.25]))


def _split(n: int = 23, side: int = 12) -> Split:
    """Random images whose first channel is their label's code, ``40 + 10 * label``, everywhere."""
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(2))
    images[:, 0] = (40 + 10 * labels).to(torch.uint8).view(-1, 1, 1)
    return Split(images, labels)


def _batches(loader, epoch):
    return [(x, y, ids) for x, y, ids in loader.epoch(epoch)]


class TestDeviceLoader:
    @pytest.mark.parametrize("flip, padding", [(True, 4), (True, 0), (False, 2), (False, 0)])
    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 3), (2, 3)])
    def test_same_batches_as_the_loader_bitwise(self, flip, padding, train, rank, world_size):
        kwargs = dict(train=train, flip=flip, crop_padding=padding, cluster_ids=torch.arange(23) % 3, seed=5,
                      rank=rank, world_size=world_size)
        for epoch in (1, 2):
            expected = _batches(Loader(_split(), 8, *STATS, **kwargs), epoch)
            got = _batches(DeviceLoader(_split(), 8, *STATS, **kwargs), epoch)
            assert len(got) == len(expected) == 3
            for (x, y, ids), (x0, y0, ids0) in zip(got, expected):
                assert x.dtype == x0.dtype and torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(ids, ids0)

    def test_epochs_differ_and_repeat(self):
        loader = DeviceLoader(_split(), 8, *STATS, train=True, flip=True, crop_padding=4, seed=0)
        first, again, second = (torch.cat([x for x, _, _ in loader.epoch(e)]) for e in (1, 1, 2))
        assert torch.equal(first, again) and not torch.equal(first, second)

    def test_labels_stay_with_their_images(self):
        split = _split(64)
        loader = DeviceLoader(split, 16, torch.zeros(3), torch.full((3,), 1 / 255), train=True, flip=True,
                              crop_padding=4, seed=3)
        seen = []
        for images, labels, _ in loader.epoch(1):
            centre = images[:, 0, 4:8, 4:8]  # inside the image under every crop of padding 4
            assert torch.equal(centre, (40 + 10 * labels).float().view(-1, 1, 1).expand_as(centre))
            seen.append(labels)
        assert sorted(torch.cat(seen).tolist()) == sorted(split.labels.tolist())  # each image once

    def test_crops_and_flips_are_of_the_image_itself(self):
        split = _split(16)
        images, labels, _ = next(DeviceLoader(split, 16, torch.zeros(3), torch.full((3,), 1 / 255), train=True,
                                              flip=True, crop_padding=2, seed=0).epoch(1))
        order = DeviceLoader(split, 16, *STATS, train=True, flip=True, crop_padding=2, seed=0).draws(1).order
        for image, i in zip(images, order):
            padded = torch.nn.functional.pad(split.images[i].float(), (2,) * 4)
            windows = [padded[:, dy:dy + 12, dx:dx + 12] for dy in range(5) for dx in range(5)]
            assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)
        assert torch.equal(labels, split.labels[order])

    def test_channels_last_batches(self):
        x, _, _ = next(DeviceLoader(_split(), 8, *STATS, memory_format=torch.channels_last).epoch())
        x0, _, _ = next(Loader(_split(), 8, *STATS).epoch())
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, x0)
