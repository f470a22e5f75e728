r"""The two passes over the activations behind every mixture layer, as differentiable operators.

Activations ``x`` are ``(N, C, L)``. Every channel ``c`` has ``K`` components with ``(K, C)``
coefficients ``mean``, ``log_coef``, ``quad_coef``; the posterior of component ``k`` at an entry is

.. math::
    d_k = x - \mu_{k,c}, \qquad \ell_k = \mathrm{log\_coef}_{k,c} + \mathrm{quad\_coef}_{k,c}\, p_k^2,
    \qquad \tau_k = \operatorname{softmax}_k \ell_k

(a Gaussian log-density plus log-prior is such a quadratic, written about the mean so that nothing
cancels), with :math:`p_k = \mathrm{clamp}(x, lo_c, hi_c) - \mu_{k,c}`: on :math:`[lo_c, hi_c]`, where
:math:`|\mathrm{quad\_coef}_{k,c}|\,p_k^2` stays below an eighth of the dtype's largest value, :math:`p_k = d_k`;
beyond it (float32 inputs beyond about :math:`10^{19}\sigma`) the posteriors are those at the bound, which is their
limit as :math:`|x|` grows, instead of the NaN of overflowing logits. The operators:

* :func:`mixture_moments` ``(3, K, C)``: :math:`\sum_{n,l} \tau_k d_k^r` for ``r = 0, 1, 2`` -- the
  posterior mass and the first two moments about the means;
* :func:`mixture_transform`, like ``x``: :math:`\sum_k \tau_k (a_{k,c} + b_{k,c} d_k)` -- every
  normalising transform of the library, affine map included, is one of these.

Both recompute :math:`\tau` from ``x`` wherever they need it, in forward and in backward: no tensor
of size ``K x N x C x L`` is ever stored, and backward saves only ``x`` and ``(K, C)`` tensors.
Both backward passes are the same kernel, the vector-Jacobian product of
:math:`\sum_k \tau_k q_k` with :math:`q_k = a_k + b_k d_k + c_k d_k^2` and a per-entry weight
:math:`\omega`:

.. math::
    \frac{\partial}{\partial x} = \omega \sum_k \big(\tau_k q_k' + u_k \ell_k'\big), \quad
    u_k = \tau_k \big(q_k - \textstyle\sum_j \tau_j q_j\big), \quad
    \frac{\partial}{\partial (a, b)_k} = \sum \omega \tau_k d_k^{0,1}, \quad
    \frac{\partial}{\partial \mathrm{log\_coef}_k} = \sum \omega u_k, \quad
    \frac{\partial}{\partial \mathrm{quad\_coef}_k} = \sum \omega u_k d_k^2

(for the moments, ``a, b, c`` are the three rows of the incoming gradient and :math:`\omega = 1`).

:func:`normalize_with_moments` composes the two operators the way UCB-Norm and MN train: a transform
whose coefficients are functions of the batch's moments. Its backward (eager mode, running state as
constants) is one pass that only reduces, :math:`\sum \omega\tau_k d_k^{0,1}` for the
coefficients, then one that writes the whole input gradient: the same vector-Jacobian product with
:math:`q_k = \omega(a_k + b_k d_k) + g_{0,k} + g_{1,k} d_k + g_{2,k} d_k^2`, :math:`g` the gradient of
the moments, and no outer weight -- both paths to ``x`` in one pass instead of two and a sum.

Each operator runs, by ``$CBNORM_KERNELS`` (:mod:`cbnorm._native`) and where ``x`` lives:

* on CUDA, the Triton kernels of :mod:`cbnorm._triton` (float32, float16 and bfloat16 ``x``, at most
  64 components), imported on first use, so that a CPU-only program never imports Triton;
* on CPU, the native kernel of :mod:`cbnorm._native` when it is available (float32/float64, at most
  16 components);
* otherwise its pure-PyTorch twin below: the same formulas vectorised over the components, whose
  ``(K, N, C, L)`` temporaries live only within one call (it also saves only ``x``).

``CBNORM_KERNELS=triton`` forces the Triton kernels wherever they take ``x``: on CPU tensors that
needs ``TRITON_INTERPRET=1`` (Triton's interpreter, how CI tests them). ``x`` may have a lower
precision than the ``(K, C)`` coefficients (float16/bfloat16 with float32 coefficients): the
Triton kernels read it as it is; the others compute on a copy in the coefficients' dtype. Sums come
in the coefficients' dtype, elementwise outputs in ``x``'s. While ``torch.compile`` or ``torch.export``
traces, the operators
are ``torch.library`` custom operators, so layers compile without a graph break; in eager mode the
same implementations and backward formulas run as ``torch.autograd.Function``\ s, which dispatch
faster.

:func:`scale_shift` is the per-sample affine map of SCB-Norm (Eq. 10), with a one-pass backward.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ._native import kernels_mode, native_ops

__all__ = ["logit_bounds", "mixture_moments", "mixture_transform", "normalize_with_moments", "scale_shift", "snapshot"]

_MAX_NATIVE_COMPONENTS = 16
_MAX_TRITON_COMPONENTS = 64
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _layout(x: Tensor) -> Tensor:
    """``x`` itself when stored as ``(N, C, L)`` or ``(N, L, C)`` (channels last), else a contiguous copy."""
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _strided_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` with the strides and dtype of ``x`` (the kernels index both alike); a copy only when they differ."""
    return t if t.stride() == x.stride() and t.dtype == x.dtype else torch.empty_like(x).copy_(t)


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


