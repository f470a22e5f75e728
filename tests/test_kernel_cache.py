"""The native-kernel cache: bad files, a hanging or killed compiler, concurrent builds, ``python -m cbnorm.kernels``.

The real kernels are compiled once, into the test session's cache (``real_library``); the builds
under test run a stand-in compiler (a shell script as ``$CXX``) that copies them, fails, or hangs.
A library can be loaded once per process, so whatever loads one runs in a fresh interpreter.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbnorm import _cache, _native, kernels

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the native kernels build on Linux only")

# Runs UCB-Norm in a fresh interpreter and prints which kernels ran it.
FORWARD = (
    "import torch, cbnorm\n"
    "from cbnorm import _native\n"
    "y = cbnorm.UCBNorm(3, num_components=2)(torch.randn(8, 3, 4))\n"
    "print('native' if _native.native_ops() is not None else 'eager', bool(torch.isfinite(y).all()))\n"
)
FALLBACK = "native CPU kernels unavailable"
COMPILER = shutil.which(os.environ.get("CXX", "c++"))  # the real one, before any test replaces $CXX


@pytest.fixture(scope="module")
def real_library() -> Path:
    """The real kernels, built in the session's cache (about a minute, the first time only)."""
    if COMPILER is None:
        pytest.skip("no C++ compiler to build the native kernels")
    return _native.build()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder, and a process that has not tried to load the kernels yet."""
    monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CBNORM_KERNELS", "auto")
    monkeypatch.delenv("CBNORM_BUILD_TIMEOUT", raising=False)
    monkeypatch.setattr(_native, "_ops", None)
    return tmp_path / "cache"


def fake_compiler(folder: Path, body: str, name: str = "fake-c++") -> Path:
    """An executable shell script to stand in for ``$CXX``; ``$out`` holds the path it got after ``-o``."""
    path = folder / name
    path.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n' + body + "\n")
    path.chmod(0o755)
    return path


def python(*argv: str) -> subprocess.CompletedProcess:
    """``python ARGV`` in a fresh interpreter with this test's environment."""
    return subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, timeout=120)


def kernels_command(*argv: str) -> subprocess.CompletedProcess:
    return python("-m", "cbnorm.kernels", *argv)


def foreign_library(path: Path) -> None:
    """A valid shared library that is not cbnorm's kernels."""
    source = path.with_name("foreign.c")
    source.write_text("int answer(void) { return 42; }\n")
    subprocess.run([COMPILER, "-x", "c", "-shared", "-fPIC", str(source), "-o", str(path)], check=True)


