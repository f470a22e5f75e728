"""A small Vision Transformer for 32 x 32 images, with the layer under test as its initial layer.

The CB-Norm paper (IV-F1, Table VII) trains the ViT of the Keras example "Image classification with
Vision Transformer" (K. Salama, 2021; the paper's ref. [49]) on CIFAR-100 and puts BN, SCB-Norm-base
or SCB-Norm in front of it, on the image, with CIFAR-100's 20 superclasses as SCB's clusters. This
file is that network in PyTorch, its hyperparameters in :class:`ViTConfig`:

==========================  ==============================  ===============================
                            the Keras example               ``ViTConfig()`` (ours)
==========================  ==============================  ===============================
input                       32 x 32, resized to 72 x 72     32 x 32 as it is
patches                     6 x 6: 12 x 12 = 144 patches    4 x 4: 8 x 8 = 64 patches
projection dim D            64                              64
attention                   4 heads, key dim 64 each        4 heads, key dim 64 each
transformer layers          8                               8
transformer MLP units       128, 64 (GELU, dropout 0.1)     128, 64 (GELU, dropout 0.1)
MLP head units              2048, 1024 (GELU, dropout 0.5)  2048, 1024 (GELU, dropout 0.5)
parameters, 100 classes     21.8 M                          11.3 M (11.2 M for 10 classes)
==========================  ==============================  ===============================

The one difference is the patch grid: the example upsamples CIFAR's 32 x 32 images to 72 x 72,
which adds no information but 2.25 times the tokens (and a 9216-wide head input); ours cuts the
32 x 32 image into 4 x 4 patches. ``ViTConfig.keras()`` is the example's configuration exactly
(bilinear resize to 72 inside the model, after the initial layer), for ``ViT(config=...)``.

Architecture (pre-norm transformer, no class token, as in the example)::

    initial layer   the layer under test on the image (N, C, H, W): BN, SCB-Norm-base, SCB-Norm; none
    patches         non-overlapping p x p patches, each flattened (row, column, channel) to p*p*C
    embedding       linear p*p*C -> D, plus a learned position embedding per patch
    8 x block       x = x + MHA(LN(x));  x = x + MLP(LN(x))          (LN eps 1e-6, as Keras's)
    head            LN, flatten (patches * D), dropout 0.5, MLP 2048-1024 (GELU, dropout 0.5), linear

The example's "key dim" is per head (Keras's ``MultiHeadAttention(num_heads=4, key_dim=64)``):
queries, keys and values are 4 x 64 wide and projected back to D = 64. Every dense layer of the
two MLPs, the last included, is followed by GELU (exact, not tanh) and dropout, as the example's
``mlp()`` does. Initialisation follows Keras: Glorot-uniform weights, zero biases, position
embeddings uniform in [-0.05, 0.05].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cbnorm.factory import NormLayer, create_norm_layer


@dataclass(frozen=True)
class ViTConfig:
    """The network's hyperparameters; ``ViTConfig()`` is ours, ``ViTConfig.keras()`` the Keras example's."""

    image_size: int = 32  # input height and width
    resize: int = 0  # resize the (normalised) image to resize x resize before patching; 0: no resize
    patch_size: int = 4
    dim: int = 64  # projection dim D
    heads: int = 4
    key_dim: int = 64  # per head
    layers: int = 8
    mlp_units: tuple[int, ...] = (128, 64)  # the transformer block's MLP; the last must be D
    head_units: tuple[int, ...] = (2048, 1024)
    dropout: float = 0.1  # attention probabilities and transformer MLPs
    head_dropout: float = 0.5
    ln_eps: float = 1e-6

    @classmethod
    def keras(cls) -> "ViTConfig":
        """The Keras example's configuration: CIFAR images resized to 72 x 72, 6 x 6 patches."""
        return cls(resize=72, patch_size=6)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return (self.resize or self.image_size) // self.patch_size

    def __post_init__(self) -> None:
        side = self.resize or self.image_size
        if side % self.patch_size:
            raise ValueError(
                f"ViTConfig: expected the patch size to divide the image side {side}, got {self.patch_size}"
            )
        if self.mlp_units[-1] != self.dim:
            raise ValueError(f"ViTConfig: expected the last MLP unit count to be dim={self.dim} (a residual), "
                             f"got {self.mlp_units}")


