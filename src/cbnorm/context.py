"""Hand cluster ids to SCB layers anywhere inside a model whose ``forward`` takes only ``x``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["cluster_context", "current_cluster"]

# A ContextVar, so that every thread and every asyncio task sees only the contexts it entered itself.
_CURRENT: ContextVar[Tensor | None] = ContextVar("cbnorm_cluster", default=None)


@contextlib.contextmanager
def cluster_context(cluster: Tensor) -> Iterator[Tensor]:
    """Within the block, every SCB layer called without ``cluster=`` uses ``cluster``.

    ``cluster`` is what the layers accept as ``cluster=``: ids ``(N,)`` for :class:`~cbnorm.SCBNorm`,
    ids or an assignment ``(N, K)`` for :class:`~cbnorm.SCBNormBase`. An explicit ``cluster=``
    argument wins over the context; nested contexts shadow outer ones.

    The context is held in a :class:`contextvars.ContextVar`: each thread and each asyncio task
    sees only the contexts it entered itself (a task starts with a copy of its creator's). As
    ``torch.compile`` cannot read a ``ContextVar`` inside a graph, a compiled model reads the context
    between graphs (a graph break at each SCB layer that takes its ids from it); pass ``cluster=``
    explicitly for a single graph (``fullgraph=True``).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), cbnorm.SCBNorm(8, 2), nn.ReLU())
        >>> with cbnorm.cluster_context(domain_ids):
        ...     out = model(images)
    """
    token = _CURRENT.set(cluster)
    try:
        yield cluster
    finally:
        _CURRENT.reset(token)


@torch.compiler.disable(reason="cbnorm.cluster_context is a ContextVar, which torch.compile cannot read in a graph; "
                               "pass cluster= to the layer explicitly for a single graph")
def current_cluster() -> Tensor | None:
    """The ids of the innermost :func:`cluster_context` of this thread or task, or ``None`` outside any."""
    return _CURRENT.get()
