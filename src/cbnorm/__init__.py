"""cbnorm: Cluster-Based Normalization (SCB-Norm, SCB-Norm-base, UCB-Norm) for PyTorch.

Example::

    >>> import torch, cbnorm
    >>> norm = cbnorm.UCBNorm(64, num_components=3)
    >>> y = norm(torch.randn(32, 64, 8, 8))
"""

from . import functional
from .context import cluster_context
from .factory import convert_batchnorm, create_norm_layer, get_norm_layer, norm_layer_names, register_norm_layer
from .layers import SCBNorm, SCBNormBase, UCBNorm

__version__ = "0.1.0"

__all__ = [
    "SCBNorm",
    "SCBNormBase",
    "UCBNorm",
    "cluster_context",
    "convert_batchnorm",
    "create_norm_layer",
    "functional",
    "get_norm_layer",
    "norm_layer_names",
    "register_norm_layer",
]
