"""One readable file per model; every model takes its norm layer through :func:`cbnorm.create_norm_layer`."""

from .shallow_cnn import ShallowCNN

__all__ = ["ShallowCNN"]
