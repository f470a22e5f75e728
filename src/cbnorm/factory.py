"""A name -> layer registry so any model can take ``norm_layer=``; :func:`cbnorm.convert_batchnorm` uses it.

Each entry declares what a caller cannot see from outside: the constructor keyword that takes
:math:`K` (``num_clusters`` for the SCB layers, ``num_components`` for UCB-Norm and MixtureNorm) and
whether ``forward`` takes cluster ids. :func:`create_norm_layer` takes :math:`K` as ``k=`` for every
layer that has one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Union

from torch import nn

from .layers import SCBNorm, SCBNormBase, UCBNorm
from .mixture_norm import MixtureNorm

__all__ = ["NormLayerInfo", "create_norm_layer", "get_norm_layer", "norm_layer_info", "norm_layer_names",
           "register_norm_layer"]

NormLayer = Union[str, type, Callable[..., nn.Module]]


class NormLayerInfo(NamedTuple):
    """What the registry declares about a norm layer.

    Attributes:
        layer: the class or factory, called as ``layer(num_features, **kwargs)``.
        k_arg: the keyword of ``layer`` that takes :math:`K`, the number of clusters or mixture
            components; ``None`` for a layer without one (BatchNorm).
        takes_clusters: whether ``forward`` takes cluster ids (``cluster=`` or
            :func:`cbnorm.cluster_context`), which training requires.
    """

    layer: Callable[..., nn.Module]
    k_arg: str | None = None
    takes_clusters: bool = False


_NORM_LAYERS: dict[str, NormLayerInfo] = {
    "batchnorm": NormLayerInfo(nn.BatchNorm2d),
    "batchnorm1d": NormLayerInfo(nn.BatchNorm1d),
    "batchnorm2d": NormLayerInfo(nn.BatchNorm2d),
    "batchnorm3d": NormLayerInfo(nn.BatchNorm3d),
    "mn": NormLayerInfo(MixtureNorm, k_arg="num_components"),
    "scb": NormLayerInfo(SCBNorm, k_arg="num_clusters", takes_clusters=True),
    "scb_base": NormLayerInfo(SCBNormBase, k_arg="num_clusters", takes_clusters=True),
    "ucb": NormLayerInfo(UCBNorm, k_arg="num_components"),
}


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


def register_norm_layer(
    name: str,
    layer: Callable[..., nn.Module],
    *,
    k_arg: str | None = None,
    takes_clusters: bool = False,
    overwrite: bool = False,
) -> None:
    """Make ``layer`` (a class or factory taking ``num_features`` first) available as ``name``.

    Args:
        name: the name; case-insensitive, ``-`` and ``_`` alike.
        layer: the class or factory.
        k_arg: the keyword of ``layer`` that takes :math:`K`, if it has one. Default: ``None``
        takes_clusters: whether ``forward`` takes cluster ids. Default: ``False``
        overwrite: replace a different entry of the same name. Default: ``False``

    Example::

        >>> cbnorm.register_norm_layer("groupnorm", lambda c, k: nn.GroupNorm(k, c), k_arg="k")
        >>> cbnorm.create_norm_layer("groupnorm", 64, k=8)
        GroupNorm(8, 64, eps=1e-05, affine=True)
    """
    if k_arg is not None and not (isinstance(k_arg, str) and k_arg.isidentifier()):
        raise ValueError(f"register_norm_layer: expected k_arg to be a keyword name or None, got {k_arg!r}")
    key, info = _canonical(name), NormLayerInfo(layer, k_arg, takes_clusters)
    if key in _NORM_LAYERS and not overwrite and _NORM_LAYERS[key] != info:
        raise ValueError(f"norm layer {name!r} is already registered as {_NORM_LAYERS[key]!r}; pass overwrite=True")
    _NORM_LAYERS[key] = info


def norm_layer_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_NORM_LAYERS)


def norm_layer_info(norm_layer: NormLayer) -> NormLayerInfo:
    """The registry's :class:`NormLayerInfo` for a name, a class or a partial.

    A class or partial takes the entry of the registered class it is, derives from or wraps (``layer``
    is then ``norm_layer`` itself); one the registry does not know declares no :math:`K` and no
    cluster ids.

    Example::

        >>> cbnorm.norm_layer_info("scb")
        NormLayerInfo(layer=<class 'cbnorm.layers.SCBNorm'>, k_arg='num_clusters', takes_clusters=True)
    """
    if isinstance(norm_layer, str):
        key = _canonical(norm_layer)
        if key not in _NORM_LAYERS:
            raise ValueError(f"unknown norm layer {norm_layer!r}; expected one of {norm_layer_names()}")
        return _NORM_LAYERS[key]
    if not callable(norm_layer):
        raise ValueError(f"expected a norm layer name, class or partial, got {type(norm_layer).__name__}")
    registered = {info.layer: info for info in _NORM_LAYERS.values()}
    wrapped = norm_layer
    while True:
        for candidate in wrapped.__mro__ if isinstance(wrapped, type) else (wrapped,):
            if candidate in registered:
                return registered[candidate]._replace(layer=norm_layer)
        if not isinstance(wrapped, functools.partial):
            return NormLayerInfo(norm_layer)
        wrapped = wrapped.func


def get_norm_layer(norm_layer: NormLayer) -> Callable[..., nn.Module]:
    """Resolve a name (case-insensitive, ``-`` or ``_``), a class, or a partial to a layer factory.

    Example::

        >>> get_norm_layer("ucb")
        <class 'cbnorm.layers.UCBNorm'>
        >>> get_norm_layer(functools.partial(cbnorm.UCBNorm, num_components=5))(64)
        UCBNorm(64, 5, ...)
    """
    return norm_layer_info(norm_layer).layer


def create_norm_layer(norm_layer: NormLayer, num_features: int, *, k: int | None = None, **kwargs) -> nn.Module:
    """Build the layer ``norm_layer`` for ``num_features`` channels, passing ``kwargs`` through.

    Args:
        norm_layer: a registered name, a class or a partial.
        num_features: the number of channels :math:`C`.
        k: :math:`K`, passed under the keyword the registry declares for the layer (``num_clusters``
            or ``num_components``); only for layers that have one. Default: ``None`` (the layer's default)
        kwargs: passed to the layer.

    Example::

        >>> create_norm_layer("scb", 64, k=3)          # SCBNorm(64, num_clusters=3)
        SCBNorm(64, 3, eps=1e-05, ...)
        >>> create_norm_layer("ucb", 64, k=3, update="weight")  # UCBNorm(64, num_components=3, ...)
    """
    info = norm_layer_info(norm_layer)
    if k is not None:
        if info.k_arg is None:
            raise ValueError(f"create_norm_layer: {norm_layer!r} declares no K, got k={k!r}; "
                             f"register it with k_arg= to pass K as k=")
        if info.k_arg in kwargs:
            raise ValueError(f"create_norm_layer: K given twice, as k={k!r} and {info.k_arg}={kwargs[info.k_arg]!r}")
        kwargs[info.k_arg] = k
    return info.layer(num_features, **kwargs)


def __getattr__(name: str):
    # convert_batchnorm moved to cbnorm.convert, which imports this module; still importable from here.
    if name == "convert_batchnorm":
        from .convert import convert_batchnorm

        return convert_batchnorm
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
