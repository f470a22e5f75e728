import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# Without CUDA, Triton runs kernels only in its interpreter, which is chosen when Triton is first imported
# (importing torch._inductor, below, imports it): tests/test_triton.py runs cbnorm's Triton kernels there.
# Nothing else in the suite can run a Triton kernel on such a machine, so nothing else changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Compile every graph afresh: the on-disk caches of compiled graphs do not hash the Python code of
# custom operators (their fake and autograd formulas), so a graph cached by another version of
# cbnorm on the same machine could be reused.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

_DATA_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(request, tmp_path_factory):
    """cbnorm's cache (native kernels, cluster ids) in pytest's own cache folder: never the user's
    ``~/.cache``, and the kernels' one-minute build is kept between runs (subprocesses inherit it)."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("cbnorm") if cache is not None else tmp_path_factory.mktemp("cbnorm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CBNORM_CACHE_DIR", str(folder))
        patch.delenv("CBNORM_CACHE", raising=False)
        yield folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets (MNIST, CIFAR-10): ``$CBNORM_DATA``, else ``shared/data`` beside the checkout.

    When ``CBNORM_DATA`` is set (CI sets it) a missing folder fails the test instead of skipping it.
    """
    if os.environ.get("CBNORM_DATA"):
        root = Path(os.environ["CBNORM_DATA"])
        if not root.is_dir():
            pytest.fail(f"CBNORM_DATA={root} is not a directory")
        return root
    for root in _DATA_CANDIDATES:
        if root.is_dir():
            return root
    pytest.skip("real datasets not found: set CBNORM_DATA to the folder holding mnist/ and cifar10/")


@pytest.fixture
def one_thread():
    """One torch thread for the test: the training tests run tiny models, for which a second thread
    only adds synchronisation, and on a busy machine a thread waiting for a descheduled partner at
    every op's barrier makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request) -> torch.device:
    """Each device the tests can run on: the CPU, and CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (bundled), loaded once for the tests that train on it."""
    from cbnorm.experiments.data import load_dataset

    return load_dataset("digits")
