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
    "SCBNorm": "layers",
    "SCBNormBase": "layers",
    "UCBNorm": "layers",
    "cached_cluster_ids": "clustering",
    "cluster_cache_path": "clustering",
    "cluster_context": "context",
    "cluster_dataset": "clustering",
    "convert_batchnorm": "factory",
    "convert_sync_cbnorm": "distributed",
    "create_norm_layer": "factory",
    "get_norm_layer": "factory",
    "image_features": "clustering",
    "norm_layer_names": "factory",
    "register_norm_layer": "factory",
}
_SUBMODULES = ("distributed", "functional", "mixture")

__all__ = [
    "MixtureNorm",
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
    "mixture",
    "norm_layer_names",
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
    from . import distributed, functional, mixture
    from .clustering import cached_cluster_ids, cluster_cache_path, cluster_dataset, image_features
    from .context import cluster_context
    from .distributed import convert_sync_cbnorm
    from .factory import convert_batchnorm, create_norm_layer, get_norm_layer, norm_layer_names, register_norm_layer
    from .layers import SCBNorm, SCBNormBase, UCBNorm
    from .mixture_norm import MixtureNorm
