"""The shallow CNN of the Mixture Normalization paper (CB-Norm paper, Table IV).

==========  =====================  ==============  ===========================
layer       type                   output          kernel (stride, pad)
==========  =====================  ==============  ===========================
conv1       conv + BN + ReLU       64 x 32 x 32    5 x 5 (1, 2)
pool1       max pool               64 x 16 x 16    3 x 3 (2, 0)
conv2       conv + BN + ReLU       128 x 16 x 16   5 x 5 (1, 2)
pool2       max pool               128 x 8 x 8     3 x 3 (2, 0)
conv3       conv + **norm** + ReLU 128 x 8 x 8     5 x 5 (1, 2)
pool3       max pool               128 x 4 x 4     3 x 3 (2, 0)
conv4       conv + BN + ReLU       256 x 4 x 4     3 x 3 (1, 1)
pool4       avg pool               256 x 1 x 1     global (Table IV: 4 x 4)
linear      linear                 classes
==========  =====================  ==============  ===========================

The paper replaces the third BatchNorm (conv3's) with the layer under test. The pools round up
(Caffe's convention), which is what turns 32 into 16, 8 and 4 as the table says. pool4 averages
over whatever is left, which is Table IV's 4 x 4 pool for 32 x 32 input and lets the same network
take 64 x 64 Tiny ImageNet (the paper's third data set), 28 x 28 MNIST or 8 x 8 digits.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from cbnorm.factory import NormLayer, create_norm_layer


def _block(in_channels: int, out_channels: int, kernel: int, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), norm, nn.ReLU(inplace=True)
    )


class ShallowCNN(nn.Module):
    """Table IV's network with ``norm_layer`` (a registry name, class or partial) at conv3.

    Args:
        num_classes: outputs of the final linear layer. Default: ``10``
        norm_layer: the norm layer under test, built for 128 channels; ``None`` for none. Default: ``"batchnorm"``
        in_channels: image channels. Default: ``3``
        norm_kwargs: passed to ``norm_layer``, e.g. ``{"num_components": 3}``.

    Example::

        >>> net = ShallowCNN(10, "ucb", norm_kwargs={"num_components": 3})
        >>> net(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 10])
    """

    probe_layer = "features.2.1"  # conv2's BatchNorm: the activations of the paper's Figure 2

    def __init__(
        self,
        num_classes: int = 10,
        norm_layer: Optional[NormLayer] = "batchnorm",
        in_channels: int = 3,
        norm_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True)  # noqa: E731
        norm = nn.Identity() if norm_layer is None else create_norm_layer(norm_layer, 128, **(norm_kwargs or {}))
        self.features = nn.Sequential(
            _block(in_channels, 64, 5, nn.BatchNorm2d(64)),
            pool(),
            _block(64, 128, 5, nn.BatchNorm2d(128)),
            pool(),
            _block(128, 128, 5, norm),
            pool(),
            _block(128, 256, 3, nn.BatchNorm2d(256)),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(256, num_classes)

    @property
    def norm(self) -> nn.Module:
        """The layer under test (conv3's norm)."""
        return self.features[4][1]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
