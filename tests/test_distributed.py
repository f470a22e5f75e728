"""Synchronised statistics across ranks: two CPU processes on gloo against one process with the whole batch.

One group of two processes is spawned for the whole module; it runs every scenario below with the
native kernels and again with the pure-PyTorch ones (``CBNORM_KERNELS=eager``) and saves what it
saw. The tests compare that with the same scenarios run here, in one process, on the whole batch
(the ranks' batches concatenated in rank order).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import traceback
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import cbnorm
from cbnorm import _base
from cbnorm.distributed import SyncBatchNorm, convert_sync_cbnorm, gather_channel_samples
from tests.utils import no_host_reads

WORLD = 2
BACKENDS = ("auto", "eager")  # CBNORM_KERNELS: native kernels, then the pure-PyTorch twins
TOL = dict(atol=1e-5, rtol=1e-5)


# -- scenarios: each runs on one rank of `world` (world=1: the whole batch, no process group) -------------


def _mixed(generator, *shape, dtype=torch.float32):
    """Three well separated modes per channel, so that K=3 mixtures have something to fit."""
    return (torch.randn(*shape, generator=generator) + 3.0 * torch.randint(0, 3, shape, generator=generator)).to(dtype)


def _steps(sizes: list[tuple[int, ...]], rest: tuple[int, ...], dtype=torch.float32, seed=1):
    """Global batches and upstream gradients, one per step, with the ranks' batch sizes of each step."""
    g = torch.Generator().manual_seed(seed)
    return [
        (_mixed(g, sum(s), *rest, dtype=dtype), torch.randn(sum(s), *rest, generator=g).to(dtype), s) for s in sizes
    ]


