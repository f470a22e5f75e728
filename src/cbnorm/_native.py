"""Build, verify and load the native CPU kernels (``csrc/kernels.cpp``) on first use.

The kernels are compiled once per source, torch version, compiler and CPU instruction set with the
system C++ compiler (``$CXX``, else ``c++``) into ``kernels/`` of cbnorm's cache folder
(``$CBNORM_CACHE_DIR``, else ``~/.cache/cbnorm``) and loaded with :func:`torch.ops.load_library`;
they register the operators ``torch.ops.cbnorm_native.*``. No ninja, pybind11 or Python headers are
needed.

A cached library is used only as it was built. Beside ``kernels_<isa>_<key>.so`` a manifest
``<name>.so.json`` records its SHA-256 and what built it; both are checked before the file is mapped
(a truncated library would kill the process with SIGBUS), and the operators must be there once it
is loaded. A file that fails is rebuilt. A build holds a file lock (concurrent processes compile
once), removes the scratch files of killed builds, writes to a scratch file that is renamed into
place, and stops the compiler after ``$CBNORM_BUILD_TIMEOUT`` seconds (default 300).

``CBNORM_KERNELS`` picks the implementation: ``auto`` (default: native kernels when they build,
else the pure-PyTorch ones, with one warning), ``native`` (fail loudly when they do not build) or
``eager`` (never build; pure PyTorch everywhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ._cache import cache_dir

__all__ = [
    "OPERATORS", "build", "build_timeout", "compiler", "kernels_mode", "library_path", "load", "loaded_library",
    "native_ops", "status",
]

OPERATORS = (  # what torch.ops.cbnorm_native must hold once the library is loaded
    "mixture_moments",
    "mixture_transform",
    "mixture_transform_backward",
    "mixture_normalize_backward",
    "scale_shift_backward",
)
_SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
_MODES = ("auto", "native", "eager")
_DEFAULT_TIMEOUT = 300.0
# Instruction-set flags and macros, as torch.backends.cpu.get_cpu_capability() names the sets.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}

_lock = threading.Lock()
_ops = None  # the loaded namespace, False after a failed build, None before any attempt
_library: Path | None = None  # the file _ops came from


def kernels_mode() -> str:
    """``$CBNORM_KERNELS``: ``"auto"``, ``"native"`` or ``"eager"``."""
    mode = os.environ.get("CBNORM_KERNELS", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"CBNORM_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def build_timeout() -> float:
    """``$CBNORM_BUILD_TIMEOUT``: the seconds a build may take (default 300)."""
    text = os.environ.get("CBNORM_BUILD_TIMEOUT", "")
    try:
        seconds = float(text) if text else _DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"CBNORM_BUILD_TIMEOUT must be a positive number of seconds, got {text!r}")
    return seconds


def native_ops():
    """``torch.ops.cbnorm_native``, built on the first call; ``None`` where the kernels are unavailable."""
    global _ops
    mode = kernels_mode()
    if mode == "eager":
        return None
    if _ops is None:
        with _lock:
            if _ops is None:
                _ops = _load_or_warn(strict=mode == "native")
    if _ops is False and mode == "native":
        raise RuntimeError("cbnorm: CBNORM_KERNELS=native, but the native kernels failed to build (see the warning)")
    return _ops or None


def _load_or_warn(strict: bool):
    build_timeout()  # a malformed setting is an error, not a reason to fall back
    try:
        return load()
    except Exception as error:  # no compiler, unsupported platform, a bad file, ...: fall back to PyTorch
        if strict:
            raise
        warnings.warn(
            f"cbnorm: native CPU kernels unavailable ({error}); using the pure-PyTorch kernels, which are "
            f"several times slower. Set CBNORM_KERNELS=eager to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def load():
    """Build (when needed), load and check the library; returns ``torch.ops.cbnorm_native``. Raises on failure."""
    global _library
    path = build()
    try:
        torch.ops.load_library(str(path))
        missing = [name for name in OPERATORS if not hasattr(torch.ops.cbnorm_native, name)]
        problem = f"lacks the operators {missing}: it is not cbnorm's kernels" if missing else None
    except OSError as error:
        problem = f"does not load ({error})"
    if problem:
        _discard(path)
        raise RuntimeError(f"{path} {problem}; removed it, the next run rebuilds it")
    _library = path
    return torch.ops.cbnorm_native


@dataclass(frozen=True)
class _Recipe:
    """How the library for this process is built, and where it goes."""

    target: Path
    compiler: str
    flags: list[str]
    libraries: list[str]
    fields: dict  # what a manifest must record, besides the file's SHA-256

    @property
    def manifest(self) -> Path:
        return self.target.with_name(self.target.name + ".json")

    def problem(self) -> str | None:
        """Why the cached library cannot be used, or ``None`` when it verifies; never maps the file."""
        if not self.target.is_file():
            return "not built yet"
        try:
            manifest = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            return f"no manifest {self.manifest.name}: an interrupted build, or a file from elsewhere"
        except (OSError, ValueError) as error:
            return f"unreadable manifest {self.manifest.name} ({error})"
        if not isinstance(manifest, dict) or any(manifest.get(key) != value for key, value in self.fields.items()):
            return f"{self.manifest.name} describes another build"
        if manifest.get("sha256") != _sha256(self.target):
            return "its SHA-256 differs from the manifest's: truncated or replaced"
        return None


def _recipe() -> _Recipe:
    from torch.utils import cpp_extension

    cxx = compiler()
    isa = torch.backends.cpu.get_cpu_capability()
    flags = [
        "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-DNDEBUG", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_ISA_FLAGS.get(isa, []),
        *(f"-I{path}" for path in cpp_extension.include_paths()),
    ]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    libraries += [f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    fields = {
        "source_sha256": hashlib.sha256(_SOURCE.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "compiler": cxx,
        "flags": flags + libraries,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    target = cache_dir("kernels") / f"kernels_{isa.lower()}_{key[:16]}.so"
    return _Recipe(target, cxx, flags, libraries, fields)


def loaded_library() -> Path | None:
    """The library this process loaded, if any."""
    return _library


def library_path() -> Path:
    """Where this process's library is (or would be) cached. Raises without a compiler."""
    return _recipe().target


