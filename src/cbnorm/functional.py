r"""Stateless math of the cbnorm layers; the modules in :mod:`cbnorm.layers` own state and mode.

Conventions shared by every function here (see ``SPEC.md``):

* ``x`` has shape ``(N, C, *)``. Channel ``c`` has its own mixture over the scalars
  :math:`B_c = \{x[n, c, l]\}` (every sample ``n``, every trailing position ``l``), :math:`m = |B_c|`.
* Component statistics have shape ``(K, C)``, priors ``(K,)``, per-sample statistics ``(N, C)``.
* The math runs in float32 (float64 for float64 input) with autocast off; the output has ``x.dtype``.
* :math:`\log\mathcal{N}(x;\mu,\sigma^2) = -\tfrac12(\log 2\pi + \log\sigma^2 + (x-\mu)^2/\sigma^2)`,
  with :math:`\sigma^2` floored at ``eps`` so a collapsed component cannot produce ``inf``;
  posteriors are taken with log-softmax, never by dividing raw exponentials.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "ComponentStats",
    "compute_dtype",
    "gaussian_log_prob",
    "log_responsibilities",
    "sample_norm",
    "scb_norm",
    "scb_base_norm",
    "ucb_norm",
    "ucb_norm_batch",
    "UNKNOWN_RULES",
    "POSTERIOR_SCOPES",
]

UNKNOWN_RULES = ("paper", "posterior", "map")
POSTERIOR_SCOPES = ("element", "sample")
_LOG_2PI = math.log(2 * math.pi)


class ComponentStats(NamedTuple):
    """Posterior-weighted statistics of one batch (Eq. 8-9), all ``(K, C)`` except ``count``.

    ``mass`` is :math:`\\sum_{j \\in B_c} \\tau_k(x_j)`, ``mean`` is :math:`E_k`, ``var`` the biased
    :math:`V_k`, and ``count`` is :math:`m`, the number of entries per channel.
    """

    mass: Tensor
    mean: Tensor
    var: Tensor
    count: int


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half, bfloat16 and float32 input; float64 for float64 input."""
    return torch.promote_types(x.dtype, torch.float32)


def _full_precision(x: Tensor):
    """Autocast off, so statistics (and SCB-Norm-base's linear maps) stay in float32."""
    if x.device.type in ("cpu", "cuda"):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """``(..., C)`` -> ``(..., C, 1, ..., 1)``, broadcastable against ``x``'s trailing dims."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _per_component(t: Tensor, x: Tensor) -> Tensor:
    """``(K, C)`` -> ``(K, 1, C, 1, ..., 1)``, broadcastable to ``(K, *x.shape)``."""
    return _per_channel(t, x).unsqueeze(1)


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if weight is not None:
        y = y * _per_channel(weight.to(y.dtype), y)
    if bias is not None:
        y = y + _per_channel(bias.to(y.dtype), y)
    return y


def gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    r"""Per-channel Gaussian log-density of every entry under every component.

    .. math::
        \log\mathcal{N}(x_{n,c,l};\mu_{k,c},\sigma^2_{k,c})
        = -\tfrac12\left(\log 2\pi + \log\sigma^2_{k,c} + (x_{n,c,l}-\mu_{k,c})^2/\sigma^2_{k,c}\right)

    Shape: ``x`` ``(N, C, *)``, ``mean`` and ``var`` ``(K, C)`` -> ``(K, N, C, *)``.
    """
    mean, var = _per_component(mean, x), _per_component(var, x)
    return -0.5 * (_LOG_2PI + var.log() + (x - mean).square() / var)


def log_responsibilities(
    x: Tensor, prior: Optional[Tensor], mean: Tensor, var: Tensor, eps: float = 1e-5
) -> Tensor:
    r"""Log-posteriors :math:`\log\tau_k(x_i)` of Eq. 6, one per entry and component.

    .. math::
        \tau_k(x_i) = \frac{\lambda_k\,\mathcal{N}(x_i;\mu_{k,c},\sigma^2_{k,c})}
                           {\sum_j \lambda_j\,\mathcal{N}(x_i;\mu_{j,c},\sigma^2_{j,c})}

    Args:
        x: input ``(N, C, *)``.
        prior: priors :math:`\lambda`, ``(K,)`` shared by the channels or ``(K, C)`` per channel;
            ``None`` for uniform priors.
        mean, var: component statistics ``(K, C)``; ``var`` is floored at ``eps`` here.
        eps: variance floor. Default: ``1e-5``

    Returns:
        ``(K, N, C, *)`` log-posteriors; ``exp`` of it sums to one over ``K``.
    """
    logits = gaussian_log_prob(x, mean, var.clamp_min(eps))
    if prior is not None:
        log_prior = prior.clamp_min(torch.finfo(prior.dtype).tiny).log()
        logits = logits + _per_component(_channel_prior(log_prior), x)
    return torch.log_softmax(logits, dim=0)


def _channel_prior(prior: Tensor) -> Tensor:
    """Priors ``(K,)`` shared by all channels as ``(K, 1)``; per-channel ``(K, C)`` as they are."""
    return prior.unsqueeze(1) if prior.dim() == 1 else prior


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


def scb_base_norm(
    x: Tensor,
    assignment: Tensor,
    mean_weight: Tensor,
    mean_bias: Tensor,
    log_var_weight: Tensor,
    log_var_bias: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""SCB-Norm-base: statistics from two linear maps of the cluster code, then Eq. 10.

    .. math::
        \mu_n = W_\mu a_n + b_\mu,\qquad \sigma^2_n = \exp(W_s a_n + b_s)

    Shape: ``x`` ``(N, C, *)``; ``assignment`` ``(N, K)`` (one-hot or soft, rows summing to one);
    ``mean_weight``, ``log_var_weight`` ``(C, K)``; ``mean_bias``, ``log_var_bias`` ``(C,)``.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        a = assignment.to(dtype)
        mean = torch.nn.functional.linear(a, mean_weight.to(dtype), mean_bias.to(dtype))
        var = torch.nn.functional.linear(a, log_var_weight.to(dtype), log_var_bias.to(dtype)).exp()
    return sample_norm(x, mean, var, weight, bias, eps)


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
