r"""SCB-Norm's per-sample affine map :math:`y_{n,c,l} = x_{n,c,l} s_{n,c} + t_{n,c}` (Eq. 10), and its backward.

Backward is one pass: :math:`\partial x = g\,s`, :math:`\partial s_{n,c} = \sum_l g\,x`,
:math:`\partial t_{n,c} = \sum_l g`. A program owns whole ``(n, c)`` rows (channels-first: ``ROWS`` of
them, stepping along ``L``; channels-last: ``COLS`` channels of one sample, stepping along its
positions), so each sum is formed by one program in a fixed order, with no second stage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._core import MAX_CHANNELS_PER_TILE, NUM_WARPS, TILE_ELEMENTS, channels_last, check_activations


@triton.jit
def _sample_rows(program, C, num_rows, ROWS: tl.constexpr, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                 WIDE: tl.constexpr):
    """``(row, mask)``: the index ``n * C + c`` of the ``(n, c)`` rows that ``program`` owns, ``[1, COLS]``
    (channels-last: ``COLS`` channels of one sample) or ``[ROWS, 1]`` (channels-first: ``ROWS`` rows)."""
    if CHANNELS_LAST:
        blocks = tl.cdiv(C, COLS)
        sample = program // blocks
        if WIDE:
            sample = sample.to(tl.int64)
        channel = (program % blocks) * COLS + tl.arange(0, COLS)[None, :]
        row = sample * C + channel
        mask = channel < C
    else:
        row = program * ROWS + tl.arange(0, ROWS)[:, None]
        if WIDE:
            row = row.to(tl.int64)
        mask = row < num_rows
    return row, mask


@triton.jit
def _sample_tile(row, row_mask, step, C, L, ROWS: tl.constexpr, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """``(offsets, mask)``, ``[ROWS, COLS]``, of step ``step`` along the rows: ``ROWS`` positions of every
    row (channels-last) or ``COLS`` positions of each (channels-first)."""
    if CHANNELS_LAST:  # row = n * C + c, (n, l, c) at (n * L + l) * C + c
        position = step * ROWS + tl.arange(0, ROWS)[:, None]
        channel = row % C
        offsets = ((row - channel) * L + position * C) + channel
    else:  # (n, c, l) at row * L + l
        position = step * COLS + tl.arange(0, COLS)[None, :]
        offsets = row * L + position
    return offsets, row_mask & (position < L)


@triton.jit
def _scale_shift_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, C, L, num_rows, steps,
    ROWS: tl.constexpr, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr,
):
    row, row_mask = _sample_rows(tl.program_id(0), C, num_rows, ROWS, COLS, CHANNELS_LAST, WIDE)
    scale = tl.load(scale_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    for step in range(steps):
        offsets, mask = _sample_tile(row, row_mask, step, C, L, ROWS, COLS, CHANNELS_LAST)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * scale + shift).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_shift_backward_kernel(
    x_ptr, grad_ptr, scale_ptr, grad_x_ptr, grad_scale_ptr, grad_shift_ptr, C, L, num_rows, steps,
    ROWS: tl.constexpr, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr,
):
    row, row_mask = _sample_rows(tl.program_id(0), C, num_rows, ROWS, COLS, CHANNELS_LAST, WIDE)
    scale = tl.load(scale_ptr + row, mask=row_mask, other=0.0).to(tl.float32)
    grad_x_sum = tl.zeros([ROWS, COLS], tl.float32)
    grad_sum = tl.zeros([ROWS, COLS], tl.float32)
    for step in range(steps):
        offsets, mask = _sample_tile(row, row_mask, step, C, L, ROWS, COLS, CHANNELS_LAST)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + offsets, (grad * scale).to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_x_sum += grad * x
        grad_sum += grad
    if CHANNELS_LAST:
        tl.store(grad_scale_ptr + row, tl.sum(grad_x_sum, axis=0)[None, :], mask=row_mask)
        tl.store(grad_shift_ptr + row, tl.sum(grad_sum, axis=0)[None, :], mask=row_mask)
    else:
        tl.store(grad_scale_ptr + row, tl.sum(grad_x_sum, axis=1)[:, None], mask=row_mask)
        tl.store(grad_shift_ptr + row, tl.sum(grad_sum, axis=1)[:, None], mask=row_mask)


def _launch(kernel, x: Tensor, *tensors: Tensor) -> None:
    batch, channels, length = x.shape
    last = channels_last(x)
    if last:
        cols = min(triton.next_power_of_2(channels), MAX_CHANNELS_PER_TILE)
        rows = max(TILE_ELEMENTS // cols, 1)
        programs, steps = batch * triton.cdiv(channels, cols), triton.cdiv(length, rows)
    else:
        cols = min(triton.next_power_of_2(length), TILE_ELEMENTS)
        rows = TILE_ELEMENTS // cols
        programs, steps = triton.cdiv(batch * channels, rows), triton.cdiv(length, cols)
    kernel[(programs,)](x, *tensors, channels, length, batch * channels, steps,
                        ROWS=rows, COLS=cols, CHANNELS_LAST=last, WIDE=x.numel() >= 2**31, num_warps=NUM_WARPS)


def _check(x: Tensor, scale: Tensor, name: str = "scale") -> None:
    check_activations(x, scale)
    if scale.shape != x.shape[:2]:
        raise ValueError(f"cbnorm: expected {name} of shape {tuple(x.shape[:2])}, got {tuple(scale.shape)}")


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Like ``x`` (dtype and strides); ``scale`` and ``shift`` ``(N, C)``, computed in float32."""
    _check(x, scale)
    _check(x, shift, "shift")
    out = torch.empty_like(x)
    if x.numel():
        _launch(_scale_shift_kernel, x, scale, shift, out)
    return out


def scale_shift_backward(x: Tensor, grad: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x like x, grad_scale, grad_shift like scale)``; ``grad`` has the shape, strides and dtype of ``x``."""
    _check(x, scale)
    if grad.shape != x.shape or grad.stride() != x.stride() or grad.dtype != x.dtype:
        raise ValueError("cbnorm: the incoming gradient must have the shape, strides and dtype of x")
    grad_x, grad_scale, grad_shift = torch.empty_like(x), torch.zeros_like(scale), torch.zeros_like(scale)
    if x.numel():
        _launch(_scale_shift_backward_kernel, x, grad, scale, grad_x, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift
