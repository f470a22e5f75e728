"""cbnorm: Cluster-Based Normalization (SCB-Norm, SCB-Norm-base, UCB-Norm) for PyTorch.

Example::

    >>> import torch, cbnorm
    >>> norm = cbnorm.UCBNorm(64, num_components=3)
    >>> y = norm(torch.randn(32, 64, 8, 8))
"""

from . import distributed, functional, kernels, mixture
from .clustering import cached_cluster_ids, cluster_cache_path, cluster_dataset, image_features
from .context import cluster_context
from .convert import convert_batchnorm, convert_sync_cbnorm
from .factory import (
    NormLayerInfo,
    create_norm_layer,
    get_norm_layer,
    norm_layer_info,
    norm_layer_names,
    register_norm_layer,
)
from .layers import SCBNorm, SCBNormBase, UCBNorm
from .mixture_norm import MixtureNorm
from .running_stats import preserve_running_stats

__version__ = "0.1.0"

__all__ = [
    "MixtureNorm",
    "NormLayerInfo",
    "SCBNorm",
    "SCBNormBase",
    "UCBNorm",
    "cached_cluster_ids",
    "cluster_cache_path",
    "cluster_context",
    "cluster_dataset",
    "convert_batchnorm",
    "convert_sync_cbnorm",
    "create_norm_layer",
    "distributed",
    "functional",
    "get_norm_layer",
    "image_features",
    "kernels",
    "mixture",
    "norm_layer_info",
    "norm_layer_names",
    "preserve_running_stats",
    "register_norm_layer",
]
