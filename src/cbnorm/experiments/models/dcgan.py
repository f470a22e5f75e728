"""The DCGAN of the CB-Norm paper (IV-D, after the Mixture Normalization paper), for 32 x 32 images.

Generator: a linear layer, then four transposed convolutions; the first three are followed by a
norm layer and LeakyReLU. The paper's variants change the norm layers after the first two
(``norms``): BatchNorm everywhere (DCGAN-BN), MN with K = 3 (DCGAN-MN), UCB-Norm with K = 3
(DCGAN-UCB-Norm). The discriminator mirrors it and keeps BatchNorm in every variant.

===========  ============================================  ===================  ===============
network      layer                                         output (width 64)    norm, activation
===========  ============================================  ===================  ===============
generator    linear z (128) -> 4 x 4 x 8w                  512 x 4 x 4          none
             deconv 4x4, stride 2                          256 x 8 x 8          norms[0], LReLU
             deconv 4x4, stride 2                          128 x 16 x 16        norms[1], LReLU
             deconv 4x4, stride 2                          64 x 32 x 32         norms[2], LReLU
             deconv 3x3, stride 1                          3 x 32 x 32          tanh
discrim.     conv 3x3, stride 1                            64 x 32 x 32         LReLU
             conv 4x4, stride 2                            128 x 16 x 16        BN, LReLU
             conv 4x4, stride 2                            256 x 8 x 8          BN, LReLU
             conv 4x4, stride 2                            512 x 4 x 4          BN, LReLU
             linear 4 x 4 x 512 -> 1                       1 (a logit)
===========  ============================================  ===================  ===============

LeakyReLU slope 0.2 and weights drawn from N(0, 0.02) as in DCGAN (Radford et al., 2016); the
norm layers keep their own initialisation. The sizes follow the standard CNN generator of the
spectral-normalisation GAN paper (Miyato et al., 2018), which the paper's description matches.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from cbnorm.factory import NormLayer, create_norm_layer

__all__ = ["Discriminator", "Generator"]


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """``z (N, latent_dim)`` to images ``(N, channels, size, size)`` in ``[-1, 1]``.

    Args:
        latent_dim: size of ``z``. Default: ``128``
        channels: image channels. Default: ``3``
        width: channels of the last hidden layer (8x, 4x, 2x, 1x along the way). Default: ``64``
        image_size: output size, a multiple of 8. Default: ``32``
        norms: the three norm layers (registry names, classes or partials). Default: BatchNorm
        norm_kwargs: extra arguments of each norm layer, e.g. ``({"num_components": 3}, {...}, {})``

    Example::

        >>> g = Generator(norms=("ucb", "ucb", "batchnorm"), norm_kwargs=({"num_components": 3},) * 2 + ({},))
        >>> g(torch.randn(16, 128)).shape
        torch.Size([16, 3, 32, 32])
    """

    def __init__(
        self,
        latent_dim: int = 128,
        channels: int = 3,
        width: int = 64,
        image_size: int = 32,
        norms: Sequence[NormLayer] = ("batchnorm",) * 3,
        norm_kwargs: Optional[Sequence[dict]] = None,
    ) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"Generator: expected an image_size that is a multiple of 8, got {image_size}")
        if len(norms) != 3:
            raise ValueError(
                f"Generator: expected 3 norm layers (after the first three deconvolutions), got {len(norms)}"
            )
        norm_kwargs = list(norm_kwargs or ({},) * 3)
        self.latent_dim, self.base = latent_dim, image_size // 8
        self.linear = nn.Linear(latent_dim, 8 * width * self.base * self.base)
        widths = [8 * width, 4 * width, 2 * width, width]
        blocks = []
        for i, norm in enumerate(norms):
            blocks += [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1),
                       create_norm_layer(norm, widths[i + 1], **norm_kwargs[i]), nn.LeakyReLU(0.2)]
        blocks += [nn.ConvTranspose2d(width, channels, 3, 1, 1), nn.Tanh()]
        self.deconvs = nn.Sequential(*blocks)
        _init_weights(self)

    @property
    def norms(self) -> list[nn.Module]:
        """The three norm layers, in order."""
        return [self.deconvs[1], self.deconvs[4], self.deconvs[7]]

    def forward(self, z: Tensor) -> Tensor:
        return self.deconvs(self.linear(z).view(len(z), -1, self.base, self.base))


class Discriminator(nn.Module):
    """Images ``(N, channels, size, size)`` to one logit each, ``(N,)``: the generator's mirror, with BatchNorm."""

    def __init__(self, channels: int = 3, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"Discriminator: expected an image_size that is a multiple of 8, got {image_size}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2)]
        for cin, cout in ((width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.convs = nn.Sequential(*layers)
        self.linear = nn.Linear(8 * width * (image_size // 8) ** 2, 1)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x).flatten(1)).squeeze(1)
