r"""The straightforward implementation of :mod:`cbnorm.functional`, kept as its correctness reference.

This is the library's first, vectorised eager code: it materialises every component's posteriors and
normalised inputs as ``(K, N, C, *)`` tensors and lets autograd differentiate them. It is slow and
memory-hungry (about 25x BatchNorm in training at ``(256, 128, 8, 8)``, ``K = 3``) and obviously
right; the tests hold the fast kernels to it, and the benchmark reports it. Same signatures and
semantics as the functions of the same names in :mod:`cbnorm.functional`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .functional import (
    UNKNOWN_RULES,
    POSTERIOR_SCOPES,
    ComponentStats,
    _affine,
    _channel_prior,
    _full_precision,
    _per_channel,
    _per_component,
    compute_dtype,
    gaussian_log_prob,
    log_responsibilities,
)

__all__ = ["sample_norm", "scb_norm", "ucb_norm", "ucb_norm_batch"]


def _mixture_transform(x: Tensor, resp: Tensor, prior: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\sum_k \tau_k(x_i)\,\lambda_k^{-1/2}\,(x_i-\mu_{k,c})/\sqrt{\sigma^2_{k,c}+\epsilon}`."""
    scale = (_channel_prior(prior) * (var + eps)).rsqrt()
    return (resp * (x - _per_component(mean, x)) * _per_component(scale, x)).sum(0)


