r"""The straightforward implementation of :mod:`cbnorm.functional`, kept as its correctness reference.

This is the library's first, vectorised eager code: it materialises every component's posteriors and
normalised inputs as ``(K, N, C, *)`` tensors and lets autograd differentiate them. It is slow and
memory-hungry (about 25x BatchNorm in training at ``(256, 128, 8, 8)``, ``K = 3``) and obviously
right; the tests hold the fast kernels to it, and the benchmark reports it. Same signatures and
semantics as the functions of the same names in :mod:`cbnorm.functional`.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .functional import (
    ComponentStats,
    _affine,
    _batch_statistics,
    _channel_prior,
    _check_unknown_cluster_rule,
    _full_precision,
    _per_channel,
    _per_component,
    _sample_affine,
    compute_dtype,
    gaussian_log_prob,
    log_responsibilities,
)

__all__ = ["sample_norm", "scb_norm", "ucb_norm", "ucb_norm_batch"]


def _mixture_transform(x: Tensor, resp: Tensor, prior: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\sum_k \tau_k(x_i)\,\lambda_k^{-1/2}\,(x_i-\mu_{k,c})/\sqrt{\sigma^2_{k,c}+\epsilon}`."""
    scale = (_channel_prior(prior) * (var + eps)).rsqrt()
    return (resp * (x - _per_component(mean, x)) * _per_component(scale, x)).sum(0)


def sample_norm(x, mean, var, weight=None, bias=None, eps=1e-5) -> Tensor:
    """:func:`cbnorm.functional.sample_norm`, straightforwardly."""
    dtype = compute_dtype(x)
    with _full_precision(x):
        scale, shift = _sample_affine(mean, var, weight, bias, eps, dtype)
        y = torch.addcmul(_per_channel(shift, x), x.to(dtype), _per_channel(scale, x))
    return y.to(x.dtype)


def scb_norm(x, cluster, mean, var, weight=None, bias=None, eps=1e-5, unknown="paper", posterior="element") -> Tensor:
    """:func:`cbnorm.functional.scb_norm`, straightforwardly."""
    if cluster is not None:
        return sample_norm(x, mean[cluster], var[cluster], weight, bias, eps)
    _check_unknown_cluster_rule(unknown, posterior)
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


def ucb_norm(x, prior, mean, var, weight=None, bias=None, eps=1e-5) -> Tensor:
    """:func:`cbnorm.functional.ucb_norm`, straightforwardly."""
    dtype = compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = log_responsibilities(xf, prior, mean, var, eps).exp()
        y = _affine(_mixture_transform(xf, resp, prior, mean, var, eps), weight, bias)
    return y.to(x.dtype)


def ucb_norm_batch(x, prior, mean, var, weight=None, bias=None, eps=1e-5, *, reduce_sums=None) -> tuple[Tensor, ComponentStats]:
    """:func:`cbnorm.functional.ucb_norm_batch`, straightforwardly."""
    dtype = compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = log_responsibilities(xf, prior, mean, var, eps).exp()
        # Moments about the current component means: same statistics, no cancellation in V.
        centered = xf - _per_component(mean, xf)
        batch_dims = (1,) + tuple(range(3, x.dim() + 1))  # (K, N, C, *) -> (K, C)
        sums = torch.stack([(resp * centered**r).sum(batch_dims) for r in range(3)])
        mass, shift, batch_var = _batch_statistics(sums, reduce_sums)
        batch_mean = mean + shift
        y = _affine(_mixture_transform(xf, resp, prior, batch_mean, batch_var, eps), weight, bias)
        count = x.numel() // x.shape[1]
        stats = ComponentStats(mass.detach(), batch_mean.detach(), batch_var.detach(), count)
    return y.to(x.dtype), stats
