"""Triton kernels of the cbnorm operators: the CUDA implementation of :mod:`cbnorm._kernels`.

Each module holds one operator's kernel and launcher, with the signature of the native CPU kernel of
the same name (``csrc/kernels.cpp``); :mod:`cbnorm._kernels` picks between them and keeps the
autograd formulas. ``x`` may be float32, float16 or bfloat16 (statistics and sums in float32), laid
out ``(N, C, L)`` or ``(N, L, C)`` (channels last); elementwise outputs have ``x``'s dtype and
strides. Importing this package imports Triton: only :mod:`cbnorm._kernels` does, on first use.
Under ``TRITON_INTERPRET=1`` (set before Triton is imported) the kernels run on CPU tensors.
"""

from triton.runtime import JITFunction

from . import moments
from .backward import mixture_normalize_backward, mixture_transform_backward
from .moments import mixture_moments
from .scale_shift import scale_shift, scale_shift_backward
from .transform import mixture_transform

# Whether the kernels were defined under TRITON_INTERPRET=1: then they run CPU tensors.
INTERPRETED = not isinstance(moments._moments_kernel, JITFunction)

__all__ = [
    "mixture_moments",
    "mixture_normalize_backward",
    "mixture_transform",
    "mixture_transform_backward",
    "scale_shift",
    "scale_shift_backward",
]
