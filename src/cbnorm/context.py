"""Hand cluster ids to SCB layers anywhere inside a model whose ``forward`` takes only ``x``."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor

__all__ = ["cluster_context", "current_cluster"]

# A plain module-level stack (not a ContextVar) so that torch.compile can trace reads of it.
_STACK: list[Tensor] = []


@contextlib.contextmanager
def cluster_context(cluster: Tensor) -> Iterator[Tensor]:
    """Within the block, every SCB layer called without ``cluster=`` uses ``cluster``.

    ``cluster`` is what the layers accept as ``cluster=``: ids ``(N,)`` for :class:`~cbnorm.SCBNorm`,
    ids or an assignment ``(N, K)`` for :class:`~cbnorm.SCBNormBase`. An explicit ``cluster=``
    argument wins over the context; nested contexts shadow outer ones.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), cbnorm.SCBNorm(8, 2), nn.ReLU())
        >>> with cbnorm.cluster_context(domain_ids):
        ...     out = model(images)
    """
    _STACK.append(cluster)
    try:
        yield cluster
    finally:
        _STACK.pop()


def current_cluster() -> Optional[Tensor]:
    """The ids of the innermost :func:`cluster_context`, or ``None`` outside any."""
    return _STACK[-1] if _STACK else None
