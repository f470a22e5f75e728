r"""Stateless math of the cbnorm layers; the modules in :mod:`cbnorm.layers` own state and mode.

Conventions shared by every function here (see ``SPEC.md``):

* ``x`` has shape ``(N, C, *)``. Channel ``c`` has its own mixture over the scalars
  :math:`B_c = \{x[n, c, l]\}` (every sample ``n``, every trailing position ``l``), :math:`m = |B_c|`.
* Component statistics have shape ``(K, C)``, priors ``(K,)``, per-sample statistics ``(N, C)``.
* The math runs in float32 (float64 for float64 input) with autocast off; the output has ``x.dtype``.
  The kernels read ``x`` in its own dtype (no float32 copy of a float16 or bfloat16 input on GPU).
* :math:`\log\mathcal{N}(x;\mu,\sigma^2) = -\tfrac12(\log 2\pi + \log\sigma^2 + (x-\mu)^2/\sigma^2)`,
  with :math:`\sigma^2` floored at ``eps`` so a collapsed component cannot produce ``inf``;
  posteriors are a softmax of logits shifted by their maximum (log-sum-exp), never raw exponentials.
* Every mixture transform is one pass of :func:`cbnorm._kernels.mixture_transform` over ``x``, and
  batch statistics one pass of :func:`cbnorm._kernels.mixture_moments`; they recompute posteriors
  instead of storing them, so memory stays linear in ``x`` whatever ``K``. The straightforward
  implementation these replace is kept in :mod:`cbnorm._reference`, which the tests compare against.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._kernels import logit_bounds, mixture_transform, normalize_with_moments, scale_shift, snapshot

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
    :math:`V_k`, and ``count`` is :math:`m`, the number of entries per channel (a 0-d tensor when it is
    summed over ranks on the device, :class:`cbnorm.distributed.GlobalSums`).
    """

    mass: Tensor
    mean: Tensor
    var: Tensor
    count: Union[int, Tensor]


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



def _channels(x: Tensor) -> Tensor:
    """``(N, C, *)`` as ``(N, C, L)``: a view for contiguous and channels-last inputs."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _log_density(log_prior: Optional[Tensor], var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""``(log_coef, quad_coef)``, ``(K, C)``, of the posterior logits as quadratics in :math:`d = x - \mu_k`.

    :math:`\ell_k = \log\lambda_k - \tfrac12\log\sigma^2_k - d^2/(2\sigma^2_k)`: the Gaussian log-density
    plus log-prior, less the constant :math:`\tfrac12\log 2\pi` that the softmax over components
    cancels; ``var`` floored at ``eps``, no prior for ``log_prior=None`` (uniform).
    """
    var = var.clamp_min(eps)
    log_coef = -0.5 * var.log()
    if log_prior is not None:
        log_coef = log_coef + log_prior
    return log_coef, -0.5 / var