@contextlib.contextmanager
def deadline(seconds: int):
    """Turn a hang into a failure: raise TimeoutError in the test after ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process ended first: {process.communicate()[1]}"
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def running_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that are not zombies (an orphan's zombie may wait for its reaper)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == group and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def scratch_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("tmp*"))


class TestBadFile:
    @pytest.mark.parametrize("damage", ["truncated", "foreign"])
    @pytest.mark.parametrize("rebuild", ["succeeds", "fails"])
    def test_is_rebuilt_or_falls_back(self, cache, real_library, tmp_path, monkeypatch, damage, rebuild):
        broken = tmp_path / "broken"
        compiler = fake_compiler(tmp_path, f'[ -e "{broken}" ] && exit 1; cp "{real_library}" "$out"')
        monkeypatch.setenv("CXX", str(compiler))
        target = _native.build()  # a verified library and its manifest, as a build leaves them
        if damage == "truncated":  # a build killed while writing, or a full disk
            target.write_bytes(real_library.read_bytes()[:100_000])
        else:  # another library under the kernel's name, without a manifest
            foreign_library(target)
            target.with_name(target.name + ".json").unlink()
        if rebuild == "fails":
            broken.touch()

        result = python("-c", FORWARD)

        assert result.returncode == 0, result.stderr  # no SIGBUS, no AttributeError
        if rebuild == "succeeds":
            assert result.stdout.split() == ["native", "True"]
            assert f"building the native CPU kernels into {target}, replacing a file that fails verification" \
                in result.stderr
            assert FALLBACK not in result.stderr
            assert target.read_bytes() == real_library.read_bytes()
        else:
            assert result.stdout.split() == ["eager", "True"]
            assert result.stderr.count(FALLBACK) == 1
            assert f"compiling {target} failed" in result.stderr
        assert not scratch_files(cache)

    def test_foreign_library_with_a_forged_manifest_is_caught_after_loading(self, cache, real_library, tmp_path,
                                                                           monkeypatch):
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, f'cp "{real_library}" "$out"')))
        target = _native.build()
        foreign_library(target)
        manifest = target.with_name(target.name + ".json")
        fields = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**fields, "sha256": _native._sha256(target)}))

        result = python("-c", FORWARD)

        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["eager", "True"]
        assert result.stderr.count(FALLBACK) == 1
        assert f"{target} lacks the operators ['mixture_moments'," in result.stderr
        assert not target.exists() and not manifest.exists()  # the next run rebuilds it

    def test_native_mode_raises(self, cache, tmp_path, monkeypatch):
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, "exit 1")))
        monkeypatch.setenv("CBNORM_KERNELS", "native")
        target = _native.library_path()
        target.parent.mkdir(parents=True)
        target.write_bytes(b"\x7fELF" + bytes(100))
        with pytest.raises(RuntimeError, match=re.escape(f"compiling {target} failed")):
            _native.native_ops()


class TestBuild:
    def test_hanging_compiler_is_stopped(self, cache, tmp_path, monkeypatch):
        started = tmp_path / "compiler-pid"
        # `sleep` runs as the script's child, holding its output pipe: the whole process group must go.
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, f'echo $$ > "{started}"; sleep 60')))
        monkeypatch.setenv("CBNORM_BUILD_TIMEOUT", "1")
        target = _native.library_path()
        begin = time.monotonic()
        with deadline(30), pytest.warns(RuntimeWarning, match=FALLBACK) as warned:
            assert _native.native_ops() is None
        assert time.monotonic() - begin < 10
        assert len(warned) == 1
        assert f"compiling {target} took over 1 s (CBNORM_BUILD_TIMEOUT): stopped" in str(warned[0].message)
        group = int(started.read_text())
        for _ in range(50):  # SIGKILL is delivered asynchronously: give the killed processes a moment to die
            if not running_in_group(group):
                break
            time.sleep(0.1)
        assert not running_in_group(group)  # the compiler and what it started
        assert not scratch_files(cache)

    def test_malformed_timeout_is_an_error(self, cache, monkeypatch):
        monkeypatch.setenv("CBNORM_BUILD_TIMEOUT", "soon")
        with pytest.raises(ValueError, match="CBNORM_BUILD_TIMEOUT must be a positive number of seconds, got 'soon'"):
            _native.native_ops()

    def test_killed_build_leaves_no_scratch(self, cache, tmp_path, monkeypatch):
        started = tmp_path / "compiler-pid"
        compiler = fake_compiler(tmp_path, f'echo partial > "$out"; echo $$ > "{started}"; exec sleep 60')
        monkeypatch.setenv("CXX", str(compiler))
        process = subprocess.Popen([sys.executable, "-c", "from cbnorm import _native; _native.native_ops()"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(started, process)
        process.kill()
        process.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(started.read_text()), signal.SIGKILL)  # the orphaned compiler
        assert scratch_files(cache)  # what the killed build was writing

        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, "exit 1", "failing-c++")))
        with pytest.warns(RuntimeWarning, match=FALLBACK):
            assert _native.native_ops() is None  # the next build
        assert not scratch_files(cache)

    def test_concurrent_builds_compile_once(self, cache, real_library, tmp_path, monkeypatch):
        compiles, go = tmp_path / "compiles", tmp_path / "go"
        compiler = f'echo $$ >> "{compiles}"; while [ ! -e "{go}" ]; do sleep 0.1; done; cp "{real_library}" "$out"'
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, compiler)))
        ready = [tmp_path / f"ready-{i}" for i in range(2)]
        processes = [
            subprocess.Popen([sys.executable, "-c", f"import cbnorm.layers\nopen({str(flag)!r}, 'w').close()\n"
                              + FORWARD],  # the flag once torch and the layers are imported (cbnorm alone is lazy)
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for flag in ready
        ]
        for flag, process in zip(ready, processes):
            wait_for(flag, process)
        time.sleep(2)  # both are past their imports and checks: one compiles, the other waits for it
        go.touch()
        results = [process.communicate(timeout=120) for process in processes]

        for process, (out, err) in zip(processes, results):
            assert process.returncode == 0, err
            assert out.split() == ["native", "True"], err
        assert len(compiles.read_text().split()) == 1
        stderr = "".join(err for _, err in results)
        assert stderr.count("cbnorm: building the native CPU kernels into") == 1
        assert stderr.count("cbnorm: waiting for another process building the native CPU kernels in") == 1
        target = _native.library_path()
        written = sorted(path.name for path in target.parent.iterdir())
        assert written == sorted([".lock", target.name, target.name + ".json"])
        assert _native.status() == (True, f"{target} verifies")


class TestCommands:
    def test_build(self, cache, real_library, tmp_path, monkeypatch, capsys):
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, f'cp "{real_library}" "$out"')))
        target = _native.library_path()
        built = kernels_command("build")
        assert built.returncode == 0, built.stderr
        announce, done = built.stderr.splitlines()
        assert announce == (f"cbnorm: building the native CPU kernels into {target}; about a minute, once per torch "
                            f"version and CPU")
        assert done.startswith("cbnorm: built the native CPU kernels in ") and done.endswith(" s")
        assert built.stdout == f"native CPU kernels ready: {target}\n"
        again = kernels_command("build")
        assert again.stderr == "" and again.stdout == built.stdout

        monkeypatch.setenv("CBNORM_KERNELS", "eager")
        assert kernels.main(["build"]) == 0
        assert capsys.readouterr().out == "CBNORM_KERNELS=eager: the pure-PyTorch kernels run, nothing to build\n"
        monkeypatch.setenv("CBNORM_KERNELS", "auto")
        compiler = fake_compiler(tmp_path, "echo 'kernels.cpp:1: error: boom' >&2; exit 1", "failing-c++")
        monkeypatch.setenv("CXX", str(compiler))
        assert kernels.main(["build"]) == 1
        failed = capsys.readouterr().err
        assert failed.endswith(f"\npython -m cbnorm.kernels build: compiling {_native.library_path()} failed (exit "
                               f"status 1):\nkernels.cpp:1: error: boom\n")
        monkeypatch.setenv("CBNORM_BUILD_TIMEOUT", "0")
        assert kernels.main(["info"]) == 1
        assert capsys.readouterr().err == ("python -m cbnorm.kernels info: CBNORM_BUILD_TIMEOUT must be a positive "
                                           "number of seconds, got '0'\n")

    def test_info(self, cache, real_library, tmp_path, monkeypatch):
        monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, f'cp "{real_library}" "$out"')))
        target = _native.library_path()
        info = kernels_command("info")
        assert info.returncode == 0, info.stderr
        assert f"CBNORM_CACHE_DIR      {cache} (from $CBNORM_CACHE_DIR)\n" in info.stdout
        assert f"native library        {target}\n" in info.stdout
        assert (
            "no: not built yet: builds at the first call, or now with `python -m cbnorm.kernels build`\n"
            in info.stdout
        )
        assert "mixture_moments             eager\n" in info.stdout

        _native.build()
        assert f"yes: {target} verifies\n" in kernels.info()
        assert "mixture_moments             native, else eager\n" in kernels.info()
        target.write_bytes(target.read_bytes()[:1000])
        assert "fails verification (its SHA-256 differs from the manifest's: truncated or replaced)" in kernels.info()
        monkeypatch.setenv("CBNORM_KERNELS", "eager")
        assert "no: off: CBNORM_KERNELS=eager\n" in kernels.info()


def test_training_builds_the_kernels_before_the_first_epoch(real_library, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from cbnorm.experiments import train as training

    monkeypatch.setenv("CBNORM_KERNELS", "auto")
    monkeypatch.setattr(_native, "_ops", None)
    loaded_at_first_epoch = []
    first_epoch = training._train_epoch

    def spy(*args, **kwargs):
        loaded_at_first_epoch.append(_native.loaded_library())
        return first_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", spy)
    config = training.TrainConfig(dataset="digits", norm="ucb", train_size=64, test_size=32, batch_size=32, epochs=1,
                                  progress=False, out=str(tmp_path / "run"))
    training.train(config)
    assert loaded_at_first_epoch == [real_library]


def test_one_cache_folder(tmp_path, monkeypatch):
    assert not _cache.cache_dir().is_relative_to(Path.home() / ".cache")  # the tests' own (conftest.py)

    monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CBNORM_CACHE", str(tmp_path / "old"))
    assert _cache.cache_dir("clusters") == tmp_path / "cache" / "clusters"
    if COMPILER:
        assert _native.library_path().parent == tmp_path / "cache" / "kernels"

    monkeypatch.delenv("CBNORM_CACHE_DIR")
    with pytest.warns(FutureWarning, match="CBNORM_CACHE is deprecated; set CBNORM_CACHE_DIR instead"):
        assert _cache.cache_dir("kernels") == tmp_path / "old" / "kernels"

    monkeypatch.delenv("CBNORM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_dir() == tmp_path / "xdg" / "cbnorm"


def test_cluster_ids_are_cached_in_the_cache_folder(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from cbnorm.experiments.clusters import data_fingerprint, mixture_clusters
    from cbnorm.experiments.data import load_dataset

    monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path))
    digits = load_dataset("digits")
    mixture_clusters(digits, 3)
    expected = f"digits-{data_fingerprint(digits)}-k3-gmm-seed0.pt"
    assert [path.name for path in (tmp_path / "clusters").iterdir()] == [expected]
