"""Helpers shared by the test modules."""

import contextlib
import copy
import io
import pickle
import sys
from unittest import mock

import torch

import cbnorm


def roundtrip(module):
    """Copies of ``module`` made by deepcopy, pickle and torch.save/torch.load."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return [copy.deepcopy(module), pickle.loads(pickle.dumps(module)), torch.load(buffer, weights_only=False)]


def compiled(fn, **options):
    """``torch.compile(fn, **options)`` with a fresh dynamo cache, so each test compiles its own graph."""
    torch._dynamo.reset()
    return torch.compile(fn, **options)


def to_numpy(t):
    return t.detach().double().cpu().numpy()


def without_time(history):
    """A metrics history without its wall-clock columns (``seconds``, ``fid_seconds``)."""
    return [{k: v for k, v in row.items() if k not in ("seconds", "fid_seconds")} for row in history]


def kill_and_resume(command, flags, run, reference, epochs, timeout=180):
    """Start ``cbnorm COMMAND --out RUN`` with ``flags`` (a config's fields) in a subprocess, SIGKILL it once
    two epochs are checkpointed, resume it with ``--resume`` only, and check that it ends with the metrics
    of ``reference`` (a history). Returns the checkpoint the resumed run wrote."""
    import signal
    import subprocess
    import sys
    import time

    from cbnorm.experiments.metrics import read_metrics

    argv = [sys.executable, "-m", "cbnorm", command, "--out", str(run)]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.json").exists() and len(read_metrics(run)[1]) >= 2):  # written after the checkpoint
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len(torch.load(run / "checkpoint.pt", weights_only=True)["history"])
    assert 2 <= killed_at < epochs, killed_at
    resumed = subprocess.run([sys.executable, "-m", "cbnorm", command, "--out", str(run), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed after epoch {killed_at}" in resumed.stdout
    assert without_time(read_metrics(run)[1]) == without_time(reference)
    return torch.load(run / "checkpoint.pt", weights_only=True)


def device_path(monkeypatch):
    """Make the layers take the path they take on CUDA: checks as device-side assertions, never read on the host."""
    base = sys.modules[cbnorm.UCBNorm.__mro__[-3].__module__]  # the module of the layers' common base
    assert hasattr(base, "_host_checks")
    monkeypatch.setattr(base, "_host_checks", lambda t: False)


@contextlib.contextmanager
def no_host_reads():
    """Fail on any read of a tensor's value by Python (on CUDA, each waits for the device), and on the operators
    that read one inside (multinomial's check, one_hot's range check)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a host-device synchronisation")

    reads = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    with mock.patch.multiple(torch.Tensor, **{name: forbidden for name in reads}), \
            mock.patch.object(torch, "multinomial", forbidden), \
            mock.patch.object(torch.nn.functional, "one_hot", forbidden):
        yield
