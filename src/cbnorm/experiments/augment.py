"""Weak and strong augmentation of uint8 image batches for AdaMatch, batched and seeded.

``weak``: a random translation by up to ``padding`` pixels (a crop of the zero-padded image); no
flips, since the digit data sets are not mirror-symmetric (the Keras example the paper followed
flips; AdaMatch's own digit experiments do not).

``strong``: RandAugment as FixMatch and AdaMatch use it ("RA"): two operations per image drawn
uniformly from the 14 below, each with a magnitude drawn uniformly from its range (FixMatch,
Table 12), then Cutout of a random square of up to half the image side filled with grey 127.

=============  ============================  =============  ============================
operation      magnitude                     operation      magnitude
=============  ============================  =============  ============================
Identity       —                             Posterize      4 to 8 bits
AutoContrast   —                             Rotate         -30 to 30 degrees
Brightness     factor 0.05 to 0.95           Sharpness      factor 0.05 to 0.95
Color          factor 0.05 to 0.95           ShearX, ShearY -0.3 to 0.3
Contrast       factor 0.05 to 0.95           Solarize       threshold 0 to 255
Equalize       —                             TranslateX, Y  -30% to 30% of the side
=============  ============================  =============  ============================

Enhancement factors blend with a degenerate image as PIL's ``ImageEnhance`` does (black for
Brightness, the grey image for Color, its mean grey for Contrast, a 3 x 3 smoothing for
Sharpness); geometric operations resample bilinearly and fill with black. Every random draw comes
from the ``generator`` passed in, so a batch is reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .data import random_crop_flip

__all__ = ["OPERATIONS", "strong", "weak"]


def weak(images: Tensor, generator: torch.Generator, padding: int = 2) -> Tensor:
    """A random translation of each uint8 image by up to ``padding`` pixels in each direction."""
    return random_crop_flip(images, padding, False, generator)


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (PIL's ``convert("L")``), ``(B, 1, H, W)``."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    return degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)


def _factor(v: Tensor) -> Tensor:
    return 0.05 + 0.9 * v


def _autocontrast(x: Tensor, v: Tensor) -> Tensor:
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scaled = (x - low) * 255 / (high - low).clamp(min=1)
    return torch.where(high > low, scaled, x)


def _equalize(x: Tensor, v: Tensor) -> Tensor:
    """Per image and channel, level ``l`` to ``255 (cdf(l) - cdf_min) / (n - cdf_min)``; a one-level channel stays."""
    b, c, h, w = x.shape
    levels = x.round().long().clamp(0, 255).view(b * c, h * w)
    ones = torch.ones_like(x).view(b * c, -1)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(1, levels, ones)
    cdf = hist.cumsum(1)
    cdf_min = hist.gather(1, levels.min(1, keepdim=True).values)
    lut = ((cdf - cdf_min) * 255 / (h * w - cdf_min).clamp(min=1)).round()
    flat = torch.where(cdf_min < h * w, lut.gather(1, levels), levels.to(x.dtype))
    return flat.view(b, c, h, w)


def _sharpness(x: Tensor, v: Tensor) -> Tensor:
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    c = x.shape[1]
    smooth = F.conv2d(x, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
    smooth[..., [0, -1], :], smooth[..., :, [0, -1]] = x[..., [0, -1], :], x[..., :, [0, -1]]  # PIL keeps the border
    return _blend(smooth, x, _factor(v))


def _posterize(x: Tensor, v: Tensor) -> Tensor:
    step = 2.0 ** (8 - (4 + (4 * v).round())).view(-1, 1, 1, 1)
    return (x / step).floor() * step


def _solarize(x: Tensor, v: Tensor) -> Tensor:
    return torch.where(x >= (256 * v).view(-1, 1, 1, 1), 255 - x, x)


def _affine(x: Tensor, matrix: Tensor) -> Tensor:
    """Resample each image at ``matrix @ [u, v, 1]`` (normalised coordinates), black outside."""
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric(kind: str):
    def op(x: Tensor, v: Tensor) -> Tensor:
        b = len(x)
        m = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
        m[:, 0, 0] = m[:, 1, 1] = 1
        signed = 2 * v - 1  # uniform in [-1, 1]
        if kind == "rotate":
            angle = signed * math.radians(30)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        elif kind == "shear_x":
            m[:, 0, 1] = 0.3 * signed
        elif kind == "shear_y":
            m[:, 1, 0] = 0.3 * signed
        elif kind == "translate_x":
            m[:, 0, 2] = 2 * 0.3 * signed  # normalised coordinates span 2
        else:
            m[:, 1, 2] = 2 * 0.3 * signed
        return _affine(x, m)

    return op


OPERATIONS = {
    "identity": lambda x, v: x,
    "autocontrast": _autocontrast,
    "brightness": lambda x, v: _blend(torch.zeros_like(x), x, _factor(v)),
    "color": lambda x, v: _blend(_grey(x).expand_as(x), x, _factor(v)),
    "contrast": lambda x, v: _blend(_grey(x).mean((2, 3), keepdim=True).expand_as(x), x, _factor(v)),
    "equalize": _equalize,
    "posterize": _posterize,
    "rotate": _geometric("rotate"),
    "sharpness": _sharpness,
    "shear_x": _geometric("shear_x"),
    "shear_y": _geometric("shear_y"),
    "solarize": _solarize,
    "translate_x": _geometric("translate_x"),
    "translate_y": _geometric("translate_y"),
}


def _cutout(x: Tensor, generator: torch.Generator, max_fraction: float = 0.5) -> Tensor:
    b, _, h, w = x.shape
    draws = torch.rand(b, 3, generator=generator)
    side = (draws[:, 0] * max_fraction * min(h, w)).round().long().view(b, 1, 1)
    cy, cx = (draws[:, 1] * h).long().view(b, 1, 1), (draws[:, 2] * w).long().view(b, 1, 1)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = ((rows - cy).abs() * 2 < side) & ((cols - cx).abs() * 2 < side)
    return torch.where(inside.unsqueeze(1).to(x.device), torch.full_like(x, 127.0), x)


def strong(images: Tensor, generator: torch.Generator, operations: int = 2) -> Tensor:
    """RandAugment (``operations`` random operations at random magnitudes, per image) then Cutout, on uint8 images."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    names = list(OPERATIONS)
    for _ in range(operations):
        choice = torch.randint(0, len(names), (len(x),), generator=generator)
        magnitude = torch.rand(len(x), generator=generator)
        for k, name in enumerate(names):
            chosen = (choice == k).nonzero().squeeze(1)
            if len(chosen):
                index = chosen.to(x.device)
                x[index] = OPERATIONS[name](x[index], magnitude[chosen].to(x.device)).clamp(0, 255)
    return _cutout(x, generator).round().clamp(0, 255).to(torch.uint8)
