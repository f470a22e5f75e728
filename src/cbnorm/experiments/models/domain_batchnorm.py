r"""Domain-specific batch normalisation (Chang et al., "Domain-Specific Batch Normalization for Unsupervised
Domain Adaptation", CVPR 2019): one BatchNorm per domain, statistics and affine both separate.

The AdaMatch experiment puts it where SCB-Norm sits, as the network's initial layer, to ask whether
"normalise each domain with its own batch statistics" explains what SCB-Norm gains there. Chang et al.
replace every BatchNorm of the network; this control replaces only the layer under test.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from cbnorm.context import current_cluster

__all__ = ["DomainBatchNorm"]


class DomainBatchNorm(nn.Module):
    r"""``num_domains`` BatchNorm layers; sample ``n`` goes through the one of its domain ``d[n]``:

    .. math::
        y_n = \frac{x_n - \mathrm{E}_{d[n]}[x]}{\sqrt{\mathrm{Var}_{d[n]}[x] + \epsilon}} \gamma_{d[n]} + \beta_{d[n]}

    with the mean and variance taken over the batch's samples of that domain in training (running
    estimates of them in eval mode), as :class:`torch.nn.BatchNorm2d` does for each domain alone.

    Args:
        num_features: ``C``, the channels.
        num_domains: the domains; ids are in ``[0, num_domains)``. Default: 2
        eps, momentum, affine: as :class:`torch.nn.BatchNorm2d`, for every domain.

    Shape:
        - Input: ``(N, C, *)``; domain ids ``(N,)`` (long), as ``cluster=`` (the SCB layers' name) or from
          :func:`cbnorm.cluster_context`.
        - Output: same shape as the input.

    Example::

        >>> layer = DomainBatchNorm(3, num_domains=2)
        >>> out = layer(torch.randn(8, 3, 32, 32), torch.tensor([0] * 4 + [1] * 4))
    """

    def __init__(self, num_features: int, num_domains: int = 2, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"DomainBatchNorm: expected num_domains >= 1, got {num_domains}")
        self.num_domains = num_domains
        # BatchNorm1d accepts (N, C) and (N, C, L); every input is viewed as (N, C, -1).
        self.domains = nn.ModuleList(nn.BatchNorm1d(num_features, eps, momentum, affine) for _ in range(num_domains))

    def forward(self, x: Tensor, cluster: Optional[Tensor] = None) -> Tensor:
        domain = current_cluster() if cluster is None else cluster
        if domain is None:
            raise ValueError("DomainBatchNorm: expected domain ids (N,), as cluster= or from cbnorm.cluster_context, "
                             "got none")
        if domain.dtype != torch.long or domain.shape != x.shape[:1]:
            raise ValueError(f"DomainBatchNorm: expected domain ids of dtype torch.int64 and shape ({len(x)},), "
                             f"got {domain.dtype} of shape {tuple(domain.shape)}")
        present = domain.unique().tolist()
        if present and not 0 <= min(present) <= max(present) < self.num_domains:
            raise ValueError(f"DomainBatchNorm: expected domain ids in [0, {self.num_domains}), got {present}")
        flat = x.reshape(len(x), x.shape[1], -1)
        out = torch.empty_like(flat)
        for d in present:
            rows = domain == d
            out[rows] = self.domains[d](flat[rows])
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        bn = self.domains[0]
        return (f"{bn.num_features}, num_domains={self.num_domains}, eps={bn.eps}, momentum={bn.momentum}, "
                f"affine={bn.affine}")
