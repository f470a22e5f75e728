r"""``mixture_transform``: :math:`\sum_k \tau_k (a_{k,c} + b_{k,c} d_k)`, like ``x``, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._core import channel_mixture, check_activations, load_components, plan, shape_arguments, tile_posteriors


@triton.jit
def _transform_kernel(
    x_ptr, mean_ptr, log_coef_ptr, quad_coef_ptr, a_ptr, b_ptr, out_ptr,
    C, L, positions, tiles_per_program,
    K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr,
):
    group, split = tl.program_id(0), tl.program_id(1)
    channel, mean, log2_coef, quad_coef, lo, hi = channel_mixture(mean_ptr, log_coef_ptr, quad_coef_ptr, group, C, K,
                                                                  BLOCK_K, COLS, CHANNELS_LAST)
    a = load_components(a_ptr, channel, C, K, BLOCK_K)
    b = load_components(b_ptr, channel, C, K, BLOCK_K)
    for i in range(tiles_per_program):
        offsets, mask, d, _, e, inverse = tile_posteriors(x_ptr, split * tiles_per_program + i, group, C, L,
                                                          positions, mean, log2_coef, quad_coef, lo, hi, K, BLOCK_K,
                                                          ROWS, COLS, CHANNELS_LAST, WIDE)
        y = tl.sum(e * (a + b * d), axis=0) * inverse
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def mixture_transform(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Like ``x`` (dtype and strides); ``x`` ``(N, C, L)``, channels-first or channels-last."""
    check_activations(x, mean, log_coef, quad_coef, a, b)
    out = torch.empty_like(x)
    if x.numel():
        how = plan(x, mean.shape[0])
        _transform_kernel[how.grid](
            x, mean, log_coef, quad_coef, a, b, out, *shape_arguments(x, how), **how.constants(mean.shape[0])
        )
    return out