def _mlp(width: int, units: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Keras example's ``mlp()``: every dense layer followed by GELU and dropout."""
    layers = []
    for out in units:
        layers += [nn.Linear(width, out), nn.GELU(), nn.Dropout(dropout)]
        width = out
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of ``key_dim`` each (Keras's ``key_dim``)."""

    def __init__(self, dim: int, heads: int, key_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.key_dim, self.dropout = heads, key_dim, dropout
        self.qkv = nn.Linear(dim, 3 * heads * key_dim)
        self.out = nn.Linear(heads * key_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.key_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.heads * self.key_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim, eps=config.ln_eps)
        self.attention = Attention(config.dim, config.heads, config.key_dim, config.dropout)
        self.ln2 = nn.LayerNorm(config.dim, eps=config.ln_eps)
        self.mlp = _mlp(config.dim, config.mlp_units, config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """The Keras example's ViT with ``norm_layer`` (registry name, class or partial) applied to the image.

    Args:
        num_classes: outputs of the final linear layer. Default: ``100``
        norm_layer: the initial layer under test, built for ``in_channels``; ``None`` for none (the
            Keras model). Default: ``None``
        in_channels: image channels. Default: ``3``
        norm_kwargs: passed to ``norm_layer``, e.g. ``{"num_clusters": 20}``.
        config: the hyperparameters. Default: ``ViTConfig()``

    Example::

        >>> net = ViT(100, "scb", norm_kwargs={"num_clusters": 20})
        >>> with cbnorm.cluster_context(superclasses):   # (N,) ids in [0, 20)
        ...     logits = net(images)                      # (N, 3, 32, 32) -> (N, 100)
    """

    probe_layer = "norm"  # the initial layer's output

    def __init__(
        self,
        num_classes: int = 100,
        norm_layer: Optional[NormLayer] = None,
        in_channels: int = 3,
        norm_kwargs: Optional[dict] = None,
        config: Optional[ViTConfig] = None,
    ) -> None:
        super().__init__()
        self.config = config = config or ViTConfig()
        self.norm = (
            nn.Identity() if norm_layer is None else create_norm_layer(norm_layer, in_channels, **(norm_kwargs or {}))
        )
        patches = config.grid ** 2
        self.embed = nn.Linear(config.patch_size ** 2 * in_channels, config.dim)
        self.position = nn.Parameter(torch.empty(patches, config.dim))
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.layers)])
        self.head = nn.Sequential(
            nn.LayerNorm(config.dim, eps=config.ln_eps),
            nn.Flatten(),
            nn.Dropout(config.head_dropout),
            _mlp(patches * config.dim, config.head_units, config.head_dropout),
        )
        self.classifier = nn.Linear(config.head_units[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras's defaults: Glorot-uniform dense kernels (queries, keys and values each on its own), zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention):
                with torch.no_grad():
                    for weight in module.qkv.weight.chunk(3):
                        nn.init.xavier_uniform_(weight)
        nn.init.uniform_(self.position, -0.05, 0.05)

    def patches(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, patches, p*p*C)``, patches row by row, each flattened (row, column, channel)."""
        batch, channels, height, width = x.shape
        p = self.config.patch_size
        x = x.view(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(batch, (height // p) * (width // p), p * p * channels)

    def forward(self, x: Tensor) -> Tensor:
        size = self.config.image_size
        if x.dim() != 4 or x.shape[-2:] != (size, size):
            raise ValueError(f"ViT: expected images (N, C, {size}, {size}), got shape {tuple(x.shape)}")
        x = self.norm(x)
        if self.config.resize:
            x = F.interpolate(x, size=(self.config.resize,) * 2, mode="bilinear", align_corners=False)
        x = self.embed(self.patches(x)) + self.position
        return self.classifier(self.head(self.blocks(x)))

    def extra_repr(self) -> str:
        changed = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != f.default}
        return f"config=ViTConfig({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
