"""What the Triton kernels share: the tiling of ``(N, C, L)`` activations, the posteriors, the split sums.

A mixture kernel runs on a grid ``(groups, splits)``. A *group* is one channel (channels-first: a
channel's entries are rows of ``L`` contiguous values, one per sample, and a tile is a run of them
across rows) or ``COLS`` consecutive channels (channels-last: every position holds ``C`` contiguous
values, and a tile is ``ROWS`` positions). A group's entries are cut into tiles of ``ROWS x COLS``;
*split* ``s`` takes ``tiles_per_program`` consecutive tiles, so a
channel's sums over ``N * L`` are spread over ``splits`` programs. Each program writes its partial
sums to its own slot of a ``(splits, rows, K, C)`` buffer, which :func:`sum_splits` then adds in a
fixed order: no atomics, and the same input gives the same bits on every run.

Components are a tile axis of ``BLOCK_K`` (the next power of two of ``K``), masked beyond ``K``:
each entry's ``K`` logits, their maximum and the exponentials are computed once per pass, as the
native CPU kernels do (``csrc/kernels.cpp``), and none of it outlives the tile. The logits take the
offsets ``p = clamp(x, lo, hi) - mean`` with the channel's bounds of :func:`cbnorm._kernels.logit_bounds`,
computed by each program from the coefficients it loads: every finite input gives finite posteriors.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: the kernels may read it
# The logits take |quad_coef| p^2 up to an eighth of float32's largest value (cbnorm._kernels.logit_bounds):
# |p| up to ROOT_LOGIT_ROOM / sqrt(|quad_coef|). exp2 of what is below MIN_EXPONENT, a subnormal, is 0 (as in the
# native kernel), so that the posteriors of entries beyond the bounds are exactly one-hot.
ROOT_LOGIT_ROOM = tl.constexpr(math.sqrt(torch.finfo(torch.float32).max / 8))
MIN_EXPONENT = tl.constexpr(-126.0)

# Components x entries in one tile, and the warps that hold it: 8 values per thread per tile-sized
# temporary, of which the backward pass keeps about a dozen live.
TILE_ELEMENTS = 2048
NUM_WARPS = 8
# Programs a pass aims for: enough to fill the GPU several times over (per streaming multiprocessor);
# on CPU tensors (the interpreter) a few, which still split every channel's sums.
PROGRAMS_PER_MULTIPROCESSOR = 4
INTERPRETER_PROGRAMS = 4
# Channels-last: channels per program (a tile's contiguous run).
MAX_CHANNELS_PER_TILE = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def channels_last(x: Tensor) -> bool:
    """Whether ``(N, C, L)`` ``x`` is stored as ``(N, L, C)``; a tensor that is both prefers the longer run."""
    return x.transpose(1, 2).is_contiguous() and (not x.is_contiguous() or x.shape[2] == 1)


def check_activations(x: Tensor, *coefficients: Tensor, name: str = "x") -> None:
    """The layout, dtype and device contract of every launcher (what ``cbnorm._kernels`` prepares)."""
    if x.dim() != 3 or not (x.is_contiguous() or x.transpose(1, 2).is_contiguous()):
        raise ValueError(f"cbnorm: expected {name} of shape (N, C, L), contiguous as (N, C, L) or (N, L, C), "
                         f"got shape {tuple(x.shape)} with strides {x.stride()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cbnorm: the Triton kernels take float32, float16 or bfloat16 {name}, got {x.dtype}")
    for t in coefficients:
        if not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"cbnorm: expected contiguous coefficients on {x.device}, got strides {t.stride()} "
                             f"on {t.device}")


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_MULTIPROCESSOR * _multiprocessors(device)
    return INTERPRETER_PROGRAMS


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one mixture pass tiles ``x`` and splits its channels' sums (see the module docstring)."""

    groups: int
    splits: int
    tiles_per_program: int
    block_k: int
    rows: int
    cols: int
    channels_last: bool
    wide: bool  # int64 offsets

    @property
    def grid(self) -> tuple[int, int]:
        return self.groups, self.splits

    def constants(self, num_components: int) -> dict:
        """The compile-time arguments every mixture kernel takes, and its launch options."""
        return {"K": num_components, "BLOCK_K": self.block_k, "ROWS": self.rows, "COLS": self.cols,
                "CHANNELS_LAST": self.channels_last, "WIDE": self.wide, "num_warps": NUM_WARPS}