def _native(x: Tensor, num_components: int = 1):
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if num_components > _MAX_NATIVE_COMPONENTS:
        return None
    return native_ops()


_triton_lock = threading.Lock()
_triton_module = None  # cbnorm._triton once imported, False once it failed to import, None before


def _import_triton(forced: bool):
    global _triton_module
    if _triton_module is None:
        with _triton_lock:
            if _triton_module is None:
                try:
                    from . import _triton

                    _triton_module = _triton
                except ImportError as error:
                    if forced:
                        raise RuntimeError(f"cbnorm: CBNORM_KERNELS=triton, but Triton cannot be imported ({error})")
                    warnings.warn(
                        f"cbnorm: Triton cannot be imported ({error}); CUDA tensors use the pure-PyTorch "
                        f"kernels, which hold K temporaries the size of the input. Install triton.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    _triton_module = False
    if _triton_module is False and forced:
        raise RuntimeError("cbnorm: CBNORM_KERNELS=triton, but Triton cannot be imported (see the warning)")
    return _triton_module or None


def triton_status() -> tuple[bool, str]:
    """Whether the Triton kernels can serve this process's calls, and why; imports nothing."""
    mode = kernels_mode()
    if mode == "eager":
        return False, "off: CBNORM_KERNELS=eager"
    if _triton_module is False or importlib.util.find_spec("triton") is None:
        return False, "Triton cannot be imported (pip install triton)"
    if mode == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false")
        return True, "forced; CPU tensors " + ("in Triton's interpreter" if interpreted else "need TRITON_INTERPRET=1")
    if not torch.cuda.is_available():
        return False, "no CUDA device visible (set CBNORM_KERNELS=triton and TRITON_INTERPRET=1 for CPU tensors)"
    return True, "on CUDA tensors"


def _triton(x: Tensor, num_components: int):
    """:mod:`cbnorm._triton` where it runs ``x``: CUDA tensors, or any under ``CBNORM_KERNELS=triton``."""
    mode = kernels_mode()
    forced = mode == "triton"
    if not forced and (mode == "eager" or x.device.type != "cuda"):
        return None
    if x.dtype not in _TRITON_DTYPES or num_components > _MAX_TRITON_COMPONENTS:
        return None
    kernels = _import_triton(forced)
    if kernels is not None and x.device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "cbnorm: CBNORM_KERNELS=triton got a CPU tensor; the Triton kernels run CPU tensors only in "
            "Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
        )
    return kernels


def _kernels_for(x: Tensor, coefficient: Tensor, num_components: int | None = None):
    """``(kernels, x)``: the Triton kernels and ``x`` as it is, else the native kernels or ``None`` (the
    pure-PyTorch twins) and ``x`` in the dtype of the ``(K, C)`` coefficients; laid out for the kernels."""
    x = _layout(x)
    num_components = coefficient.shape[0] if num_components is None else num_components
    kernels = _triton(x, num_components)
    if kernels is not None:
        return kernels, x
    x = x.to(coefficient.dtype)
    return _native(x, num_components), x


# -- pure-PyTorch kernels: the same passes, vectorised over the components --------------------------
def _components(t: Tensor) -> Tensor:
    """``(K, C)`` -> ``(K, 1, C, 1)``, broadcastable against ``(K, N, C, L)``."""
    return t[:, None, :, None]


