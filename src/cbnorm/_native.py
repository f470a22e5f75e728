"""Build and load the native CPU kernels (``csrc/kernels.cpp``) on first use.

The kernels are compiled once per source, torch version and CPU instruction set with the system C++
compiler (``$CXX``, else ``c++``), cached under ``$CBNORM_CACHE_DIR`` (default
``~/.cache/cbnorm``) and loaded with :func:`torch.ops.load_library`; they register the operators
``torch.ops.cbnorm_native.*``. No ninja, pybind11 or Python headers are needed.

``CBNORM_KERNELS`` picks the implementation: ``auto`` (default: native kernels when they build,
else the pure-PyTorch ones, with one warning; Triton kernels on CUDA), ``native`` (fail loudly when
they do not build), ``eager`` (never build; pure PyTorch everywhere) or ``triton`` (the Triton
kernels of :mod:`cbnorm._triton` for every tensor they take; CPU tensors need ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["kernels_mode", "native_ops"]

_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_MODES = ("auto", "native", "eager", "triton")
# Instruction-set flags and macros, as torch.backends.cpu.get_cpu_capability() names the sets.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}

_lock = threading.Lock()
_ops = None  # the loaded namespace, False after a failed build, None before any attempt


def kernels_mode() -> str:
    """``$CBNORM_KERNELS``: ``"auto"``, ``"native"``, ``"eager"`` or ``"triton"``."""
    mode = os.environ.get("CBNORM_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"CBNORM_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def native_ops():
    """``torch.ops.cbnorm_native``, built on the first call; ``None`` where the kernels are unavailable."""
    global _ops
    mode = kernels_mode()
    if mode == "eager":
        return None
    if _ops is None:
        with _lock:
            if _ops is None:
                _ops = _load(strict=mode == "native")
    if _ops is False and mode == "native":
        raise RuntimeError("cbnorm: CBNORM_KERNELS=native, but the native kernels failed to build (see the warning)")
    return _ops or None


def _load(strict: bool):
    try:
        torch.ops.load_library(str(_build()))
        return torch.ops.cbnorm_native
    except Exception as error:  # no compiler, unsupported platform, ...: fall back to PyTorch
        if strict:
            raise
        warnings.warn(
            f"cbnorm: native CPU kernels unavailable ({error}); using the pure-PyTorch kernels, which are "
            f"several times slower. Set CBNORM_KERNELS=eager to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or not sys.platform.startswith("linux"):
        raise RuntimeError("building the native kernels needs Linux and a C++ compiler ($CXX or c++)")
    return compiler


def _build() -> Path:
    from torch.utils import cpp_extension

    compiler = _compiler()
    isa = torch.backends.cpu.get_cpu_capability()
    flags = [
        "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-DNDEBUG", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_ISA_FLAGS.get(isa, []),
        *(f"-I{path}" for path in cpp_extension.include_paths()),
    ]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    libraries += [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), torch.__version__, compiler, *flags]).encode()).hexdigest()
    target = _cache_dir() / f"kernels_{isa.lower()}_{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            result = subprocess.run(
                [compiler, *flags, str(_SOURCE), "-o", str(partial), *libraries], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
            os.replace(partial, target)  # atomic: concurrent builds never load a half-written file
    return target


def _cache_dir() -> Path:
    root: Optional[str] = os.environ.get("CBNORM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "cbnorm"