def plan(x: Tensor, num_components: int) -> Plan:
    batch, channels, length = x.shape
    block_k = triton.next_power_of_2(num_components)
    entries = max(TILE_ELEMENTS // block_k, 16)
    last = channels_last(x)
    if last:
        cols = min(triton.next_power_of_2(channels), MAX_CHANNELS_PER_TILE, entries)
        rows = entries // cols
        groups, tiles = triton.cdiv(channels, cols), triton.cdiv(batch * length, rows)
    else:  # one tile shape for every L: fewer kernels to compile
        rows, cols = 1, entries
        groups, tiles = channels, triton.cdiv(batch * length, entries)
    splits = max(min(triton.cdiv(_target_programs(x.device), groups), tiles), 1)
    per_program = max(triton.cdiv(tiles, splits), 1)
    return Plan(groups, triton.cdiv(tiles, per_program) or 1, per_program, block_k, rows, cols, last,
                wide=x.numel() >= 2**31)


def shape_arguments(x: Tensor, plan: Plan) -> tuple[int, ...]:
    """The runtime arguments every mixture kernel takes after its pointers."""
    batch, channels, length = x.shape
    return channels, length, batch * length, plan.tiles_per_program


@triton.jit
def tile_channels(group, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """``[COLS]``: the channel of each column of a group's tiles."""
    if CHANNELS_LAST:
        channel = group * COLS + tl.arange(0, COLS)
    else:
        channel = group + tl.zeros([COLS], tl.int32)
    return channel


@triton.jit
def tile_offsets(tile, group, C, L, positions, ROWS: tl.constexpr, COLS: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr):
    """``(offsets, mask)``, ``[ROWS, COLS]``, of tile ``tile`` of group ``group``; a tile past the end is all masked."""
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, COLS)[None, :]
    if CHANNELS_LAST:  # (n, l, c) at p * C + c, p = n * L + l
        position = tile * ROWS + rows
        if WIDE:
            position = position.to(tl.int64)
        channel = group * COLS + cols
        offsets = position * C + channel
        mask = (position < positions) & (channel < C)
    else:  # (n, c, l) at (n * C + c) * L + l; a tile is a run of p = n * L + l, rows running across samples
        index = tile * (ROWS * COLS) + rows * COLS + cols
        if WIDE:
            index = index.to(tl.int64)
        sample = index // L
        offsets = (sample * C + group) * L + (index - sample * L)
        mask = index < positions
    return offsets, mask


@triton.jit
def load_components(pointer, channel, C, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_K, 1, COLS]`` float32: a ``(K, C)`` coefficient at every component and column.

    Zero past ``K``, ``C``.
    """
    component = tl.arange(0, BLOCK_K)[:, None]
    mask = (component < K) & (channel[None, :] < C)
    values = tl.load(pointer + component * C + channel[None, :], mask=mask, other=0.0)
    return values.to(tl.float32)[:, None, :]


@triton.jit
def channel_mixture(mean_ptr, log_coef_ptr, quad_coef_ptr, group, C, K: tl.constexpr, BLOCK_K: tl.constexpr,
                    COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """``(channel, mean, log2_coef, quad_coef, lo, hi)``: the group's channels ``[COLS]``, their components'
    coefficients ``[BLOCK_K, 1, COLS]``, ``log_coef`` in base 2 (times log2(e)) for ``exp2``, and the bounds
    ``[1, COLS]`` that ``x`` is clamped to in the logits: where every ``|quad_coef_k| (x - mean_k)^2`` stays
    below an eighth of float32's largest value, infinite where ``quad_coef`` is 0 (components past ``K`` included)."""
    channel = tile_channels(group, COLS, CHANNELS_LAST)
    mean = load_components(mean_ptr, channel, C, K, BLOCK_K)
    log2_coef = load_components(log_coef_ptr, channel, C, K, BLOCK_K) * LOG2E
    quad_coef = load_components(quad_coef_ptr, channel, C, K, BLOCK_K)
    curved = quad_coef != 0.0
    reach = tl.where(curved, tl.rsqrt(tl.where(curved, tl.abs(quad_coef), 1.0)) * ROOT_LOGIT_ROOM, float("inf"))
    return channel, mean, log2_coef, quad_coef, tl.max(mean - reach, axis=0), tl.min(mean + reach, axis=0)


@triton.jit
def tile_posteriors(x_ptr, tile, group, C, L, positions, mean, log2_coef, quad_coef, lo, hi, K: tl.constexpr,
                    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    WIDE: tl.constexpr):
    """``(offsets, mask, d, p, e, inverse)`` of tile ``tile``: its ``[ROWS, COLS]`` entries' offsets and mask,
    ``d = x - mean``, the logits' offsets ``p = clamp(x, lo, hi) - mean`` and ``e = tau * total``,
    ``[BLOCK_K, ROWS, COLS]``, and ``inverse = 1 / total``, ``[ROWS, COLS]``, zero on masked entries.
    Components past ``K`` get ``e = 0``."""
    offsets, mask = tile_offsets(tile, group, C, L, positions, ROWS, COLS, CHANNELS_LAST, WIDE)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    present = tl.arange(0, BLOCK_K)[:, None, None] < K
    d = x[None, :, :] - mean
    p = tl.minimum(tl.maximum(x, lo), hi)[None, :, :] - mean
    logit = tl.where(present, log2_coef + (quad_coef * LOG2E) * p * p, float("-inf"))
    exponent = logit - tl.max(logit, axis=0)[None, :, :]
    e = tl.where(exponent < MIN_EXPONENT, 0.0, tl.exp2(exponent))
    inverse = tl.where(mask, 1.0 / tl.sum(e, axis=0), 0.0)
    return offsets, mask, d, p, e, inverse


@triton.jit
def store_sums(pointer, sums, row, num_rows, split, group, channel, C,
               K: tl.constexpr, BLOCK_K: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Adds ``sums`` ``[BLOCK_K, ROWS, COLS]`` over its entries into row ``row`` of this program's slot
    ``(split, row, K, C)`` of the partial-sum buffer."""
    component = tl.arange(0, BLOCK_K)[:, None]
    base = pointer + ((split * num_rows + row) * K + component) * C
    total = tl.sum(sums, axis=1)
    if CHANNELS_LAST:
        tl.store(base + channel[None, :], total, mask=(component < K) & (channel[None, :] < C))
    else:
        tl.store(base + group, tl.sum(total, axis=1)[:, None], mask=component < K)


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, splits, size, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < size
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(splits):
        total += tl.load(partial_ptr + split * size + index, mask=mask, other=0.0)
    tl.store(out_ptr + index, total, mask=mask)


def sum_splits(partial: Tensor) -> Tensor:
    """``partial.sum(0)`` in a fixed order (split 0, 1, ...): the second stage of every reduction."""
    if partial.shape[0] == 1:
        return partial[0]
    out = partial.new_empty(partial.shape[1:])
    size, block = out.numel(), 1024
    _sum_splits_kernel[(triton.cdiv(size, block),)](partial, out, partial.shape[0], size, BLOCK=block)
    return out
