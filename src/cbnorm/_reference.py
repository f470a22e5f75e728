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


def _no_autocast(x: Tensor):
    """Autocast off, so that everything runs in the compute dtype."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _as_columns(x: Tensor) -> Tensor:
    """``(N, C, *)`` as ``(N, C, L)`` in the compute dtype: float32, float64 for float64 input."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).to(torch.promote_types(x.dtype, torch.float32))


def _k(t: Tensor) -> Tensor:
    """Statistics ``(K, C)`` (priors ``(K,)``) as ``(K, 1, C, 1)`` (``(K, 1, 1, 1)``), against ``(K, N, C, L)``."""
    return t[:, None, :, None] if t.dim() == 2 else t[:, None, None, None]


def _affine(y: Tensor, weight, bias) -> Tensor:
    if weight is not None:
        y = y * weight.to(y.dtype)[:, None]
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None]
    return y


def _log_density(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\log\mathcal{N}(x;\mu_k,\max(\sigma^2_k,\epsilon))` of ``x`` ``(N, C, L)``, ``(K, N, C, L)``."""
    var = var.clamp_min(eps)
    return -0.5 * (_LOG_2PI + _k(var.log()) + (x - _k(mean)).square() / _k(var))


def _log_posteriors(x: Tensor, prior, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\log\tau_k(x)` (Eq. 6), ``(K, N, C, L)``; uniform priors for ``prior=None``."""
    logits = _log_density(x, mean, var, eps)
    if prior is not None:
        logits = logits + _k(prior.clamp_min(torch.finfo(prior.dtype).tiny).log())
    return torch.log_softmax(logits, dim=0)


def _mixture_transform(x: Tensor, resp: Tensor, prior: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\sum_k \tau_k(x_i)\,\lambda_k^{-1/2}\,(x_i-\mu_{k,c})/\sqrt{\sigma^2_{k,c}+\epsilon}`, ``(N, C, L)``."""
    prior = prior[:, None] if prior.dim() == 1 else prior
    return (resp * (x - _k(mean)) * _k((prior * (var + eps)).rsqrt())).sum(0)


def sample_norm(x, mean, var, weight=None, bias=None, eps=1e-5) -> Tensor:
    """:func:`cbnorm.functional.sample_norm`, straightforwardly."""
    with _no_autocast(x):
        xc = _as_columns(x)
        scale = (var.to(xc.dtype) + eps).rsqrt()
        if weight is not None:
            scale = scale * weight.to(xc.dtype)
        shift = -mean.to(xc.dtype) * scale
        if bias is not None:
            shift = shift + bias.to(xc.dtype)
        y = torch.addcmul(shift[:, :, None], xc, scale[:, :, None])
    return y.reshape(x.shape).to(x.dtype)


def scb_norm(x, cluster, mean, var, weight=None, bias=None, eps=1e-5, unknown="paper", posterior="element") -> Tensor:
    """:func:`cbnorm.functional.scb_norm`, straightforwardly."""
    if cluster is not None:
        return sample_norm(x, mean[cluster], var[cluster], weight, bias, eps)
    check_choice("scb_norm", "unknown", unknown, UNKNOWN_RULES)
    check_choice("scb_norm", "posterior", posterior, POSTERIOR_SCOPES)
    with _no_autocast(x):
        xc = _as_columns(x)
        mean, var = mean.to(xc.dtype), var.to(xc.dtype)
        num_clusters = mean.shape[0]
        if posterior == "element":
            log_resp = _log_posteriors(xc, None, mean, var, eps)
        else:
            log_lik = _log_density(xc, mean, var, eps).flatten(2).sum(2)  # (K, N)
            log_resp = torch.log_softmax(log_lik, dim=0)[:, :, None, None]
        if unknown == "map":
            if posterior == "sample":
                best = log_resp.flatten(1).argmax(0)
                return sample_norm(x, mean[best], var[best], weight, bias, eps)
            normalized = (xc - _k(mean)) * _k((var + eps).rsqrt())
            y = normalized.gather(0, log_resp.argmax(0, keepdim=True)).squeeze(0)
        else:
            y = _mixture_transform(xc, log_resp.exp(), mean.new_ones(num_clusters), mean, var, eps)
            if unknown == "paper":
                y = y * math.sqrt(num_clusters)
        y = _affine(y, weight, bias)
    return y.reshape(x.shape).to(x.dtype)


def ucb_norm(x, prior, mean, var, weight=None, bias=None, eps=1e-5) -> Tensor:
    """:func:`cbnorm.functional.ucb_norm`, straightforwardly."""
    with _no_autocast(x):
        xc = _as_columns(x)
        prior, mean, var = (t.to(xc.dtype) for t in (prior, mean, var))
        prior = prior.clamp_min(torch.finfo(xc.dtype).tiny)
        resp = _log_posteriors(xc, prior, mean, var, eps).exp()
        y = _affine(_mixture_transform(xc, resp, prior, mean, var, eps), weight, bias)
    return y.reshape(x.shape).to(x.dtype)


def ucb_norm_batch(x, prior, mean, var, weight=None, bias=None, eps=1e-5, *, reduce_sums=None) -> tuple[Tensor, ComponentStats]:
    """:func:`cbnorm.functional.ucb_norm_batch`, straightforwardly."""
    with _no_autocast(x):
        xc = _as_columns(x)
        prior, mean, var = (t.to(xc.dtype) for t in (prior, mean, var))
        prior = prior.clamp_min(torch.finfo(xc.dtype).tiny)
        resp = _log_posteriors(xc, prior, mean, var, eps).exp()
        # Moments about the current component means: same statistics, no cancellation in V.
        centered = xc - _k(mean)
        sums = torch.stack([(resp * centered**r).sum((1, 3)) for r in range(3)])  # (3, K, C)
        if reduce_sums is not None:
            sums = reduce_sums(sums)
        mass, first, second = sums
        safe_mass = mass.clamp_min(torch.finfo(xc.dtype).eps)  # an empty component gets finite placeholders
        shift = first / safe_mass
        batch_var = (second / safe_mass - shift.square()).clamp_min(0)
        batch_mean = mean + shift
        y = _affine(_mixture_transform(xc, resp, prior, batch_mean, batch_var, eps), weight, bias)
        stats = ComponentStats(mass.detach(), batch_mean.detach(), batch_var.detach(), x.numel() // x.shape[1])
    return y.reshape(x.shape).to(x.dtype), stats
