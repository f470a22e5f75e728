"""WideResNet-28-2 as AdaMatch and FixMatch use it, with the layer under test as the initial layer (IV-E).

The CB-Norm paper puts SCB-Norm, SCB-Norm-base or UCB-Norm "as the initial layer" of AdaMatch's
WideResNet, in front of the first convolution, so that the domain (source or target) normalises
the image itself; its baseline is the plain network (BatchNorm inside, nothing in front).
``depth = 6n + 4``: each group holds ``n`` pre-activation blocks.

==============  ======================================================  =====================
stage           layers                                                  WRN-28-2 output
==============  ======================================================  =====================
initial norm    the layer under test, on the image (baseline: none)     3 x 32 x 32
stem            conv 3x3, 16                                            16 x 32 x 32
group 1         n x [BN-LReLU-conv 3x3, BN-LReLU-conv 3x3] + shortcut   32 x 32 x 32
group 2         the same, first block stride 2                          64 x 16 x 16
group 3         the same, first block stride 2                          128 x 8 x 8
head            BN-LReLU, global average pool, linear                   classes
==============  ======================================================  =====================

As in AdaMatch's reference code (``shared/zoo/wideresnet.py``): LeakyReLU slope 0.1; a 1 x 1
convolution on the shortcut where the width changes; the first block of group 1 adds its
activated input to the residual ("activate before residual"), the others the raw input;
convolutions drawn from N(0, 2 / (k^2 out)), the classifier Xavier-initialised. BatchNorm momentum
0.01 (Keras' default 0.99, which the paper's Keras reference used; AdaMatch's own 0.001 would
leave the running statistics far from the data in short runs).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from cbnorm.factory import NormLayer, create_norm_layer

__all__ = ["WideResNet"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool, momentum: float, slope: float):
        super().__init__()
        self.activate_before_residual, self.slope = activate_before_residual, slope
        self.bn1 = nn.BatchNorm2d(cin, momentum=momentum)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.leaky_relu(self.bn1(x), self.slope)
        if self.activate_before_residual:
            x = y
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + self.conv2(nn.functional.leaky_relu(self.bn2(self.conv1(y)), self.slope))


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` with ``norm_layer`` (registry name, class or partial) applied to the image.

    Args:
        depth: ``6n + 4``; 28 is AdaMatch's. Default: ``28``
        width: widening factor. Default: ``2``
        num_classes: outputs. Default: ``10``
        in_channels: image channels. Default: ``3``
        norm_layer: the initial layer under test, built for ``in_channels``; ``None`` for none. Default: ``None``
        norm_kwargs: passed to ``norm_layer``, e.g. ``{"num_clusters": 2}``.
        bn_momentum: momentum of the BatchNorm layers inside. Default: ``0.01``

    Example::

        >>> net = WideResNet(norm_layer="scb", norm_kwargs={"num_clusters": 2})
        >>> with cbnorm.cluster_context(torch.zeros(8, dtype=torch.long)):
        ...     net(torch.rand(8, 3, 32, 32)).shape
        torch.Size([8, 10])
    """

    probe_layer = "norm"

    def __init__(
        self,
        depth: int = 28,
        width: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        norm_layer: Optional[NormLayer] = None,
        norm_kwargs: Optional[dict] = None,
        bn_momentum: float = 0.01,
        slope: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: expected depth = 6n + 4 with n >= 1 (28, ...), got {depth}")
        per_group = (depth - 4) // 6
        self.slope = slope
        self.norm = (
            nn.Identity() if norm_layer is None else create_norm_layer(norm_layer, in_channels, **(norm_kwargs or {}))
        )
        channels = 16
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)]
        for group, out in enumerate((16 * width, 32 * width, 64 * width)):
            for i in range(per_group):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(_Block(channels, out, stride, group == 0 and i == 0, bn_momentum, slope))
                channels = out
        self.features = nn.Sequential(*blocks)
        self.head_norm = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, (2.0 / (module.kernel_size[0] ** 2 * module.out_channels)) ** 0.5)
        nn.init.xavier_normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.norm(x))
        x = nn.functional.leaky_relu(self.head_norm(x), self.slope)
        return self.classifier(x.mean((2, 3)))
