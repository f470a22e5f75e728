"""Hand cluster ids to SCB layers anywhere inside a model whose ``forward`` takes only ``x``."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["cluster_context", "current_cluster"]

# A ContextVar, so that every thread and every asyncio task sees only the contexts it entered itself.
_CURRENT: ContextVar[Tensor | None] = ContextVar("cbnorm_cluster", default=None)
# torch.compile cannot read a ContextVar, but it can read (and guard on) a module-level bool: while no
# cluster_context block is open in any thread or task, a compiled layer knows that there are no ids to
# look up, and stays in one graph. (A bool rather than the count, so that compiled code is guarded on
# two values, not on every count.)
_open_blocks = 0
_none_open = True
_open_blocks_lock = threading.Lock()


def _count_open_block(change: int) -> None:
    global _open_blocks, _none_open
    with _open_blocks_lock:
        _open_blocks += change
        _none_open = _open_blocks == 0


@contextlib.contextmanager
def cluster_context(cluster: Tensor) -> Iterator[Tensor]:
    """Within the block, every SCB layer called without ``cluster=`` uses ``cluster``.

    ``cluster`` is what the layers accept as ``cluster=``: ids ``(N,)`` for :class:`~cbnorm.SCBNorm`,
    ids or an assignment ``(N, K)`` for :class:`~cbnorm.SCBNormBase`. An explicit ``cluster=``
    argument wins over the context; nested contexts shadow outer ones.

    The context is held in a :class:`contextvars.ContextVar`: each thread and each asyncio task
    sees only the contexts it entered itself (a task starts with a copy of its creator's). As
    ``torch.compile`` cannot read a ``ContextVar`` inside a graph, a compiled model called while a
    context is open reads it between graphs (a graph break at each SCB layer that looks it up); pass
    ``cluster=`` explicitly for a single graph (``fullgraph=True``). With no context open, compiled
    layers look nothing up and stay in one graph.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), cbnorm.SCBNorm(8, 2), nn.ReLU())
        >>> with cbnorm.cluster_context(domain_ids):
        ...     out = model(images)
    """
    token = _CURRENT.set(cluster)
    _count_open_block(+1)
    try:
        yield cluster
    finally:
        _count_open_block(-1)
        _CURRENT.reset(token)


def current_cluster() -> Tensor | None:
    """The ids of the innermost :func:`cluster_context` of this thread or task, or ``None`` outside any."""
    if torch.compiler.is_compiling() and _none_open:
        # Traced with no block open anywhere. (A task that inherited a context after its block closed
        # still holds the ids in eager mode; traced, it sees none.)
        return None
    return _context_value()


@torch.compiler.disable(reason="cbnorm.cluster_context is a ContextVar, which torch.compile cannot read in a graph; "
                               "pass cluster= to the layer explicitly for a single graph")
def _context_value() -> Tensor | None:
    return _CURRENT.get()
