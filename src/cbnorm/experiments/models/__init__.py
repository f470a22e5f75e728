"""One readable file per model; every model takes its norm layer through :func:`cbnorm.create_norm_layer`.

:func:`build_model` makes any of them by name for the training script.
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import nn

from cbnorm.factory import NormLayer, register_norm_layer

from .cluster_bias import ClusterBias
from .densenet import DenseNet
from .domain_batchnorm import DomainBatchNorm
from .oxford_cnn import OxfordCNN
from .shallow_cnn import ShallowCNN
from .vit import ViT, ViTConfig

__all__ = ["ClusterBias", "DenseNet", "DomainBatchNorm", "MODELS", "OxfordCNN", "ShallowCNN", "ViT", "ViTConfig",
           "build_model"]

# Controls of the experiments, not layers of the paper: domain-specific BatchNorm (AdaMatch) and a
# learned bias per superclass (label injection, superclass experiment).
register_norm_layer("dsbn", DomainBatchNorm, k_arg="num_domains", takes_clusters=True)
register_norm_layer("cluster_bias", ClusterBias, k_arg="num_clusters", takes_clusters=True)

MODELS = {
    "shallow_cnn": ShallowCNN,
    "densenet40": functools.partial(DenseNet, 40),
    "densenet100": functools.partial(DenseNet, 100),
    "vit": ViT,
    "oxford_cnn": OxfordCNN,
}


def build_model(
    name: str, num_classes: int, in_channels: int, norm_layer: Optional[NormLayer], norm_kwargs: Optional[dict] = None
) -> nn.Module:
    """Model ``name`` (a key of :data:`MODELS`) with ``norm_layer`` where that model puts the layer under test."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](
        num_classes=num_classes, norm_layer=norm_layer, in_channels=in_channels, norm_kwargs=norm_kwargs
    )
