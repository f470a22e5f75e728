r"""``mixture_moments``: :math:`\sum_{n,l} \tau_k d_k^r`, ``r = 0, 1, 2``, per component and channel, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._core import channel_mixture, check_activations, plan, shape_arguments, store_sums, sum_splits, tile_posteriors


@triton.jit
def _moments_kernel(
    x_ptr, mean_ptr, log_coef_ptr, quad_coef_ptr, partial_ptr,
    C, L, positions, tiles_per_program,
    K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr,
):
    group, split = tl.program_id(0), tl.program_id(1)
    channel, mean, log2_coef, quad_coef, lo, hi = channel_mixture(mean_ptr, log_coef_ptr, quad_coef_ptr, group, C, K,
                                                                  BLOCK_K, COLS, CHANNELS_LAST)
    mass = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    first = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    second = tl.zeros([BLOCK_K, ROWS, COLS], tl.float32)
    for i in range(tiles_per_program):
        _, _, d, _, e, inverse = tile_posteriors(x_ptr, split * tiles_per_program + i, group, C, L, positions,
                                                 mean, log2_coef, quad_coef, lo, hi, K, BLOCK_K, ROWS, COLS,
                                                 CHANNELS_LAST, WIDE)
        tau = e * inverse[None, :, :]
        tau_d = tau * d
        mass += tau
        first += tau_d
        second += tau_d * d
    store_sums(partial_ptr, mass, 0, 3, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
    store_sums(partial_ptr, first, 1, 3, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)
    store_sums(partial_ptr, second, 2, 3, split, group, channel, C, K, BLOCK_K, CHANNELS_LAST)


def mixture_moments(x: Tensor, mean: Tensor, log_coef: Tensor, quad_coef: Tensor) -> Tensor:
    """``(3, K, C)`` in ``mean.dtype``; ``x`` ``(N, C, L)``, channels-first or channels-last, any supported dtype."""
    check_activations(x, mean, log_coef, quad_coef)
    num_components, channels = mean.shape
    if x.numel() == 0:
        return mean.new_zeros(3, num_components, channels)
    how = plan(x, num_components)
    partial = mean.new_empty(how.splits, 3, num_components, channels, dtype=torch.float32)
    _moments_kernel[how.grid](
        x, mean, log_coef, quad_coef, partial, *shape_arguments(x, how), **how.constants(num_components)
    )
    return sum_splits(partial).to(mean.dtype)
