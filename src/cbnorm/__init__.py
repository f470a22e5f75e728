"""cbnorm: Cluster-Based Normalization (SCB-Norm, SCB-Norm-base, UCB-Norm) for PyTorch.

Example::

    >>> import torch, cbnorm
    >>> norm = cbnorm.UCBNorm(64, num_components=3)
    >>> y = norm(torch.randn(32, 64, 8, 8))
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562): ``import cbnorm``
# itself does not import torch, so the ``cbnorm`` command line answers ``--help`` at once.
_EXPORTS = {
    "MixtureNorm": "mixture_norm",
    "NormLayerInfo": "factory",
    "SCBNorm": "layers",
    "SCBNormBase": "layers",
    "UCBNorm": "layers",
    "cached_cluster_ids": "clustering",
    "cluster_cache_path": "clustering",
    "cluster_context": "context",
    "cluster_dataset": "clustering",
    "convert_batchnorm": "convert",
    "convert_sync_cbnorm": "convert",
    "create_norm_layer": "factory",
    "get_norm_layer": "factory",
    "image_features": "clustering",
    "norm_layer_info": "factory",
    "norm_layer_names": "factory",
    "preserve_running_stats": "running_stats",
    "register_norm_layer": "factory",
}
_SUBMODULES = ("distributed", "functional", "kernels", "mixture")

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


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and documentation tools
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
