"""cbnorm.preserve_running_stats: forwards that leave every running statistic as it was."""

import copy

import pytest
import torch
from torch import nn

import cbnorm


def model(**ucb):
    """BatchNorm, UCB-Norm and MixtureNorm in one network, in training mode and not yet initialised."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), cbnorm.UCBNorm(4, 2, **ucb), nn.ReLU(),
                         cbnorm.MixtureNorm(4, 2), nn.Flatten(), nn.Linear(4 * 36, 2))


def snapshot(net):
    """Every buffer, with its identity and autograd version."""
    return {name: (b, b.clone(), b._version) for name, b in net.named_buffers()}


def assert_unchanged(net, before):
    after = dict(net.named_buffers())
    assert after.keys() == before.keys()
    for name, (buffer, value, version) in before.items():
        assert after[name] is buffer and buffer._version == version, name
        assert torch.equal(buffer, value), name


class TestPreserveRunningStats:
    def test_forward_computes_as_usual_and_changes_no_buffer(self):
        net, x = model(), torch.randn(5, 3, 8, 8)
        net(x)  # initialised, running statistics moved once
        twin = copy.deepcopy(net)
        before = snapshot(net)
        with cbnorm.preserve_running_stats(net):
            y = net(x * 2 + 1)
            torch.testing.assert_close(y, twin(x * 2 + 1))
            torch.testing.assert_close(net(x - 1), twin(x - 1))  # the block sees its own updates
        assert_unchanged(net, before)
        torch.testing.assert_close(copy.deepcopy(net)(x * 2 + 1), y)
        y.sum().backward()
        assert all(p.grad is not None for p in net.parameters())

    def test_earlier_graph_can_still_be_differentiated(self):
        net, x = model(), torch.randn(5, 3, 8, 8)
        first = net(x)  # BatchNorm's backward holds its running buffers
        with cbnorm.preserve_running_stats(net):
            second = net(x[:3] * 3)
        (first.sum() + second.sum()).backward()  # an in-place restore would make this raise

    def test_first_batch_initialisation_is_undone(self):
        net, x = model(), torch.randn(5, 3, 8, 8)
        fresh = copy.deepcopy(net)
        before = snapshot(net)
        with cbnorm.preserve_running_stats(net):
            net(x * 3)  # the k-means start of UCB-Norm and MixtureNorm runs on these
        assert_unchanged(net, before)
        assert not bool(net[2].initialized) and not bool(net[4].initialized)
        torch.manual_seed(1)
        y = net(x)
        torch.manual_seed(1)
        torch.testing.assert_close(y, fresh(x))  # starts from this batch, as a fresh model does
        for name, buffer in fresh.named_buffers():
            assert torch.equal(dict(net.named_buffers())[name], buffer), name

    def test_restored_on_exception(self):
        net, x = model(), torch.randn(5, 3, 8, 8)
        net(x)
        before = snapshot(net)
        with pytest.raises(RuntimeError, match="inside"), cbnorm.preserve_running_stats(net):
            net(x * 2)
            raise RuntimeError("inside")
        assert_unchanged(net, before)

    def test_shared_buffers_stay_shared(self):
        first, second = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        second.running_mean = first.running_mean
        net, shared = nn.Sequential(first, second), first.running_mean
        with cbnorm.preserve_running_stats(net):
            assert first.running_mean is second.running_mean and first.running_mean is not shared
            net(torch.randn(4, 3) + 5)
        assert first.running_mean is second.running_mean is shared and torch.equal(shared, torch.zeros(3))

    def test_uninitialised_weight_update_is_refused(self):
        net = model(update="weight")
        before = snapshot(net)
        message = r"preserve_running_stats: UCBNorm 2 with update='weight' has not seen a training batch, and its first"
        with pytest.raises(ValueError, match=message), cbnorm.preserve_running_stats(net):
            pytest.fail("entered")
        assert_unchanged(net, before)
        with cbnorm.preserve_running_stats(net.eval()):  # inference sets nothing
            net(torch.randn(2, 3, 8, 8))
        net.train()(torch.randn(5, 3, 8, 8))
        loc = net[2].loc.detach().clone()
        with cbnorm.preserve_running_stats(net):
            net(torch.randn(5, 3, 8, 8))
        assert torch.equal(net[2].loc, loc)
