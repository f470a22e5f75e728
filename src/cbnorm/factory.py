"""A name -> class registry so any model can take ``norm_layer=``, and BatchNorm replacement."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from torch import nn

from .layers import SCBNorm, SCBNormBase, UCBNorm
from .mixture_norm import MixtureNorm

__all__ = ["register_norm_layer", "get_norm_layer", "create_norm_layer", "convert_batchnorm", "norm_layer_names"]

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


def convert_batchnorm(
    model: nn.Module, norm_layer: NormLayer, *, only: Optional[Iterable[str]] = None, **kwargs
) -> nn.Module:
    """Replace BatchNorm layers of ``model`` with ``norm_layer`` built by :func:`create_norm_layer`.

    Args:
        model: the model; changed in place.
        norm_layer: a registered name, a class or a partial.
        only: names from ``model.named_modules()`` of the BatchNorm layers to replace; all when ``None``.
        kwargs: passed to the new layers (after ``num_features``).

    Returns:
        The model (the new layer itself when ``model`` is a BatchNorm layer). New layers take the
        device and dtype of the layers they replace and start in the model's training mode.

    Example::

        >>> net = convert_batchnorm(net, "ucb", only=["features.2"], num_components=3)
    """
    factory = get_norm_layer(norm_layer)
    batchnorms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    targets = set(batchnorms) if only is None else set(only)
    missing = targets - set(batchnorms)
    if missing:
        raise ValueError(f"convert_batchnorm: {sorted(missing)} are not BatchNorm layers of the model; "
                         f"its BatchNorm layers are {sorted(batchnorms)}")
    for name in targets:
        old = batchnorms[name]
        new = factory(old.num_features, **kwargs)
        reference = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)
        new.train(old.training)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