def logit_bounds(mean: Tensor, quad_coef: Tensor, terms: int = 1) -> tuple[Tensor, Tensor]:
    r"""``(lo, hi)``, ``(C,)``: where every :math:`|\mathrm{quad\_coef}_k| (x - \mu_k)^2` stays below an eighth of the
    dtype's largest value, divided by ``terms`` (the logits of that many entries summed); infinite where
    ``quad_coef`` is 0. The posteriors take ``x`` clamped to it."""
    # the root of the room over the root of |quad_coef|: their quotient overflows where |quad_coef| < 1/8
    reach = math.sqrt(torch.finfo(quad_coef.dtype).max / (8 * terms)) / quad_coef.abs().sqrt()
    return (mean - reach).amax(0), (mean + reach).amin(0)


def _logit_offsets(x: Tensor, mean: Tensor, quad_coef: Tensor) -> Tensor:
    """``p = clamp(x, lo, hi) - mean``, ``(K, N, C, L)``: the offsets the logits take, which cannot overflow."""
    lo, hi = logit_bounds(mean, quad_coef)
    return x.clamp(lo[:, None], hi[:, None]) - _components(mean)


def _posteriors(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``d = x - mean``, the logits' offsets ``p`` and the posteriors ``tau``, ``(K, N, C, L)``, one call's."""
    d, p = x - _components(mean), _logit_offsets(x, mean, quad_coef)
    # (quad_coef p) p: p * p alone overflows at the bounds where |quad_coef| < 1, as in the native kernel's fmadd
    return d, p, torch.softmax(torch.addcmul(_components(log_coef), _components(quad_coef) * p, p), dim=0)


def _moments(t: Tensor, d: Tensor) -> Tensor:
    """``(3, K, C)``: the sums over ``(n, l)`` of ``t``, ``t d`` and ``t d^2``."""
    td = t * d
    return torch.stack([t.sum((1, 3)), td.sum((1, 3)), (td * d).sum((1, 3))])


def _eager_moments(x, mean, log_coef, quad_coef):
    d, _, tau = _posteriors(x, mean, log_coef, quad_coef)
    return _moments(tau, d)


def _eager_transform(x, mean, log_coef, quad_coef, a, b):
    d, _, tau = _posteriors(x, mean, log_coef, quad_coef)
    return _strided_like((tau * torch.addcmul(_components(a), _components(b), d)).sum(0), x)


def _vjp_terms(tau: Tensor, d: Tensor, p: Tensor, quad_coef: Tensor, a, b, c) -> tuple[Tensor, Tensor]:
    r"""``(u, tau q' + u logit')`` of :math:`\sum_k \tau_k q_k`, :math:`q_k = a_k + b_k d_k + c_k d_k^2`, per component.

    Beyond the clamp of the logits the posteriors are one-hot, so :math:`u = 0` there exactly."""
    q = a + d * (b + c * d)
    q = q - q[:1]  # u is unchanged, and what the q_k share is not rounded into it (as in the native kernel)
    u = tau * (q - (tau * q).sum(0))
    return u, tau * (b + 2 * c * d) + 2 * _components(quad_coef) * p * u


def _eager_transform_backward(x, omega, mean, log_coef, quad_coef, a, b, c, grad_x, tau_moments, u_moments):
    d, p, tau = _posteriors(x, mean, log_coef, quad_coef)
    c = torch.zeros_like(a) if c is None else c
    u, terms = _vjp_terms(tau, d, p, quad_coef, *(_components(t) for t in (a, b, c)))
    weight = 1 if omega is None else omega
    moments = [_moments(weight * t, r)[:rows] for t, r, rows, wanted in ((tau, d, 2, tau_moments), (u, p, 3, u_moments))
               if wanted]
    return (
        _strided_like(weight * terms.sum(0), x) if grad_x else x.new_empty(0),
        torch.cat(moments) if moments else x.new_empty(0, *mean.shape),
    )


def _eager_normalize_backward(x, omega, mean, log_coef, quad_coef, a, b, sums_grad):
    d, p, tau = _posteriors(x, mean, log_coef, quad_coef)
    g0, g1, g2 = (_components(t) for t in sums_grad)
    _, terms = _vjp_terms(tau, d, p, quad_coef, omega * _components(a) + g0, omega * _components(b) + g1, g2)
    return _strided_like(terms.sum(0), x)


# -- operators -------------------------------------------------------------------------------------
# Each operator is an implementation (native kernel or pure-PyTorch twin) with an analytic backward,
# exposed twice: as a torch.library custom operator, which torch.compile traces without a graph break,
# and as an autograd.Function, which eager mode calls because the custom operator's Python dispatch
# costs more than a small layer's kernels. Both run the same implementations and backward formulas.
def _moments_impl(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor) -> Tensor:
    kernels, x = _kernels_for(x, mean)
    args = (x, *_contiguous(mean, log_coef, quad_coef))
    return kernels.mixture_moments(*args) if kernels else _eager_moments(*args)


def _transform_impl(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor) -> Tensor:
    kernels, computed = _kernels_for(x, mean)
    args = (computed, *_contiguous(mean, log_coef, quad_coef, a, b))
    return (kernels.mixture_transform(*args) if kernels else _eager_transform(*args)).to(x.dtype)


def _transform_backward_impl(
    x: Tensor,
    omega: Optional[Tensor],
    mean: Tensor,
    log_coef: Tensor,
    quad_coef: Tensor,
    a: Tensor,
    b: Tensor,
    c: Optional[Tensor],
    grad_x: bool,
    tau_moments: bool,
    u_moments: bool,
) -> tuple[Tensor, Tensor]:
    kernels, computed = _kernels_for(x, mean)
    omega = None if omega is None else _strided_like(omega, computed)
    c = None if c is None else c.contiguous()
    kernel = kernels.mixture_transform_backward if kernels else _eager_transform_backward
    coefficients = _contiguous(mean, log_coef, quad_coef, a, b)
    grad, sums = kernel(computed, omega, *coefficients, c, grad_x, tau_moments, u_moments)
    return grad.to(x.dtype), sums


def _normalize_backward_impl(
    x: Tensor, omega: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor, sums_grad: Tensor
) -> Tensor:
    kernels, computed = _kernels_for(x, mean)
    coefficients = _contiguous(mean, log_coef, quad_coef, a, b, sums_grad)
    kernel = kernels.mixture_normalize_backward if kernels else _eager_normalize_backward
    return kernel(computed, _strided_like(omega, computed), *coefficients).to(x.dtype)


def _scale_shift_impl(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    kernels, computed = _kernels_for(x, scale, 1)
    if kernels is not None and kernels is _triton_module:
        return kernels.scale_shift(computed, *_contiguous(scale, shift))
    return torch.addcmul(shift.unsqueeze(-1), computed, scale.unsqueeze(-1)).to(x.dtype)


def _scale_shift_backward_impl(x: Tensor, grad: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    kernels, computed = _kernels_for(x, scale, 1)
    grad, scale = _strided_like(grad, computed), scale.contiguous()
    if kernels:
        grad_x, grad_scale, grad_shift = kernels.scale_shift_backward(computed, grad, scale)
    else:
        grad_x, grad_scale, grad_shift = grad * scale.unsqueeze(-1), (grad * computed).sum(2), grad.sum(2)
    return grad_x.to(x.dtype), grad_scale, grad_shift


_moments_op = torch.library.custom_op("cbnorm::mixture_moments", _moments_impl, mutates_args=())
_transform_op = torch.library.custom_op("cbnorm::mixture_transform", _transform_impl, mutates_args=())
_transform_backward_op = torch.library.custom_op(
    "cbnorm::mixture_transform_backward", _transform_backward_impl, mutates_args=()
)
_scale_shift_op = torch.library.custom_op("cbnorm::scale_shift", _scale_shift_impl, mutates_args=())
_scale_shift_backward_op = torch.library.custom_op(
    "cbnorm::scale_shift_backward", _scale_shift_backward_impl, mutates_args=()
)


@_moments_op.register_fake
def _(x, mean, log_coef, quad_coef):
    return mean.new_empty(3, *mean.shape)


@_transform_op.register_fake
def _(x, mean, log_coef, quad_coef, a, b):
    return torch.empty_like(_layout(x))


@_transform_backward_op.register_fake
def _(x, omega, mean, log_coef, quad_coef, a, b, c, grad_x, tau_moments, u_moments):
    rows = 2 * tau_moments + 3 * u_moments
    return torch.empty_like(_layout(x)) if grad_x else x.new_empty(0), mean.new_empty(rows, *mean.shape)


@_scale_shift_op.register_fake
def _(x, scale, shift):
    return torch.empty_like(_layout(x))


@_scale_shift_backward_op.register_fake
def _(x, grad, scale):
    return torch.empty_like(_layout(x)), torch.empty_like(scale), torch.empty_like(scale)


def _traced(x: Tensor) -> bool:
    """Whether torch.compile, export or a fake-tensor trace is running: then the custom operators,
    which those understand, else the plain implementations, which dispatch faster."""
    return torch.compiler.is_compiling() or type(x) not in (torch.Tensor, torch.nn.Parameter)


def _coefficient_grads(ctx, x, omega, mean, log_coef, quad_coef, a, b, c):
    """Gradients to ``x, mean, log_coef, quad_coef`` and the moments of ``omega tau d^r``."""
    need_x, need_mean, need_log, need_quad = ctx.needs_input_grad[:4]
    need_tau = any(ctx.needs_input_grad[4:]) or need_mean
    need_u = need_mean or need_log or need_quad
    backward = _transform_backward_op if _traced(x) else _transform_backward_impl
    grad_x, moments = backward(x, omega, mean, log_coef, quad_coef, a, b, c, need_x, need_tau, need_u)
    tau = moments[:2] if need_tau else None
    u = moments[-3:] if need_u else None
    grad_mean = None
    if need_mean:  # d/dmu_k = -sum omega (tau_k q_k' + u_k logit_k')
        grad_mean = -(b * tau[0] + 2 * quad_coef * u[1])
        if c is not None:
            grad_mean = grad_mean - 2 * c * tau[1]
    return (
        grad_x if need_x else None,
        grad_mean,
        u[0] if need_log else None,
        u[2] if need_quad else None,
        tau,
    )


def _moments_backward(ctx, grad):
    x, mean, log_coef, quad_coef = ctx.saved_tensors
    # The moments are sum_k tau_k q_k summed over the batch, with q_k = grad[0] + grad[1] d + grad[2] d^2.
    return _coefficient_grads(ctx, x, None, mean, log_coef, quad_coef, grad[0], grad[1], grad[2])[:4]


def _transform_backward(ctx, grad):
    x, mean, log_coef, quad_coef, a, b = ctx.saved_tensors
    *grads, tau = _coefficient_grads(ctx, x, grad, mean, log_coef, quad_coef, a, b, None)
    need_a, need_b = ctx.needs_input_grad[4:]
    return (*grads, tau[0] if need_a else None, tau[1] if need_b else None)


def _scale_shift_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    backward = _scale_shift_backward_op if _traced(x) else _scale_shift_backward_impl
    return tuple(g if need else None for g, need in zip(backward(x, grad, scale), ctx.needs_input_grad))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _save_x_and_scale(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:2])


_moments_op.register_autograd(_moments_backward, setup_context=_save_inputs)
_transform_op.register_autograd(_transform_backward, setup_context=_save_inputs)
_scale_shift_op.register_autograd(_scale_shift_backward, setup_context=_save_x_and_scale)


def _eager_function(name: str, impl, backward, setup_context) -> type:
    """The autograd.Function that eager mode calls: the same implementation and backward as the operator."""

    def forward(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return impl(*inputs)

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_Moments = _eager_function("_Moments", _moments_impl, _moments_backward, _save_inputs)
_Transform = _eager_function("_Transform", _transform_impl, _transform_backward, _save_inputs)
_ScaleShift = _eager_function("_ScaleShift", _scale_shift_impl, _scale_shift_backward, _save_x_and_scale)


class _NormalizeWithMoments(torch.autograd.Function):
    """:func:`normalize_with_moments` in eager mode: the composition of the two operators, whose backward
    is one pass that only reduces (the gradients of the transform's coefficients) and one that writes
    the whole input gradient, both paths at once; the composition's takes two of each and a sum."""

    @staticmethod
    def forward(ctx, x, mean, log_coef, quad_coef, coefficients, *inputs):
        sums = _moments_impl(x, mean, log_coef, quad_coef)
        # The (K, C) algebra from the sums to the coefficients is recorded on detached leaves here and
        # differentiated in backward, so it may be anything differentiable: an all-reduce included.
        needs = ctx.needs_input_grad
        leaves = [sums.requires_grad_(needs[0])]
        leaves += [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, needs[5:])]
        with torch.enable_grad():
            a, b, extras = coefficients(*leaves)
        ctx.graph = (a, b, leaves)
        a, b = a.detach(), b.detach()
        ctx.save_for_backward(x, mean, log_coef, quad_coef, a, b)
        extras = tuple(t.detach() for t in extras)
        ctx.mark_non_differentiable(*extras)
        return (_transform_impl(x, mean, log_coef, quad_coef, a, b), *extras)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *_):
        x, mean, log_coef, quad_coef, a, b = ctx.saved_tensors
        a_graph, b_graph, leaves = ctx.graph
        # d/da_k = sum omega tau_k and d/db_k = sum omega tau_k d_k: the pass that only reduces.
        _, tau = _transform_backward_impl(x, grad, mean, log_coef, quad_coef, a, b, None, False, True, False)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        # retain_graph: (K, C) tensors only, and the outer backward may be run again (retain_graph there)
        found = iter(torch.autograd.grad((a_graph, b_graph), wanted, tuple(tau), retain_graph=True, allow_unused=True))
        sums_grad, *input_grads = [next(found) if t is not None and t.requires_grad else None for t in leaves]
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums_grad = x.new_zeros(3, *mean.shape) if sums_grad is None else sums_grad
            grad_x = _normalize_backward_impl(x, grad, mean, log_coef, quad_coef, a, b, sums_grad)
        return (grad_x, None, None, None, None, *input_grads)


