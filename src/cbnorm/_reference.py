r"""The straightforward implementation of :mod:`cbnorm.functional`, kept as its correctness reference.

This is the library's first, vectorised eager code: it materialises every component's posteriors and
normalised inputs as ``(K, N, C, *)`` tensors and lets autograd differentiate them. It is slow and
memory-hungry (about 25x BatchNorm in training at ``(256, 128, 8, 8)``, ``K = 3``) and obviously
right; the tests hold the fast kernels to it, and the benchmark reports it. Same signatures and
semantics as the functions of the same names in :mod:`cbnorm.functional` (float64 input is computed in
float64, which makes it the tests' exact reference). It shares no code with the module it checks: only
its public result type and rule names.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from ._checks import check_choice
from .functional import POSTERIOR_SCOPES, UNKNOWN_RULES, ComponentStats

__all__ = ["sample_norm", "scb_norm", "ucb_norm", "ucb_norm_batch"]

_LOG_2PI = math.log(2 * math.pi)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 input; float64 for float64 input (SPEC)."""
    return torch.promote_types(x.dtype, torch.float32)


def _full_precision(x: Tensor):
    """Autocast off: the statistics stay in the compute dtype."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """``(..., C)`` -> ``(..., C, 1, ..., 1)``, broadcastable against ``x``'s trailing dims."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _per_component(t: Tensor, x: Tensor) -> Tensor:
    """``(K, C)`` -> ``(K, 1, C, 1, ..., 1)``, broadcastable to ``(K, *x.shape)``."""
    return _per_channel(t, x).unsqueeze(1)


def _channel_prior(prior: Tensor) -> Tensor:
    """Priors ``(K,)`` shared by the channels as ``(K, 1)``; per-channel ``(K, C)`` as they are."""
    return prior.unsqueeze(1) if prior.dim() == 1 else prior


def _affine(y: Tensor, weight, bias) -> Tensor:
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), y)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), y)
    return y


def _gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    r""":math:`\log\mathcal{N}(x;\mu_{k,c},\sigma^2_{k,c})`, ``(K, N, C, *)``."""
    mean, var = _per_component(mean, x), _per_component(var, x)
    return -0.5 * (_LOG_2PI + var.log() + (x - mean).square() / var)


def _log_posteriors(x: Tensor, prior, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\log\tau_k(x)` (Eq. 6), ``(K, N, C, *)``: ``var`` floored at ``eps``, uniform priors for ``None``."""
    logits = _gaussian_log_prob(x, mean, var.clamp_min(eps))
    if prior is not None:
        log_prior = prior.clamp_min(torch.finfo(prior.dtype).tiny).log()
        logits = logits + _per_component(_channel_prior(log_prior), x)
    return torch.log_softmax(logits, dim=0)


def _mixture_transform(x: Tensor, resp: Tensor, prior: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\sum_k \tau_k(x_i)\,\lambda_k^{-1/2}\,(x_i-\mu_{k,c})/\sqrt{\sigma^2_{k,c}+\epsilon}`."""
    scale = (_channel_prior(prior) * (var + eps)).rsqrt()
    return (resp * (x - _per_component(mean, x)) * _per_component(scale, x)).sum(0)


def sample_norm(x, mean, var, weight=None, bias=None, eps=1e-5) -> Tensor:
    """:func:`cbnorm.functional.sample_norm`, straightforwardly."""
    dtype = _compute_dtype(x)
    with _full_precision(x):
        scale = (var.to(dtype) + eps).rsqrt()
        if weight is not None:
            scale = scale * weight.to(dtype)
        shift = -mean.to(dtype) * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = torch.addcmul(_per_channel(shift, x), x.to(dtype), _per_channel(scale, x))
    return y.to(x.dtype)


def scb_norm(x, cluster, mean, var, weight=None, bias=None, eps=1e-5, unknown="paper", posterior="element") -> Tensor:
    """:func:`cbnorm.functional.scb_norm`, straightforwardly."""
    if cluster is not None:
        return sample_norm(x, mean[cluster], var[cluster], weight, bias, eps)
    check_choice("scb_norm", "unknown", unknown, UNKNOWN_RULES)
    check_choice("scb_norm", "posterior", posterior, POSTERIOR_SCOPES)
    dtype = _compute_dtype(x)
    with _full_precision(x):
        xf, mean, var = x.to(dtype), mean.to(dtype), var.to(dtype)
        num_clusters = mean.shape[0]
        if posterior == "element":
            log_resp = _log_posteriors(xf, None, mean, var, eps)
        else:
            log_lik = _gaussian_log_prob(xf, mean, var.clamp_min(eps)).flatten(2).sum(2)  # (K, N)
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
    dtype = _compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = _log_posteriors(xf, prior, mean, var, eps).exp()
        y = _affine(_mixture_transform(xf, resp, prior, mean, var, eps), weight, bias)
    return y.to(x.dtype)


def ucb_norm_batch(x, prior, mean, var, weight=None, bias=None, eps=1e-5, *, reduce_sums=None) -> tuple[Tensor, ComponentStats]:
    """:func:`cbnorm.functional.ucb_norm_batch`, straightforwardly."""
    dtype = _compute_dtype(x)
    with _full_precision(x):
        xf, prior, mean, var = (t.to(dtype) for t in (x, prior, mean, var))
        prior = prior.clamp_min(torch.finfo(dtype).tiny)
        resp = _log_posteriors(xf, prior, mean, var, eps).exp()
        # Moments about the current component means: same statistics, no cancellation in V.
        centered = xf - _per_component(mean, xf)
        batch_dims = (1,) + tuple(range(3, x.dim() + 1))  # (K, N, C, *) -> (K, C)
        sums = torch.stack([(resp * centered**r).sum(batch_dims) for r in range(3)])
        if reduce_sums is not None:
            sums = reduce_sums(sums)
        mass, first, second = sums
        safe_mass = mass.clamp_min(torch.finfo(dtype).eps)  # an empty component gets finite placeholders
        shift = first / safe_mass
        batch_var = (second / safe_mass - shift.square()).clamp_min(0)
        batch_mean = mean + shift
        y = _affine(_mixture_transform(xf, resp, prior, batch_mean, batch_var, eps), weight, bias)
        count = x.numel() // x.shape[1]
        stats = ComponentStats(mass.detach(), batch_mean.detach(), batch_var.detach(), count)
    return y.to(x.dtype), stats
