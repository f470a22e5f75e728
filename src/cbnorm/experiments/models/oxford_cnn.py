"""OxfordCNN: the plain CNN of the CB-Norm paper's Oxford-IIIT Pet experiment, with the layer under
test just before the final linear layer.

The paper (IV-F2, Table VIII) takes its CNN from M. Garg's "Pet image classification" (ref. [50],
github.com/mayur7garg/PetImageClassification: "image classification using CNN in tf.keras" on the 37
breeds, 64.8% test accuracy from scratch) and adds SCB-Norm, with the superclasses cat and dog as
clusters, "just before the neural network's prediction layer (linear layer)". Neither paper nor
repository lists the layers (the repository's notebook is not available to us), so this is our
reading of "a plain convolutional stack" in the tf.keras style of its time:

==========  =======================================  ===================  ==================
stage       layers                                   32 x 32 input        64 x 64 input
==========  =======================================  ===================  ==================
block 1     conv 3x3 (32) + BN + ReLU, max pool 2    32 x 16 x 16         32 x 32 x 32
block 2     conv 3x3 (64) + BN + ReLU, max pool 2    64 x 8 x 8           64 x 16 x 16
block 3     conv 3x3 (128) + BN + ReLU, max pool 2   128 x 4 x 4          128 x 8 x 8
block 4     conv 3x3 (256) + BN + ReLU, max pool 2   256 x 2 x 2          256 x 4 x 4
dense       global avg pool, linear 256 + ReLU,      256                  256
            dropout 0.5
**norm**    the layer under test (base model: none)  256                  256
classifier  linear                                   classes              classes
==========  =======================================  ===================  ==================

Global average pooling (rather than flattening) makes the same network take CIFAR's 32 x 32 images
and the 64 x 64 Pet images the loader makes.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from cbnorm.factory import NormLayer, create_norm_layer


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class OxfordCNN(nn.Module):
    """The table above, with ``norm_layer`` (registry name, class or partial) on the dense features.

    Args:
        num_classes: outputs of the final linear layer. Default: ``37``
        norm_layer: the layer under test, built for ``width`` features; ``None`` for none (the base
            model). Default: ``None``
        in_channels: image channels. Default: ``3``
        norm_kwargs: passed to ``norm_layer``, e.g. ``{"num_clusters": 2}``.
        channels: output channels of the four conv blocks. Default: ``(32, 64, 128, 256)``
        width: units of the dense layer before the layer under test. Default: ``256``

    Example::

        >>> net = OxfordCNN(37, "scb", norm_kwargs={"num_clusters": 2})
        >>> with cbnorm.cluster_context(species):          # 0 cat, 1 dog
        ...     logits = net(images)                        # (N, 3, 64, 64) -> (N, 37)
    """

    probe_layer = "norm"  # the layer under test's output

    def __init__(
        self,
        num_classes: int = 37,
        norm_layer: Optional[NormLayer] = None,
        in_channels: int = 3,
        norm_kwargs: Optional[dict] = None,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        width: int = 256,
    ) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.features = nn.Sequential(
            *[_block(a, b) for a, b in zip(widths, widths[1:])],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels[-1], width),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        self.norm = nn.Identity() if norm_layer is None else create_norm_layer(norm_layer, width, **(norm_kwargs or {}))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.norm(self.features(x)))
