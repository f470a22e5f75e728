"""Plain float64 references written from SPEC.md's formulas: loops over channels and components.

Slow and obvious on purpose; the tests compare the library against these on small inputs.
Every function takes and returns numpy arrays; ``x`` is ``(N, C, L)``.
"""

import math

import numpy as np


def log_normal(x, mu, s2):
    return -0.5 * (math.log(2 * math.pi) + np.log(s2) + (x - mu) ** 2 / s2)


def posteriors(xs, prior, mean_c, var_c, eps):
    """tau_k for the entries ``xs`` of one channel: (K, *xs.shape)."""
    logits = np.stack([math.log(p) + log_normal(xs, m, max(v, eps)) for p, m, v in zip(prior, mean_c, var_c)])
    logits -= logits.max(0)
    w = np.exp(logits)
    return w / w.sum(0)


def sample_norm(x, mean_n, var_n, eps):
    """Eq. 10 with per-sample statistics (N, C)."""
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            y[n, c] = (x[n, c] - mean_n[n, c]) / math.sqrt(var_n[n, c] + eps)
    return y


def scb_unknown(x, mean, var, eps, rule, scope):
    """Eq. 12 and its variants for SCB-Norm with unknown clusters."""
    K, (N, C, _) = mean.shape[0], x.shape
    normalized = np.stack([(x - mean[k][None, :, None]) / np.sqrt(var[k][None, :, None] + eps) for k in range(K)])
    if scope == "element":
        tau = np.empty((K,) + x.shape)
        for c in range(C):
            tau[:, :, c] = posteriors(x[:, c], np.full(K, 1 / K), mean[:, c], var[:, c], eps)
    else:
        loglik = np.array([[log_normal(x[n], mean[k][:, None], np.maximum(var[k], eps)[:, None]).sum()
                            for n in range(N)] for k in range(K)])
        loglik -= loglik.max(0)
        w = np.exp(loglik) / np.exp(loglik).sum(0)
        tau = np.broadcast_to(w[:, :, None, None], (K,) + x.shape)
    if rule == "map":
        return np.take_along_axis(normalized, tau.argmax(0)[None], 0)[0]
    y = (tau * normalized).sum(0)
    return y * math.sqrt(K) if rule == "paper" else y


def channel_prior(prior, c):
    """Priors of channel c from priors shared by the channels (K,) or per channel (K, C)."""
    return prior[:, c] if prior.ndim == 2 else prior


def ucb_eval(x, prior, mean, var, eps):
    """Eq. 15."""
    y = np.zeros_like(x)
    for c in range(x.shape[1]):
        p = channel_prior(prior, c)
        tau = posteriors(x[:, c], p, mean[:, c], var[:, c], eps)
        for k in range(len(p)):
            y[:, c] += tau[k] / math.sqrt(p[k]) * (x[:, c] - mean[k, c]) / math.sqrt(var[k, c] + eps)
    return y


def ucb_train(x, prior, mean, var, eps):
    """Eq. 7-9 with posteriors from (prior, mean, var); returns (y, mass, E, V)."""
    K, C = mean.shape
    y = np.zeros_like(x)
    mass, E, V = np.zeros((K, C)), np.zeros((K, C)), np.zeros((K, C))
    for c in range(C):
        xs, p = x[:, c], channel_prior(prior, c)
        tau = posteriors(xs, p, mean[:, c], var[:, c], eps)
        for k in range(K):
            mass[k, c] = tau[k].sum()
            tau_hat = tau[k] / tau[k].sum()
            E[k, c] = (tau_hat * xs).sum()
            V[k, c] = (tau_hat * (xs - E[k, c]) ** 2).sum()
            y[:, c] += tau[k] / math.sqrt(p[k]) * (xs - E[k, c]) / math.sqrt(V[k, c] + eps)
    return y, mass, E, V


def running_update(prior, mean, var, mass, E, V, count, momentum):
    """SPEC's moving-average step: component statistics, unbiased variance, mean posterior.

    Priors shared by the channels (K,) pool every channel's mass; per-channel priors (K, C) do not.
    """
    batch_prior = mass.sum(1) / mass.sum() if prior.ndim == 1 else mass / mass.sum(0)
    new_prior = (1 - momentum) * prior + momentum * batch_prior
    return (
        new_prior / new_prior.sum(0),
        (1 - momentum) * mean + momentum * E,
        (1 - momentum) * var + momentum * V * count / (count - 1),
    )


def em_1d(xs, prior, mean, var, steps, floor):
    """EM steps of one channel's scalar mixture: weights from n_k + 10 eps (as scikit-learn), means
    and variances from n_k, variances floored at ``floor``; a component with n_k <= eps keeps its
    mean and variance."""
    eps = np.finfo(np.float64).eps
    prior, mean, var = (np.array(t, dtype=np.float64) for t in (prior, mean, var))
    for _ in range(steps):
        tau = posteriors(xs, prior, mean, var, floor)
        for k in range(len(prior)):
            nk = tau[k].sum()
            if nk > eps:
                mean[k] = (tau[k] * xs).sum() / nk
                var[k] = max((tau[k] * (xs - mean[k]) ** 2).sum() / nk, floor)
            prior[k] = nk + 10 * eps
        prior = prior / prior.sum()
    return prior, mean, var