def status() -> tuple[bool, str]:
    """Whether the native kernels serve this process's CPU calls, and why; builds and loads nothing."""
    if kernels_mode() == "eager":
        return False, "off: CBNORM_KERNELS=eager"
    if _ops:
        return True, f"loaded from {_library}"
    if _ops is False:
        return False, "failed to build or load in this process (see its warning)"
    try:
        recipe = _recipe()
    except RuntimeError as error:
        return False, str(error)
    problem = recipe.problem()
    if problem is None:
        return True, f"{recipe.target} verifies"
    if problem == "not built yet":
        return False, "not built yet: builds at the first call, or now with `python -m cbnorm.kernels build`"
    return False, f"{recipe.target} fails verification ({problem}): rebuilt at the first call"


def build() -> Path:
    """The path of a verified library for this process, compiled first when missing or bad. Raises on failure."""
    recipe = _recipe()
    if recipe.problem() is None:
        return recipe.target
    timeout = build_timeout()
    recipe.target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(recipe.target.parent, timeout):
        problem = recipe.problem()  # another process may have built it while this one waited
        if problem is not None:
            _remove_scratch(recipe.target.parent)
            _compile(recipe, problem, timeout)
    return recipe.target


def _compile(recipe: _Recipe, problem: str, timeout: float) -> None:
    target = recipe.target
    replacing = "" if problem == "not built yet" else f", replacing a file that fails verification ({problem})"
    _say(f"building the native CPU kernels into {target}{replacing}; about a minute, once per torch version and CPU")
    start = time.perf_counter()
    scratch = _scratch(target.parent, ".so")  # the name the next build removes, should this one be killed
    try:
        _run([recipe.compiler, *recipe.flags, str(_SOURCE), "-o", str(scratch), *recipe.libraries], timeout, target)
        seconds = time.perf_counter() - start
        manifest = {**recipe.fields, "sha256": _sha256(scratch), "build_seconds": round(seconds, 1)}
        os.replace(scratch, target)  # atomic: no process ever sees a half-written library
        _write_atomic(recipe.manifest, json.dumps(manifest, indent=1))
    finally:
        scratch.unlink(missing_ok=True)
    _say(f"built the native CPU kernels in {seconds:.1f} s")


def _run(command: list[str], timeout: float, target: Path) -> None:
    """Run the compiler; on timeout (or Ctrl-C) kill it with the processes it started (cc1plus, ld)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise RuntimeError(f"compiling {target} took over {timeout:g} s (CBNORM_BUILD_TIMEOUT): stopped") from None
    except BaseException:
        _kill_group(process)
        raise
    if process.returncode != 0:
        raise RuntimeError(f"compiling {target} failed (exit status {process.returncode}):\n{output[-2000:].rstrip()}")


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()  # reaps it; returns once every process of the group has closed the pipe


@contextlib.contextmanager
def _build_lock(folder: Path, timeout: float):
    """Hold ``folder/.lock``: one build at a time across processes, so scratch files without it are stale."""
    import fcntl  # POSIX; the build needs Linux anyway (see compiler)

    deadline = time.monotonic() + timeout
    with open(folder / ".lock", "a") as handle:
        for attempt in itertools.count():
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 0:
                    _say(f"waiting for another process building the native CPU kernels in {folder}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another process has been building in {folder} for over {timeout:g} s "
                                       f"(CBNORM_BUILD_TIMEOUT)") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _scratch(folder: Path, suffix: str) -> Path:
    """A fresh name in ``folder`` for a file still being written (created later, so the umask applies)."""
    return folder / f"tmp{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _remove_scratch(folder: Path) -> None:
    """Remove what killed builds left (their ``tmp*`` files); only called under the build lock."""
    for path in folder.glob("tmp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    scratch = _scratch(path.parent, ".json")
    try:
        scratch.write_text(text)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def _discard(library: Path) -> None:
    library.unlink(missing_ok=True)
    library.with_name(library.name + ".json").unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _say(message: str) -> None:
    """One line on stderr, where a user waiting for the first forward looks."""
    print(f"cbnorm: {message}", file=sys.stderr, flush=True)


def compiler() -> str:
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the native kernels are built on Linux only, not on {sys.platform}")
    name = os.environ.get("CXX", "c++")
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no C++ compiler {name!r} ($CXX, else c++) to build the native kernels")
    return found
