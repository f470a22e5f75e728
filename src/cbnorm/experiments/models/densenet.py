"""DenseNet-BC (Huang et al., 2017) for small images, with the layer under test as the initial layer.

The CB-Norm paper (IV-C) trains DenseNet-40 and DenseNet-100 (growth rate 12, three dense blocks,
two transitions) and adds MN, SCB-Norm-base, SCB-Norm or UCB-Norm in front of the first
convolution, "as the initial layer", so that cluster information normalises the image itself; its
BN model is the plain network. ``depth = 6n + 4``: each block holds ``n`` bottleneck layers.

==============  ==================================================  =======================
stage           layers                                              BC-40 / BC-100 output
==============  ==================================================  =======================
initial norm    the layer under test, on the image (BN model: none) 3 x 32 x 32
stem            conv 3x3, 2k channels                               24 x 32 x 32
dense block 1   n x [BN-ReLU-conv 1x1 (4k), BN-ReLU-conv 3x3 (k)]   96 / 216 x 32 x 32
transition 1    BN-ReLU-conv 1x1 (compression 0.5), avg pool 2x2    48 / 108 x 16 x 16
dense block 2   n bottleneck layers                                 120 / 300 x 16 x 16
transition 2    as transition 1                                     60 / 150 x 8 x 8
dense block 3   n bottleneck layers                                 132 / 342 x 8 x 8
head            BN-ReLU, global avg pool, linear                    classes
==============  ==================================================  =======================
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cbnorm.factory import NormLayer, create_norm_layer


def _norm_relu_conv(in_channels: int, out_channels: int, kernel: int, block_norm: NormLayer) -> list[nn.Module]:
    return [
        create_norm_layer(block_norm, in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
    ]


class Bottleneck(nn.Module):
    """BN-ReLU-conv 1x1 (4k) then BN-ReLU-conv 3x3 (k); the k new maps are concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, block_norm: NormLayer) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *_norm_relu_conv(in_channels, 4 * growth_rate, 1, block_norm),
            *_norm_relu_conv(4 * growth_rate, growth_rate, 3, block_norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], 1)


class DenseNet(nn.Module):
    """DenseNet-BC of ``depth`` layers with ``norm_layer`` (registry name, class or partial) applied to the image.

    Args:
        depth: ``6n + 4``; 40 and 100 are the paper's. Default: ``40``
        num_classes: outputs of the final linear layer. Default: ``100``
        norm_layer: the initial layer under test, built for ``in_channels``; ``None`` (the BN
            model) for none. Default: ``None``
        in_channels: image channels. Default: ``3``
        norm_kwargs: passed to ``norm_layer``, e.g. ``{"num_clusters": 5}``.
        growth_rate: ``k``, maps added by each bottleneck layer. Default: ``12``
        compression: channel factor of the transitions. Default: ``0.5``
        block_norm: the norm layer inside the network. Default: ``"batchnorm"``

    Example::

        >>> net = DenseNet(100, num_classes=100, norm_layer="ucb", norm_kwargs={"num_components": 5})
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    probe_layer = "norm"  # the initial layer's output

    def __init__(
        self,
        depth: int = 40,
        num_classes: int = 100,
        norm_layer: Optional[NormLayer] = None,
        in_channels: int = 3,
        norm_kwargs: Optional[dict] = None,
        growth_rate: int = 12,
        compression: float = 0.5,
        block_norm: NormLayer = "batchnorm",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC: expected depth = 6n + 4 with n >= 1 (40, 100, ...), got {depth}")
        per_block = (depth - 4) // 6
        self.norm = (
            nn.Identity() if norm_layer is None else create_norm_layer(norm_layer, in_channels, **(norm_kwargs or {}))
        )
        channels = 2 * growth_rate
        stages: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(per_block):
                stages.append(Bottleneck(channels, growth_rate, block_norm))
                channels += growth_rate
            if block < 2:
                out = int(channels * compression)
                stages += [nn.Sequential(*_norm_relu_conv(channels, out, 1, block_norm), nn.AvgPool2d(2))]
                channels = out
        stages += [create_norm_layer(block_norm, channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.norm(x)).flatten(1))