def _mixture_scale(log_prior: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`1/\sqrt{\lambda_k(\sigma^2_k+\epsilon)}`, through logarithms: its gradient stays finite in float32
    for priors far below float epsilon, where that of ``rsqrt`` (:math:`\lambda^{-3/2}`) overflows."""
    return torch.exp(-0.5 * (log_prior + (var + eps).log()))


def _normalize(
    x: Tensor,
    mean: Tensor,
    logits: tuple[Tensor, Tensor],
    scale: Tensor,
    shift: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> Tensor:
    r""":math:`\gamma_c \sum_k \tau_k s_k (x - \mu_k - \delta_k) + \beta_c`, one pass of :func:`mixture_transform`.

    ``x`` is ``(N, C, L)``; ``scale`` :math:`s` and ``shift`` :math:`\delta` (``None``: zero) are ``(K, C)``.
    """
    return mixture_transform(x, mean, *logits, *_transform_coefficients(scale, shift, weight, bias))


def _transform_coefficients(
    scale: Tensor, shift: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    r"""``(a, b)`` of :func:`mixture_transform` for :math:`\gamma \sum_k \tau_k s_k (d_k - \delta_k) + \beta`.

    As the posteriors sum to one, the affine map folds into the per-component coefficients:
    :math:`a_k = \beta - \gamma s_k \delta_k`, :math:`b_k = \gamma s_k`.
    """
    slope = scale if weight is None else scale * weight.to(scale.dtype)
    offset = torch.zeros_like(slope) if shift is None else -slope * shift
    if bias is not None:
        offset = offset + bias.to(slope.dtype)
    return offset, slope


def _log_prior(prior: Tensor) -> Tensor:
    """Log-priors, the priors clamped at the smallest normal float, as ``(K, 1)`` (shared) or ``(K, C)``."""
    return _channel_prior(prior.clamp_min(torch.finfo(prior.dtype).tiny).log())


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
        y = scale_shift(_channels(x), *_sample_affine(mean, var, weight, bias, eps, dtype))
    return y.reshape(x.shape).to(x.dtype)


def _sample_affine(mean, var, weight, bias, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, ``(N, C)``, of Eq. 10 with the affine map: ``y = x * scale + shift``."""
    scale = (var.to(dtype) + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def _each_component(t: Tensor) -> tuple[Tensor, ...]:
    """``(K, C)`` -> K tensors ``(C, 1)``, broadcastable against ``(N, C, L)``."""
    return t.unsqueeze(-1).unbind(0)


def _component_logits(
    x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, terms: int = 1
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x - mean_k, logit_k)`` for each component in turn, ``x`` ``(N, C, L)``; the logits take ``x`` clamped to
    :func:`~cbnorm._kernels.logit_bounds` (``terms``: how many of them are summed), as the kernels' do."""
    lo, hi = logit_bounds(mean, quad_coef, terms)
    clamped = x.clamp(lo[:, None], hi[:, None])
    for mu, lc, lw in zip(_each_component(mean), _each_component(log_coef), _each_component(quad_coef)):
        p = clamped - mu
        yield x - mu, torch.addcmul(lc, lw * p, p)  # p * p alone may overflow at the bounds


def _map_transform(x: Tensor, mean: Tensor, logits: tuple[Tensor, Tensor], scale: Tensor) -> Tensor:
    r""":math:`s_{k^*}(x - \mu_{k^*})` with :math:`k^* = \arg\max_k \ell_k` per entry (first on ties)."""
    best = y = None
    for (d, logit), s in zip(_component_logits(x, mean, *logits), _each_component(scale)):
        if y is None:
            y, best = d * s, logit
        else:
            better = logit > best
            y, best = torch.where(better, d * s, y), torch.where(better, logit, best)
    return y


def _check_unknown_cluster_rule(unknown: str, posterior: str) -> None:
    if unknown not in UNKNOWN_RULES:
        raise ValueError(f"scb_norm: unknown must be one of {UNKNOWN_RULES}, got {unknown!r}")
    if posterior not in POSTERIOR_SCOPES:
        raise ValueError(f"scb_norm: posterior must be one of {POSTERIOR_SCOPES}, got {posterior!r}")


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
        return sample_norm(x, mean.index_select(0, cluster), var.index_select(0, cluster), weight, bias, eps)
    _check_unknown_cluster_rule(unknown, posterior)
    dtype = compute_dtype(x)
    with _full_precision(x):
        mean, var = mean.to(dtype), var.to(dtype)
        logits = _log_density(None, var, eps)  # uniform priors
        scale = (var + eps).rsqrt()
        if unknown == "paper":
            scale = scale * math.sqrt(mean.shape[0])
        if posterior == "element" and unknown != "map":
            y = _normalize(_channels(x), mean, logits, scale, None, weight, bias)  # one pass, affine map included
        else:
            x3 = _channels(x.to(dtype))
            if posterior == "element":
                y = _map_transform(x3, mean, logits, scale)
            else:
                entries = x3.shape[1] * x3.shape[2]  # each sample's logits are summed over its entries
                log_lik = torch.stack([logit.sum((1, 2)) for _, logit in _component_logits(x3, mean, *logits, entries)])
                log_resp = torch.log_softmax(log_lik, dim=0)  # (K, N)
                if unknown == "map":
                    best = log_resp.argmax(0)
                    return sample_norm(x, mean[best], var[best], weight, bias, eps)
                resp = log_resp.exp()[:, :, None, None]
                y = sum(r * (x3 - mu) * s for r, mu, s in zip(resp, _each_component(mean), _each_component(scale)))
            y = _affine(y, weight, bias)
    return y.reshape(x.shape).to(x.dtype)


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

    One pass over ``x`` (:func:`cbnorm._kernels.mixture_transform`); gradients reach ``x``,
    ``prior``, ``mean``, ``var`` and the affine parameters.

    Shape: ``x`` ``(N, C, *)``; ``prior`` ``(K,)`` or ``(K, C)``; ``mean``, ``var`` ``(K, C)``; output like ``x``.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        prior, mean, var = (t.to(dtype) for t in (prior, mean, var))
        log_prior = _log_prior(prior)
        scale = _mixture_scale(log_prior, var, eps)
        y = _normalize(_channels(x), mean, _log_density(log_prior, var, eps), scale, None, weight, bias)
    return y.reshape(x.shape).to(x.dtype)


def _batch_statistics(
    sums: Tensor, reduce_sums: Optional[Callable[[Tensor], Tensor]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mass, E - mu, V)`` per component from the ``(3, K, C)`` sums about the current means
    (after ``reduce_sums``, the distributed seam); an empty component gets finite placeholders."""
    tiny_mass = torch.finfo(sums.dtype).eps
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    mass, first, second = sums
    safe_mass = mass.clamp_min(tiny_mass)
    shift = first / safe_mass
    return mass, shift, (second / safe_mass - shift.square()).clamp_min(0)


def ucb_norm_batch(
    x: Tensor,
    prior: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    reduce_sums: Optional[Callable[[Tensor], Tensor]] = None,
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

    Two passes over ``x``: one takes the sums :math:`S_{r,k} = \sum_{j\in B_c}\tau_k(x_j)(x_j-\mu_k)^r`,
    ``r = 0, 1, 2`` (moments about the current means, so :math:`V_k` suffers no cancellation); the
    ``(K, C)`` statistics follow from them; the other applies the transform
    (:func:`cbnorm._kernels.normalize_with_moments`). Backward is two passes too -- one reduces, one
    writes the input gradient -- and stores nothing of size ``K x N x C x L``.

    Shape: ``x`` ``(N, C, *)``; ``prior`` ``(K,)`` or ``(K, C)``; ``mean``, ``var`` ``(K, C)``.

    Gradients flow through :math:`\tau`, :math:`E` and :math:`V` (and into ``prior, mean, var`` when
    they require it; as running state they do not). A component whose mass :math:`\sum\tau_k` is below
    float epsilon gets finite placeholder statistics and a negligible weight.

    Args:
        reduce_sums: the distributed seam. A differentiable function applied to the ``(3, K, C)``
            sums :math:`S` before any statistic is formed; an all-reduce over the process group
            (:class:`cbnorm.distributed.GlobalSums`) makes every statistic that of the global
            batch, gradients included, as ``torch.nn.SyncBatchNorm`` does. ``stats.count`` stays the
            local :math:`m`. Default: ``None`` (this process's batch)

    Returns:
        ``(y, stats)``: the output like ``x`` and the detached :class:`ComponentStats` that a
        module folds into its running state.
    """
    dtype = compute_dtype(x)
    with _full_precision(x):
        prior, mean, var = snapshot([t.to(dtype) for t in (prior, mean, var)])
        log_prior = _log_prior(prior)
        logits = _log_density(log_prior, var, eps)

        def coefficients(sums, log_prior, weight, bias):
            mass, shift, batch_var = _batch_statistics(sums, reduce_sums)
            scale = _mixture_scale(log_prior, batch_var, eps)
            return (*_transform_coefficients(scale, shift, weight, bias), (mass, shift, batch_var))

        y, mass, shift, batch_var = normalize_with_moments(
            _channels(x), mean, *logits, coefficients, log_prior, weight, bias)
        count = x.numel() // x.shape[1]
        stats = ComponentStats(mass.detach(), (mean + shift).detach(), batch_var.detach(), count)
    return y.reshape(x.shape).to(x.dtype), stats
