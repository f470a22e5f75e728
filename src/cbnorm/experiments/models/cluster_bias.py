r"""A learned bias per cluster: the "label injection" control of the superclass experiment.

SCB-Norm given each image's true superclass shifts and scales the features by a learned amount per
superclass. A plain network handed the same superclass as :math:`y = x + b_{z}`, a learned vector per
superclass added before its last layer, gets the same information with nothing of a normalisation;
if it gains as much, the superclass, not the normalisation, is what helped.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cbnorm.context import current_cluster

__all__ = ["ClusterBias"]


class ClusterBias(nn.Module):
    r""":math:`y_n = x_n + b_{z[n]}`, with ``b`` ``(num_clusters, C)`` learned and initialised to zero.

    Args:
        num_features: ``C``, the channels (dim 1).
        num_clusters: ``K``; ids are in ``[0, K)``. Default: 2

    Shape:
        - Input: ``(N, C, *)``; cluster ids ``(N,)`` (long), as ``cluster=`` or from :func:`cbnorm.cluster_context`.
        - Output: same shape as the input.
    """

    def __init__(self, num_features: int, num_clusters: int = 2):
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"ClusterBias: expected num_clusters >= 1, got {num_clusters}")
        self.num_clusters = num_clusters
        self.bias = nn.Parameter(torch.zeros(num_clusters, num_features))

    def forward(self, x: Tensor, cluster: Optional[Tensor] = None) -> Tensor:
        ids = current_cluster() if cluster is None else cluster
        if ids is None or ids.dtype != torch.long or ids.shape != x.shape[:1]:
            got = "none" if ids is None else f"{ids.dtype} of shape {tuple(ids.shape)}"
            raise ValueError(f"ClusterBias: expected cluster ids of dtype torch.int64 and shape ({len(x)},), got {got}")
        if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < self.num_clusters:
            raise ValueError(f"ClusterBias: expected cluster ids in [0, {self.num_clusters}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return x + self.bias[ids].reshape(*self.bias[ids].shape, *(1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"{self.bias.shape[1]}, num_clusters={self.num_clusters}"
