r"""The backward passes of the mixture operators: one vector-Jacobian product kernel, two launchers.

With :math:`q_k = a_k + b_k d_k + c_k d_k^2` and a per-entry weight :math:`\omega` (one if absent):

* :func:`mixture_transform_backward`: the input gradient
  :math:`\omega \sum_k (\tau_k q_k' + u_k \ell_k')`, :math:`u_k = \tau_k (q_k - \sum_j \tau_j q_j)`,
  :math:`\ell_k' = 2\,\mathrm{quad\_coef}_k\, p_k` (0 beyond the logits' bounds, where :math:`p_k` is constant),
  and the sums :math:`\sum \omega \tau_k d_k^{0,1}` and :math:`\sum \omega u_k p_k^{0,1,2}`, any subset
  (``grad_x=False`` with only the former: the pass of the fused training backward that only reduces);
* :func:`mixture_normalize_backward`: the whole input gradient of a transform ``(wa, wb)`` whose
  coefficients depend on the moments of ``x`` -- the same product with per-entry
  :math:`q_k = \omega (wa_k + wb_k d_k) + g_{0,k} + g_{1,k} d_k + g_{2,k} d_k^2` and no outer weight.

:math:`u_k` is taken about :math:`q_0` (it does not change when every :math:`q_k` moves alike), so what
the :math:`q_k` share is not rounded into it, as in the native kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._core import (
    channel_mixture,
    check_activations,
    load_components,
    plan,
    shape_arguments,
    store_sums,
    sum_splits,
    tile_posteriors,
)


@triton.jit
def _vjp_kernel(
    x_ptr, omega_ptr, mean_ptr, log_coef_ptr, quad_coef_ptr, a_ptr, b_ptr, c_ptr, wa_ptr, wb_ptr, grad_ptr,
    partial_ptr,
    C, L, positions, tiles_per_program,
    K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr,
    HAS_OMEGA: tl.constexpr, HAS_C: tl.constexpr, MIXED: tl.constexpr,
    GRAD: tl.constexpr, TAU_MOMENTS: tl.constexpr, U_MOMENTS: tl.constexpr,
):
    group, split = tl.program_id(0), tl.program_id(1)
    channel, mean, log2_coef, quad_coef, lo, hi = channel_mixture(mean_ptr, log_coef_ptr, quad_coef_ptr, group, C, K,
                                                                  BLOCK_K, COLS, CHANNELS_LAST)
    a = load_components(a_ptr, channel, C, K, BLOCK_K)
    b = load_components(b_ptr, channel, C, K, BLOCK_K)
    if HAS_C:
        c = load_components(c_ptr, channel, C, K, BLOCK_K)
    if MIXED:
        wa = load_components(wa_ptr, channel, C, K, BLOCK_K)
        wb = load_components(wb_ptr, channel, C, K, BLOCK_K)
    first_component = tl.arange(0, BLOCK_K)[:, None, None] == 0
    num_rows = 2 * TAU_MOMENTS + 3 * U_MOMENTS
    tau_0 = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    tau_1 = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    u_0 = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    u_1 = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    u_2 = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    for i in range(tiles_per_program):
        offsets, mask, d, p, e, inverse = tile_posteriors(x_ptr, split * tiles_per_program + i, group, C, L,
                                                          positions, mean, log2_coef, quad_coef, lo, hi, K, BLOCK_K,
                                                          ROWS, COLS, CHANNELS_LAST, WIDE)
        weight = inverse
        if HAS_OMEGA:
            omega = tl.load(omega_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if not MIXED:  # a mixed gradient weights only wa, wb
                weight = omega * inverse
        if TAU_MOMENTS:
            tau = weight[None, :, :] * e
            tau_0 += tau
            tau_1 += tau * d
        if GRAD or U_MOMENTS:
            offset = a
            slope = b
            if MIXED:
                offset = a + omega[None, :, :] * wa
                slope = b + omega[None, :, :] * wb
            if HAS_C:
                q = offset + d * (slope + c * d)
            else:
                q = offset + d * slope
            q = q - tl.sum(tl.where(first_component, q, 0.0), axis=0)[None, :, :]
            mean_q = tl.sum(e * q, axis=0) * inverse
            eu = e * (q - mean_q[None, :, :])  # u_k * total
            if GRAD:
                if HAS_C:
                    dq = slope + 2.0 * c * d
                else:
                    dq = slope
                grad = tl.sum(e * dq + eu * (2.0 * quad_coef * p), axis=0) * weight
                tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            if U_MOMENTS:
                u = weight[None, :, :] * eu
                u_p = u * p
                u_0 += u
                u_1 += u_p
                u_2 += u_p * p
    if TAU_MOMENTS:
        store_sums(partial_ptr, tau_0, 0, num_rows, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
        store_sums(partial_ptr, tau_1, 1, num_rows, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
    if U_MOMENTS:
        row = 2 * TAU_MOMENTS
        store_sums(partial_ptr, u_0, row, num_rows, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
        store_sums(partial_ptr, u_1, row + 1, num_rows, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
        store_sums(partial_ptr, u_2, row + 2, num_rows, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)


def _launch(
    x: Tensor, omega: Tensor | None, coefficients: list[Tensor], c: Tensor | None, mixed: list[Tensor] | None,
    grad_x: bool, tau_moments: bool, u_moments: bool,
) -> tuple[Tensor, Tensor]:
    check_activations(x, *coefficients, *(t for t in (c, *(mixed or ())) if t is not None))
    if omega is not None and (omega.shape != x.shape or omega.stride() != x.stride() or omega.dtype != x.dtype):
        raise ValueError("cbnorm: the incoming gradient must have the shape, strides and dtype of x")
    mean = coefficients[0]
    num_components, channels = mean.shape
    rows = 2 * tau_moments + 3 * u_moments
    grad = torch.empty_like(x) if grad_x else x.new_empty(0)
    if x.numel() == 0:
        return grad, mean.new_zeros(rows, num_components, channels)
    how = plan(x, num_components)
    partial = mean.new_empty(how.splits, rows, num_components, channels, dtype=torch.float32)
    wa, wb = mixed or (mean, mean)  # unread placeholders where absent
    _vjp_kernel[how.grid](
        x, x if omega is None else omega, *coefficients, mean if c is None else c, wa, wb, grad, partial,
        *shape_arguments(x, how), **how.constants(num_components),
        HAS_OMEGA=omega is not None, HAS_C=c is not None, MIXED=mixed is not None,
        GRAD=grad_x, TAU_MOMENTS=tau_moments, U_MOMENTS=u_moments,
    )
    return grad, (sum_splits(partial) if rows else partial[0]).to(mean.dtype)


def mixture_transform_backward(
    x: Tensor, omega: Tensor | None, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor,
    c: Tensor | None, grad_x: bool, tau_moments: bool, u_moments: bool,
) -> tuple[Tensor, Tensor]:
    """``(input gradient or an empty tensor, (2 tau_moments + 3 u_moments, K, C) sums)``; see the module docstring."""
    return _launch(x, omega, [mean, log_coef, quad_coef, a, b], c, None, grad_x, tau_moments, u_moments)


def mixture_normalize_backward(
    x: Tensor, omega: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor,
    sums_grad: Tensor,
) -> Tensor:
    """The input gradient of ``mixture_transform(x, ..., a, b)`` with ``(a, b)`` functions of
    ``S = mixture_moments(x, ...)``: ``omega`` is dL/dy, ``sums_grad`` ``(3, K, C)`` is dL/dS."""
    g0, g1, g2 = sums_grad.contiguous()
    return _launch(x, omega, [mean, log_coef, quad_coef, g0, g1], g2, [a, b], True, False, False)[0]