def sample_norm(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Normalise each sample with its own per-channel statistics (Eq. 10).

    .. math::
        \hat x_{n,c,l} = \frac{x_{n,c,l} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}\,\gamma_c + \beta_c

    Shape: ``x`` ``(N, C, *)``; ``mean``, ``var`` ``(N, C)``; ``weight``, ``bias`` ``(C,)``.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        scale = (var.to(dtype) + eps).rsqrt()
        if weight is not None:
            scale = scale * weight.to(dtype)
        shift = -mean.to(dtype) * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = torch.addcmul(_per_channel(shift, x), x.to(dtype), _per_channel(scale, x))
    return y.to(x.dtype)


def scb_norm(
    x: Tensor,
    cluster: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    unknown: str = "paper",
    posterior: str = "element",
) -> Tensor:
    r"""Supervised cluster-based normalisation (Eq. 10, 12).

    With known clusters :math:`z`, :math:`\hat x_{n,c,l} = (x_{n,c,l}-\mu_{z_n,c})/\sqrt{\sigma^2_{z_n,c}+\epsilon}`.
    Without (``cluster=None``), with uniform priors and :math:`\tau_k` the posterior of
    :func:`log_responsibilities`:

    * ``unknown="paper"``: :math:`\hat x_i = \sqrt K\sum_k \tau_k(x_i)(x_i-\mu_{k,c})/\sqrt{\sigma^2_{k,c}+\epsilon}`
    * ``unknown="posterior"``: the same without :math:`\sqrt K`
    * ``unknown="map"``: Eq. 10 with :math:`\arg\max_k \tau_k`

    ``posterior="element"`` takes one posterior per entry; ``posterior="sample"`` one per sample, from
    :math:`\sum_{c,l}\log\mathcal{N}(x_{n,c,l};\mu_{k,c},\sigma^2_{k,c})`.

    Shape: ``x`` ``(N, C, *)``; ``cluster`` ``(N,)`` int64 in ``[0, K)`` or ``None``;
    ``mean``, ``var`` ``(K, C)``.
    """
    if cluster is not None:
        return sample_norm(x, mean[cluster], var[cluster], weight, bias, eps)
    if unknown not in UNKNOWN_RULES:
        raise ValueError(f"scb_norm: unknown must be one of {UNKNOWN_RULES}, got {unknown!r}")
    if posterior not in POSTERIOR_SCOPES:
        raise ValueError(f"scb_norm: posterior must be one of {POSTERIOR_SCOPES}, got {posterior!r}")
    dtype = compute_dtype(x)
    with _full_precision(x):
        xf, mean, var = x.to(dtype), mean.to(dtype), var.to(dtype)
        num_clusters = mean.shape[0]
        if posterior == "element":
            log_resp = log_responsibilities(xf, None, mean, var, eps)
        else:
            log_lik = gaussian_log_prob(xf, mean, var.clamp_min(eps)).flatten(2).sum(2)  # (K, N)
            log_resp = _per_channel(torch.log_softmax(log_lik, dim=0), xf).unsqueeze(2)
        if unknown == "map":
            if posterior == "sample":
                best = log_resp.flatten(1).argmax(0)
                return sample_norm(x, mean[best], var[best], weight, bias, eps)
            normalized = (xf - _per_component(mean, xf)) * _per_component((var + eps).rsqrt(), xf)
            y = normalized.gather(0, log_resp.argmax(0, keepdim=True)).squeeze(0)
        else:
            uniform = mean.new_ones(num_clusters)
            y = _mixture_transform(xf, log_resp.exp(), uniform, mean, var, eps)
            if unknown == "paper":
                y = y * math.sqrt(num_clusters)
        y = _affine(y, weight, bias)
    return y.to(x.dtype)


def ucb_norm(
    x: Tensor,
    prior: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Normalise with given mixture components (Eq. 15): UCB-Norm inference and ``update="weight"``.

    .. math::
        \hat x_i = \sum_{k=1}^K \frac{\tau_k(x_i)}{\sqrt{\lambda_k}}\,
                   \frac{x_i - \mu_{k,c}}{\sqrt{\sigma^2_{k,c} + \epsilon}}

    Shape: ``x`` ``(N, C, *)``; ``prior`` ``(K,)`` or ``(K, C)``; ``mean``, ``var`` ``(K, C)``; output like ``x``.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = log_responsibilities(xf, prior, mean, var, eps).exp()
        y = _affine(_mixture_transform(xf, resp, prior, mean, var, eps), weight, bias)
    return y.to(x.dtype)


def ucb_norm_batch(
    x: Tensor,
    prior: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, ComponentStats]:
    r"""Mixture normalising transform with batch statistics (Eq. 7-9): UCB-Norm and MN training.

    Posteriors :math:`\tau_k` come from the given ``(prior, mean, var)``; the components are then
    re-estimated on the batch, channel by channel:

    .. math::
        \hat\tau_k(x_i) = \frac{\tau_k(x_i)}{\sum_{j\in B_c}\tau_k(x_j)},\quad
        E_k = \sum_{j\in B_c}\hat\tau_k(x_j)\,x_j,\quad
        V_k = \sum_{j\in B_c}\hat\tau_k(x_j)(x_j-E_k)^2

    .. math::
        \hat x_i = \sum_k \frac{\tau_k(x_i)}{\sqrt{\lambda_k}}\,\frac{x_i - E_k}{\sqrt{V_k+\epsilon}}

    Shape: ``x`` ``(N, C, *)``; ``prior`` ``(K,)`` or ``(K, C)``; ``mean``, ``var`` ``(K, C)``.

    Gradients flow through :math:`\tau`, :math:`E` and :math:`V` (not into ``prior, mean, var``,
    which are running state). A component whose mass :math:`\sum\tau_k` is below float epsilon gets
    finite placeholder statistics and a negligible weight.

    Returns:
        ``(y, stats)``: the output like ``x`` and the detached :class:`ComponentStats` that a
        module folds into its running state.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = log_responsibilities(xf, prior, mean, var, eps).exp()
        # Moments about the current component means: same statistics, no cancellation in V.
        centered = xf - _per_component(mean, xf)
        batch_dims = (1,) + tuple(range(3, x.dim() + 1))  # (K, N, C, *) -> (K, C)
        mass = resp.sum(batch_dims)
        safe_mass = mass.clamp_min(torch.finfo(dtype).eps)
        shift = (resp * centered).sum(batch_dims) / safe_mass
        batch_var = ((resp * centered.square()).sum(batch_dims) / safe_mass - shift.square()).clamp_min(0)
        batch_mean = mean + shift
        y = _affine(_mixture_transform(xf, resp, prior, batch_mean, batch_var, eps), weight, bias)
        count = x.numel() // x.shape[1]
        stats = ComponentStats(mass.detach(), batch_mean.detach(), batch_var.detach(), count)
    return y.to(x.dtype), stats
