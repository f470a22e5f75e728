"""How fast a run goes on CUDA: bfloat16 autocast, channels-last tensors, cuDNN's autotuner and
``torch.compile``; each a config field (a ``cbnorm train`` flag) that can be turned off.

The first three are on by default and act only on CUDA: on the CPU a run computes exactly what it
computed before they existed. A run records in ``config.json`` what it actually used (``bf16``
false on the CPU, whatever was asked), and may be resumed with other settings, as on another device.

==================  =======  ==============================================================
field (flag)        default  effect on CUDA
==================  =======  ==============================================================
``bf16``            on       bfloat16 autocast of the forward pass (``--amp``: float16, loss-scaled)
``channels_last``   on       model and batches in the channels-last (NHWC) memory format
``cudnn_benchmark`` on       cuDNN times its convolution algorithms and keeps the fastest
``compile``         off      ``torch.compile`` of the model (any device); the first steps compile
==================  =======  ==============================================================

This module imports no torch at import time, as the configs that inherit :class:`SpeedSettings` do not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["SPEED_FIELDS", "SpeedSettings", "autocast", "autocast_dtype", "compiled", "describe", "device_name",
           "grad_scaler", "memory_format", "prepare_model", "resolve_speed", "retained_graphs"]

SPEED_FIELDS = frozenset({"bf16", "channels_last", "cudnn_benchmark", "compile"})


@dataclass
class SpeedSettings:
    """The speed fields of a training config; a config dataclass inherits them."""

    bf16: bool = field(default=True, metadata={"help": "CUDA: bfloat16 autocast (--amp asks float16 instead); "
                                                       "the CPU ignores it"})
    channels_last: bool = field(default=True, metadata={"help": "CUDA: model and batches in the channels-last "
                                                                "memory format; the CPU ignores it"})
    cudnn_benchmark: bool = field(default=True, metadata={"help": "CUDA: cuDNN picks the fastest convolution "
                                                                  "algorithms by timing them; the CPU ignores it"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slower first steps)"})


def resolve_speed(config, device: torch.device):
    """``config`` with the settings ``device`` uses: the CUDA-only ones off elsewhere, ``bf16`` off under ``amp``."""
    cuda = device.type == "cuda"
    return dataclasses.replace(config, bf16=config.bf16 and cuda and not config.amp,
                               channels_last=config.channels_last and cuda,
                               cudnn_benchmark=config.cudnn_benchmark and cuda)


def autocast_dtype(config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved ``config`` on ``device``: float16 (CUDA) or bfloat16 (CPU) under
    ``amp``, bfloat16 under ``bf16``, ``None`` for float32."""
    import torch

    if config.amp:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.bfloat16 if config.bf16 else None


def autocast(config, device: torch.device):
    """The autocast of a resolved ``config``'s forward passes on ``device``: :func:`autocast_dtype`'s, off for
    float32."""
    import torch

    dtype = autocast_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(config, device: torch.device):
    """The loss scaling of a ``config``'s float16 autocast (``amp`` on CUDA); a scaler that does nothing otherwise
    (its ``scale(loss)`` is ``loss``, its ``step(optimizer)`` is ``optimizer.step()``)."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")


def prepare_model(model: nn.Module, config) -> nn.Module:
    """Give ``model`` (on its device) a resolved ``config``'s memory format and cuDNN its setting; returns it."""
    import torch

    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    return model


def compiled(module: nn.Module, config) -> nn.Module:
    """``module`` compiled under ``config.compile``, else itself (it shares the parameters either way)."""
    import torch

    return torch.compile(module) if config.compile else module


def retained_graphs(config):
    """A context in which the backward graph of a module :func:`compiled` under ``config.compile`` may be kept
    for a second gradient (``retain_graph=True``): torch's donated buffers, which forbid it, are off while it
    compiles and runs. Nothing without ``compile``, or on a torch without donated buffers."""
    import contextlib

    if not config.compile:  # every AdaMatch step asks: answer without importing
        return contextlib.nullcontext()
    from torch._functorch import config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        return functorch_config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def describe(config) -> str:
    """The speed settings a resolved ``config`` uses, for a run's first line ("float32" when none)."""
    used = [("bfloat16 autocast", config.bf16), ("channels-last", config.channels_last),
            ("cuDNN benchmark", config.cudnn_benchmark), ("compiled", config.compile)]
    return ", ".join(name for name, on in used if on) or "float32"


def memory_format(config) -> torch.memory_format:
    """The memory format of a resolved ``config``'s batches."""
    import torch

    return torch.channels_last if config.channels_last else torch.contiguous_format


def device_name(device: torch.device) -> str:
    """What the device is, for the tables: the GPU's name, or the CPU's (its architecture when unnamed)."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"
