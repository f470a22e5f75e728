"""Forwards that leave a model's running statistics as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .layers import UCBNorm
from .mixture_norm import MixtureNorm

__all__ = ["preserve_running_stats"]


@contextlib.contextmanager
def preserve_running_stats(model: nn.Module) -> Iterator[None]:
    r"""Within the block, forwards of ``model`` leave its running statistics exactly as they were.

    Layers compute as usual (in training mode BatchNorm, UCB-Norm and MixtureNorm normalise with the
    batch's statistics and gradients flow), but every buffer of ``model`` is swapped for a copy on
    entry, so their running updates land in the copies; on exit, even by an exception, the original
    buffers are back. That covers BatchNorm's ``running_mean``, ``running_var`` and
    ``num_batches_tracked``, UCB-Norm's and MixtureNorm's running mixture, MixtureNorm's last fit,
    and the first training batch's k-means start of those layers (``initialized`` stays as it was,
    so the next batch after the block still starts the mixture). The originals are never written to:
    their values and autograd versions are unchanged, so a graph built before the block, which holds
    BatchNorm's buffers, can still be differentiated after it.

    Parameters are not buffers and are left alone, which is why a :class:`~cbnorm.UCBNorm` with
    ``update="weight"`` must have seen its first training batch (that batch sets its parameters)
    before entering in training mode. Whatever else the block does to buffers (``load_state_dict``
    included) is discarded with the copies.

    Like :func:`torch.random.fork_rng` for the random state, for the running statistics.

    Args:
        model: the model (or a single layer).

    Raises:
        ValueError: ``model`` is in training mode with a UCB-Norm of ``update="weight"`` that has not
            seen a training batch yet; nothing is changed.

    Example::

        >>> joint = model(torch.cat([source, target]))      # updates the running statistics
        >>> with cbnorm.preserve_running_stats(model):
        ...     source_only = model(source)                    # batch statistics of source alone
        >>> (joint.sum() + source_only.sum()).backward()
    """
    for name, module in model.named_modules():
        if isinstance(module, UCBNorm) and module.update == "weight" and module.training and not module._initialized:
            raise ValueError(
                f"preserve_running_stats: {type(module).__name__} {name or '(the model)'} with update='weight' "
                f"has not seen a training batch, and its first one sets its parameters, which this context "
                f"cannot undo; run one training batch first"
            )
    originals = [(module, name, buffer) for module in model.modules()
                 for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False)]
    copies = {id(buffer): buffer.clone() for _, _, buffer in originals}  # a buffer shared by modules stays shared
    mirrors = [(module, module._initialized) for module in model.modules() if isinstance(module, (UCBNorm, MixtureNorm))]
    for module, name, buffer in originals:
        setattr(module, name, copies[id(buffer)])
    try:
        yield
    finally:
        for module, name, buffer in originals:
            setattr(module, name, buffer)
        for module, initialized in mirrors:  # the Python mirror of `initialized`, which torch.compile reads
            module._initialized = initialized