def _call(op, function, x: Tensor, *inputs) -> Tensor:
    return op(x, *inputs) if _traced(x) else function.apply(x, *inputs)


def mixture_moments(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor) -> Tensor:
    r"""``(3, K, C)``: :math:`\sum_{n,l}\tau_k d_k^r` for ``r = 0, 1, 2``, differentiable in every input."""
    return _call(_moments_op, _Moments, x, mean, log_coef, quad_coef)


def mixture_transform(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\sum_k \tau_k (a_{k,c} + b_{k,c} d_k)`, like ``x``, differentiable in every input."""
    return _call(_transform_op, _Transform, x, mean, log_coef, quad_coef, a, b)


def normalize_with_moments(
    x: Tensor,
    mean: Tensor,
    log_coef: Tensor,
    quad_coef: Tensor,
    coefficients: Callable[..., tuple[Tensor, Tensor, tuple[Tensor, ...]]],
    *inputs: Optional[Tensor],
) -> tuple[Tensor, ...]:
    r"""``(y, *extras)``: a mixture transform whose coefficients are functions of the batch's moments.

    ``(a, b, extras) = coefficients(mixture_moments(x, mean, log_coef, quad_coef), *inputs)``, then
    ``y = mixture_transform(x, mean, log_coef, quad_coef, a, b)``; ``extras`` come back detached.
    Every tensor the coefficients depend on must come through ``inputs`` (``None`` allowed): only those
    receive gradients. In eager mode, when ``mean``, ``log_coef`` and ``quad_coef`` need no gradient
    (running state), the backward takes one pass over ``x`` fewer than the composition, which runs
    otherwise (and while tracing).
    """
    fused = (
        torch.is_grad_enabled()
        and not _traced(x)
        and not any(t.requires_grad for t in (mean, log_coef, quad_coef))
        and any(t is not None and t.requires_grad for t in (x, *inputs))
    )
    if fused:
        return _NormalizeWithMoments.apply(x, mean, log_coef, quad_coef, coefficients, *inputs)
    a, b, extras = coefficients(mixture_moments(x, mean, log_coef, quad_coef), *inputs)
    return (mixture_transform(x, mean, log_coef, quad_coef, a, b), *extras)


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    r""":math:`x_{n,c,l}\,s_{n,c} + t_{n,c}` for ``x`` ``(N, C, L)``; backward is one pass over ``x``."""
    return _call(_scale_shift_op, _ScaleShift, x, scale, shift)


@torch.library.custom_op("cbnorm::snapshot", mutates_args=())
def _snapshot_op(tensors: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in tensors]


@_snapshot_op.register_fake
def _(tensors):
    return [torch.empty_like(t) for t in tensors]


_snapshot_op.register_autograd(lambda ctx, grads: list(grads), setup_context=lambda ctx, inputs, output: None)


def snapshot(tensors: list[Tensor]) -> list[Tensor]:
    """Differentiable copies of ``tensors``, for state that the caller updates in place before backward.

    Under ``torch.compile`` an opaque operator, so that the compiled graph saves the copies for
    backward instead of re-deriving them from the originals, which by then hold the updated values.
    """
    return _snapshot_op(tensors) if _traced(tensors[0]) else [t.clone() for t in tensors]
