"""Which implementation cbnorm's operators run, and building the native CPU kernels ahead of time.

    python -m cbnorm.kernels build   # compile, verify and load the native CPU kernels now (once, about a minute)
    python -m cbnorm.kernels info    # the settings, and which implementation each operator uses and why

The operators of :mod:`cbnorm._kernels` have several implementations. A call runs the first one, in
the order of ``_IMPLEMENTATIONS``, that is available and takes that call (a new backend is one more
entry there, and its dispatch in ``_kernels``); ``$CBNORM_KERNELS`` (``auto``, ``native``,
``eager``) decides which are available.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _native
from .._cache import cache_dir

__all__ = ["build", "info", "main"]


@dataclass(frozen=True)
class _Implementation:
    name: str
    takes: str  # the calls it runs when available
    operators: tuple[str, ...]
    status: Callable[[], tuple[bool, str]]  # (available in this process, why); builds and loads nothing


_IMPLEMENTATIONS = (  # in the order a call tries them: another backend is one more entry
    _Implementation("native", "CPU float32/float64 tensors, at most 16 components", _native.OPERATORS, _native.status),
    _Implementation("eager", "every call", _native.OPERATORS, lambda: (True, "pure PyTorch, always available")),
)


def build() -> Path | None:
    """Build (when needed), verify and load the native CPU kernels now, rather than at the first forward.

    Call it before timing anything: the first build takes about a minute. It follows
    ``$CBNORM_KERNELS`` as the operators do: under ``auto`` a failed build warns once and the
    pure-PyTorch kernels run, under ``native`` it raises, under ``eager`` nothing is built.

    Returns:
        The loaded library, or ``None`` where the pure-PyTorch kernels run.

    Example::

        >>> cbnorm.kernels.build()  # doctest: +SKIP
        PosixPath('/home/me/.cache/cbnorm/kernels/kernels_avx2_1f0c3e5a9b7d2c41.so')
    """
    return _native.loaded_library() if _native.native_ops() is not None else None


def info() -> str:
    """The report of ``python -m cbnorm.kernels info``: the settings, whether each implementation is
    available and why, and which one each operator uses. Builds and loads nothing."""
    states = {impl.name: impl.status() for impl in _IMPLEMENTATIONS}
    try:
        library = str(_native.library_path())
    except RuntimeError as error:  # no compiler
        library = str(error)
    settings = [
        ("CBNORM_KERNELS", _native.kernels_mode() + _origin("CBNORM_KERNELS")),
        ("CBNORM_CACHE_DIR", f"{cache_dir()}{_origin('CBNORM_CACHE_DIR')}"),
        ("CXX", _compiler_version() + _origin("CXX")),
        ("CBNORM_BUILD_TIMEOUT", f"{_native.build_timeout():g} s{_origin('CBNORM_BUILD_TIMEOUT')}"),
        ("CPU instruction set", torch.backends.cpu.get_cpu_capability()),
        ("native library", library),
    ]
    implementations = [
        (impl.name, impl.takes, ("yes: " if states[impl.name][0] else "no: ") + states[impl.name][1])
        for impl in _IMPLEMENTATIONS
    ]
    operators = dict.fromkeys(name for impl in _IMPLEMENTATIONS for name in impl.operators)
    uses = [
        (name, ", else ".join(impl.name for impl in _IMPLEMENTATIONS if name in impl.operators and states[impl.name][0]))
        for name in operators
    ]
    return "\n\n".join([
        _table(("setting", "value"), settings),
        _table(("implementation", "takes", "available"), implementations),
        _table(("operator", "uses"), uses),
    ])


def _origin(variable: str) -> str:
    return f" (from ${variable})" if os.environ.get(variable) else " (default)"


def _compiler_version() -> str:
    try:
        compiler = _native.compiler()
        version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return f"{compiler}: {version.splitlines()[0] if version else '?'}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in (header, *rows))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cbnorm.kernels``."""
    parser = argparse.ArgumentParser(prog="python -m cbnorm.kernels", description=__doc__.partition("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="compile, verify and load the native CPU kernels now; exit status 1 if they fail")
    commands.add_parser("info", help="the settings, and which implementation each operator uses and why")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info())
        elif _native.kernels_mode() == "eager":
            print("CBNORM_KERNELS=eager: the pure-PyTorch kernels run, nothing to build")
        else:
            _native.load()
            print(f"native CPU kernels ready: {_native.loaded_library()}")
    except (RuntimeError, ValueError) as error:  # a failed build, a malformed setting
        print(f"{parser.prog} {args.command}: {error}", file=sys.stderr)
        return 1
    return 0