def _shard(t, sizes, rank, world):
    if world == 1:
        return t
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _layer_steps(make: Callable[[], nn.Module], steps, rank, world) -> dict:
    """Train-mode steps (no optimiser): outputs, input and parameter gradients, then state and eval output."""
    torch.manual_seed(0)  # the first batch's k-means draws: rank 0's are the ones every rank keeps
    layer = convert_sync_cbnorm(make())
    seen = {"y": [], "x_grad": [], "param_grad": []}
    for x, grad, sizes in steps:
        local = _shard(x, sizes, rank, world).clone().requires_grad_()
        y = layer(local)
        (y * _shard(grad, sizes, rank, world)).sum().backward()
        seen["y"].append(y.detach())
        seen["x_grad"].append(local.grad)
        seen["param_grad"].append({n: p.grad.clone() for n, p in layer.named_parameters()})
        layer.zero_grad()
    seen["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    seen["eval"] = layer.eval()(steps[0][0]).detach()
    return seen


UNEVEN = [(8, 8), (13, 3), (0, 12), (5, 0)]  # even, uneven, an empty rank 0, an empty rank 1
MN_SIZES = [(8, 8), (5, 11), (0, 16), (16, 0)]


def _batchnorm_like_ucb() -> nn.Module:
    """UCB-Norm with K=1 in BatchNorm's initial state (mean 0, variance 1) instead of a k-means start."""
    layer = cbnorm.UCBNorm(4, 1)
    layer.load_state_dict({**layer.state_dict(), "initialized": torch.tensor(True)})
    return layer


def _bn_pair(rank, world) -> dict:
    """UCB-Norm with K=1 and cbnorm's SyncBatchNorm, each a BatchNorm over the global batch."""
    steps = _steps(UNEVEN, (4, 3, 3), seed=4)
    return {
        "ucb": _layer_steps(_batchnorm_like_ucb, steps, rank, world),
        "sync_bn": _layer_steps(lambda: nn.BatchNorm2d(4, affine=False), steps, rank, world),
    }


SCENARIOS = {
    "ucb": lambda rank, world: _layer_steps(
        lambda: cbnorm.UCBNorm(6, 3, affine=True), _steps([(8, 8), (9, 7), (12, 4)], (6, 5, 5)), rank, world),
    # 6400 entries per channel on the first batch: the k-means++ start subsamples 4096 of them
    "ucb_subsampled": lambda rank, world: _layer_steps(
        lambda: cbnorm.UCBNorm(3, 3), _steps([(11, 5), (8, 8)], (3, 20, 20), seed=2), rank, world),
    "ucb_empty_rank": lambda rank, world: _layer_steps(
        lambda: cbnorm.UCBNorm(5, 3, affine=True, momentum=None), _steps([(0, 12)] + UNEVEN, (5, 4), seed=3),
        rank, world),
    "ucb_weight": lambda rank, world: _layer_steps(
        lambda: cbnorm.UCBNorm(4, 2, update="weight"), _steps([(3, 9), (6, 6)], (4, 6)), rank, world),
    "mn": lambda rank, world: _layer_steps(
        lambda: cbnorm.MixtureNorm(6, 3), _steps(MN_SIZES, (6, 4, 4)), rank, world),
    "mn_float64": lambda rank, world: _layer_steps(
        lambda: cbnorm.MixtureNorm(6, 3, dtype=torch.float64), _steps(MN_SIZES, (6, 4, 4), torch.float64), rank, world),
    "bn": _bn_pair,
}


def _run_scenarios(rank: int, world: int) -> dict:
    return {name: run(rank, world) for name, run in SCENARIOS.items()}


# -- checks only the group runs ------------------------------------------------------------------------


def _directional_derivative(rank: int) -> dict:
    """Float64: the derivative of the global objective sum_r <y_r, g_r> along a random direction of every
    rank's input and of the (shared) affine weight, by central differences and by backward through the
    all-reduce. It is the gradcheck of a function whose input is spread over the ranks."""
    g = torch.Generator().manual_seed(7)
    sizes = (5, 3)
    x, grad, dx = (torch.randn(sum(sizes), 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    x = x + 3 * (torch.arange(x.shape[0]) % 2).double()[:, None, None]
    dw = torch.randn(3, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    layer = convert_sync_cbnorm(cbnorm.UCBNorm(3, 2, affine=True, momentum=0.0, dtype=torch.float64))
    layer(_shard(x, sizes, rank, WORLD))  # initialise; momentum 0 then keeps the state fixed
    x, grad, dx = (_shard(t, sizes, rank, WORLD) for t in (x, grad, dx))

    def objective(step: float) -> float:
        with torch.no_grad():
            layer.weight.add_(step * dw)
            total = (layer(x + step * dx) * grad).sum()
            layer.weight.sub_(step * dw)
        dist.all_reduce(total)
        return float(total)

    local = x.clone().requires_grad_()
    (layer(local) * grad).sum().backward()
    analytic = torch.stack([(local.grad * dx).sum() + (layer.weight.grad * dw).sum()])
    dist.all_reduce(analytic)
    h = 1e-6
    return {"analytic": float(analytic), "numeric": (objective(h) - objective(-h)) / (2 * h)}


def _ddp_training(rank: int, world: int) -> dict:
    """Three SGD steps of a small DDP model with UCB-Norm and BatchNorm; rank 1's last batch is empty."""
    sizes = [(6, 6), (9, 4), (7, 0)]
    g = torch.Generator().manual_seed(5)
    batches = [(_mixed(g, sum(s), 2, 5, 5), torch.randint(0, 3, (sum(s),), generator=g), s) for s in sizes]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), cbnorm.UCBNorm(4, 2, affine=True), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(convert_sync_cbnorm(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, labels, s in batches:
        logits = net(_shard(x, s, rank, world))
        # the global batch's mean loss: DDP averages the ranks' gradients, hence the factor `world`
        loss = nn.functional.cross_entropy(logits, _shard(labels, s, rank, world), reduction="sum") * world / sum(s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _errors_are_collective(rank: int) -> dict:
    """Every rank raises the same error, and none hangs, when one rank's batch is bad or the global batch too small."""
    raised = {}
    cases = {
        "nan_at_init": (cbnorm.UCBNorm(2, 2), 1),
        "nan_later": (cbnorm.UCBNorm(2, 2), 1),
        "nan_mn": (cbnorm.MixtureNorm(2, 2), 0),
        "one_value": (cbnorm.UCBNorm(2, 2), None),
        "one_value_at_init": (cbnorm.UCBNorm(2, 2), None),
        "one_value_mn_at_init": (cbnorm.MixtureNorm(2, 2), None),
        "huge_later": (cbnorm.UCBNorm(2, 2), 1),
    }
    for name, (layer, bad_rank) in cases.items():
        layer = convert_sync_cbnorm(layer)
        if not name.endswith("at_init"):
            layer(torch.randn(4, 2, 3))  # initialised on a clean batch
        x = torch.randn(4, 2, 3) if not name.startswith("one_value") else torch.randn(1 - rank, 2, 1)  # 1 value in all
        if rank == bad_rank:
            x = x * 1e20 if name.startswith("huge") else x.index_fill(0, torch.tensor([1]), float("nan"))
        before = {k: v.clone() for k, v in layer.state_dict().items()}, layer._initialized
        try:
            layer(x)
            raised[name] = None
        except ValueError as error:
            raised[name] = str(error)
        raised[name + "_unchanged"] = (all(torch.equal(before[0][k], v) for k, v in layer.state_dict().items())
                                       and layer._initialized == before[1])
    return raised


def _samples(rank: int) -> dict:
    """gather_channel_samples against channel_samples of the concatenated batch, with and without subsampling."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 3, 4, generator=g)
    local = cbnorm.mixture.channel_samples(_shard(x, (2, 5), rank, WORLD))
    out = {}
    for limit in (None, 10):
        torch.manual_seed(rank)  # the ranks' generators differ: rank 0's draw is used
        out[limit] = gather_channel_samples(local, limit).samples
    return out


def _synchronised_steps_read_nothing_on_the_host(rank: int) -> dict:
    """On the path CUDA takes, a synchronised training step after the first (whose k-means start gathers
    the ranks' batch sizes on the host, once) reads no tensor value in Python, forward and backward."""
    layers = {"ucb": cbnorm.UCBNorm(3, 3, affine=True), "mn": cbnorm.MixtureNorm(3, 3, affine=True)}
    failures = {}
    for name, layer in layers.items():
        layer = convert_sync_cbnorm(layer)
        layer(torch.randn(4, 3, 5))
        try:
            with mock.patch.object(_base, "_host_checks", lambda t: False), no_host_reads():
                layer(torch.randn(4, 3, 5, requires_grad=True)).square().sum().backward()
            failures[name] = None
        except AssertionError as error:
            failures[name] = "".join(traceback.format_exception(error))
    return failures


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for kernels in BACKENDS:
            os.environ["CBNORM_KERNELS"] = kernels
            results[kernels] = _run_scenarios(rank, WORLD)
        results["directional"] = _directional_derivative(rank)
        results["ddp"] = _ddp_training(rank, WORLD)
        results["errors"] = _errors_are_collective(rank)
        results["samples"] = _samples(rank)
        results["host_reads"] = _synchronised_steps_read_nothing_on_the_host(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def whole_batch():
    """Every scenario in this process on the whole batch, with each kernel backend."""
    results = {}
    for kernels in BACKENDS:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CBNORM_KERNELS", kernels)
            results[kernels] = _run_scenarios(0, 1)
    return results


def _assert_matches(got: list[dict], want: dict, what: str, tol: dict = TOL) -> None:
    """Rank results ``got`` against the one-process ``want``: outputs and input gradients concatenated,
    parameter gradients summed, state and eval output on every rank."""
    TOL = tol
    for step, y in enumerate(want["y"]):
        torch.testing.assert_close(
            torch.cat([g["y"][step] for g in got]), y, **TOL, msg=lambda m, w=f"{what} y step {step}": f"{w}: {m}"
        )
        torch.testing.assert_close(torch.cat([g["x_grad"][step] for g in got]), want["x_grad"][step], **TOL,
                                   msg=lambda m, w=f"{what} input grad step {step}": f"{w}: {m}")
        for name, grad in want["param_grad"][step].items():
            total = sum(g["param_grad"][step][name] for g in got)
            torch.testing.assert_close(
                total, grad, **TOL, msg=lambda m, w=f"{what} grad of {name} step {step}": f"{w}: {m}"
            )
    for g in got:
        assert g["state"].keys() == want["state"].keys()
        for name, value in want["state"].items():
            torch.testing.assert_close(g["state"][name], value, **TOL, msg=lambda m, w=f"{what} {name}": f"{w}: {m}")
        torch.testing.assert_close(g["eval"], want["eval"], **TOL, msg=lambda m, w=f"{what} eval output": f"{w}: {m}")
    for name, value in got[0]["state"].items():  # the ranks hold the very same state
        assert torch.equal(value, got[1]["state"][name]), f"{what}: {name} differs between ranks"


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("scenario", ["ucb", "ucb_subsampled", "ucb_empty_rank", "ucb_weight", "mn", "mn_float64"])
def test_two_ranks_equal_one_process_with_the_whole_batch(ranks, whole_batch, scenario, kernels):
    # MN in float32: its 8 EM steps amplify the rounding of sums taken in another order, up to 2e-5 in
    # one input gradient of size 0.3 (6e-5 relative); in float64 every difference is below 1e-12.
    tol = dict(atol=5e-5, rtol=1e-4) if scenario == "mn" else TOL
    _assert_matches([r[kernels][scenario] for r in ranks], whole_batch[kernels][scenario], f"{scenario}/{kernels}", tol)


@pytest.mark.parametrize("kernels", BACKENDS)
def test_k1_and_sync_batchnorm_equal_batchnorm_over_the_global_batch(ranks, whole_batch, kernels):
    """SyncBatchNorm's definition: BatchNorm over the global batch. UCB-Norm with K=1 and cbnorm's CPU
    SyncBatchNorm on two ranks both equal nn.BatchNorm2d on the whole batch, running statistics included."""
    bn = whole_batch[kernels]["bn"]["sync_bn"]  # one process: the converted BatchNorm is plain BatchNorm
    _assert_matches([r[kernels]["bn"]["sync_bn"] for r in ranks], bn, "SyncBatchNorm")
    ucb = [r[kernels]["bn"]["ucb"] for r in ranks]
    for step, y in enumerate(bn["y"]):
        torch.testing.assert_close(torch.cat([u["y"][step] for u in ucb]), y, **TOL)
        torch.testing.assert_close(torch.cat([u["x_grad"][step] for u in ucb]), bn["x_grad"][step], **TOL)
    for u in ucb:
        torch.testing.assert_close(u["state"]["running_mean"][0], bn["state"]["running_mean"], **TOL)
        torch.testing.assert_close(u["state"]["running_var"][0], bn["state"]["running_var"], **TOL)


def test_one_process_batchnorm_is_torch_batchnorm(whole_batch):
    """The reference of the test above is torch's own BatchNorm (outside distributed training the converted
    layer is nn.SyncBatchNorm, which is BatchNorm)."""
    steps = _steps(UNEVEN, (4, 3, 3), seed=4)
    bn = nn.BatchNorm2d(4, affine=False)
    for (x, _, _), y in zip(steps, whole_batch["auto"]["bn"]["sync_bn"]["y"]):
        torch.testing.assert_close(bn(x), y)


def test_gradient_flows_through_the_reduction(ranks):
    d = [r["directional"] for r in ranks]
    assert d[0] == d[1]
    assert d[0]["analytic"] == pytest.approx(d[0]["numeric"], rel=1e-7, abs=1e-9)


def test_ddp_training_with_an_empty_rank_equals_one_process(ranks):
    want = _ddp_training(0, 1)
    for r in ranks:
        for name, value in want.items():
            torch.testing.assert_close(r["ddp"][name], value, **TOL, msg=name)


def test_errors_are_raised_on_every_rank_and_leave_the_state(ranks):
    errors = [{k: re.sub(r" \(input of shape .*\)", "", v) if isinstance(v, str) else v for k, v in r["errors"].items()}
              for r in ranks]
    assert errors[0] == errors[1]
    assert "some rank contains non-finite values" in errors[0]["nan_at_init"]
    assert "contains non-finite values" in errors[0]["nan_later"] and "contains non-finite" in errors[0]["nan_mn"]
    for name in ("one_value", "one_value_at_init", "one_value_mn_at_init"):  # at init: before the k-means start
        assert "expected at least 2 values per channel in the global batch when training, got 1 over the 2 ranks" \
            in errors[0][name], name
    assert errors[0]["huge_later"].startswith("UCBNorm: the global training batch contains non-finite values (NaN or "
                                              "Inf) on some rank, or values whose statistics overflow torch.float32")
    assert all(errors[0][k] for k in errors[0] if k.endswith("_unchanged"))


def test_synchronised_steps_read_nothing_on_the_host(ranks):
    for r in ranks:
        assert r["host_reads"] == {"ucb": None, "mn": None}


def test_gathered_samples_are_those_of_the_whole_batch(ranks):
    x = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(6))
    rows = cbnorm.mixture.channel_samples(x)
    torch.manual_seed(0)
    subsample = cbnorm.mixture.channel_samples(x, 10)
    for r in ranks:
        assert torch.equal(r["samples"][None], rows)
        assert torch.equal(r["samples"][10], subsample)


# -- conversion, in one process -------------------------------------------------------------------------


def _model():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), cbnorm.UCBNorm(6, 3, affine=True),
                         cbnorm.MixtureNorm(6, 2), cbnorm.SCBNorm(6, 2), cbnorm.UCBNorm(6, 2, update="weight"))


def test_convert_keeps_parameters_buffers_and_mode():
    model = _model()
    model[2].eval()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_cbnorm(model)
    assert converted is model
    assert type(model[1]) is SyncBatchNorm and not isinstance(model[1], nn.SyncBatchNorm)  # DDP refuses those on CPU
    assert type(model[2]) is cbnorm.UCBNorm and not isinstance(model[2], nn.modules.batchnorm._BatchNorm)
    assert [m.sync_statistics for m in (model[2], model[3], model[5])] == [True] * 3
    assert not hasattr(model[4], "sync_statistics") and model[2].process_group is None
    assert not model[2].training and model[1].training and model[3].training
    for name, p in model.named_parameters():
        assert p is params[name]
    for name, b in model.named_buffers():
        assert b is buffers[name]
    fresh = convert_sync_cbnorm(_model())
    fresh.load_state_dict(model.state_dict())
    assert fresh.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_converted_model_outside_distributed_training_is_unchanged():
    torch.manual_seed(3)
    plain = _model()[:4]
    converted = convert_sync_cbnorm(_model()[:4])
    converted.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 6, 6)
    for mode in (True, False):
        plain.train(mode), converted.train(mode)
        torch.manual_seed(0)
        want = plain(x)
        torch.manual_seed(0)
        assert torch.equal(converted(x), want)


def test_convert_a_batchnorm_root_and_a_process_group_attribute():
    bn = nn.BatchNorm1d(5)
    sync = convert_sync_cbnorm(bn, process_group="group")
    assert type(sync) is SyncBatchNorm and sync.weight is bn.weight and sync.process_group == "group"
    assert convert_sync_cbnorm(nn.BatchNorm1d(5), batchnorm=False).__class__ is nn.BatchNorm1d
    layer = convert_sync_cbnorm(cbnorm.MixtureNorm(3), "group")
    assert layer.sync_statistics and layer.process_group == "group"
