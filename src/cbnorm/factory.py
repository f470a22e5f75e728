"""A name -> class registry so any model can take ``norm_layer=``; :func:`cbnorm.convert_batchnorm` uses it."""

from __future__ import annotations

from typing import Callable, Union

from torch import nn

from .layers import SCBNorm, SCBNormBase, UCBNorm
from .mixture_norm import MixtureNorm

__all__ = ["create_norm_layer", "get_norm_layer", "norm_layer_names", "register_norm_layer"]

NormLayer = Union[str, type, Callable[..., nn.Module]]

_NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
    "batchnorm3d": nn.BatchNorm3d,
    "mn": MixtureNorm,
    "scb": SCBNorm,
    "scb_base": SCBNormBase,
    "ucb": UCBNorm,
}


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


def register_norm_layer(name: str, layer: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Make ``layer`` (a class or factory taking ``num_features`` first) available as ``name``."""
    key = _canonical(name)
    if key in _NORM_LAYERS and not overwrite and _NORM_LAYERS[key] is not layer:
        raise ValueError(f"norm layer {name!r} is already registered as {_NORM_LAYERS[key]!r}; pass overwrite=True")
    _NORM_LAYERS[key] = layer


def norm_layer_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_NORM_LAYERS)


def get_norm_layer(norm_layer: NormLayer) -> Callable[..., nn.Module]:
    """Resolve a name (case-insensitive, ``-`` or ``_``), a class, or a partial to a layer factory.

    Example::

        >>> get_norm_layer("ucb")
        <class 'cbnorm.layers.UCBNorm'>
        >>> get_norm_layer(functools.partial(cbnorm.UCBNorm, num_components=5))(64)
        UCBNorm(64, 5, ...)
    """
    if isinstance(norm_layer, str):
        key = _canonical(norm_layer)
        if key not in _NORM_LAYERS:
            raise ValueError(f"unknown norm layer {norm_layer!r}; expected one of {norm_layer_names()}")
        return _NORM_LAYERS[key]
    if callable(norm_layer):
        return norm_layer
    raise ValueError(f"expected a norm layer name, class or partial, got {type(norm_layer).__name__}")


def create_norm_layer(norm_layer: NormLayer, num_features: int, **kwargs) -> nn.Module:
    """Build the layer ``norm_layer`` for ``num_features`` channels, passing ``kwargs`` through.

    Example::

        >>> create_norm_layer("scb", 64, num_clusters=3)
        SCBNorm(64, 3, eps=1e-05, ...)
    """
    return get_norm_layer(norm_layer)(num_features, **kwargs)
