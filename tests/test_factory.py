import functools

import pytest
import torch
from torch import nn

import cbnorm


class TestRegistry:
    def test_names(self):
        assert {"batchnorm", "scb", "scb_base", "ucb"} <= set(cbnorm.norm_layer_names())
        assert cbnorm.get_norm_layer("ucb") is cbnorm.UCBNorm
        assert cbnorm.get_norm_layer("SCB-base") is cbnorm.SCBNormBase
        assert cbnorm.get_norm_layer("batchnorm") is nn.BatchNorm2d

    def test_classes_and_partials(self):
        assert cbnorm.get_norm_layer(cbnorm.SCBNorm) is cbnorm.SCBNorm
        layer = cbnorm.create_norm_layer(functools.partial(cbnorm.UCBNorm, num_components=5), 8)
        assert isinstance(layer, cbnorm.UCBNorm) and layer.num_components == 5
        layer = cbnorm.create_norm_layer("scb", 8, num_clusters=2, affine=True)
        assert layer.num_clusters == 2 and layer.affine

    def test_register(self, monkeypatch):
        monkeypatch.setattr(cbnorm.factory, "_NORM_LAYERS", dict(cbnorm.factory._NORM_LAYERS))
        cbnorm.register_norm_layer("test_layernorm", lambda c, **kw: nn.GroupNorm(1, c, **kw))
        assert isinstance(cbnorm.create_norm_layer("test_layernorm", 8), nn.GroupNorm)
        with pytest.raises(ValueError, match=r"norm layer 'ucb' is already registered"):
            cbnorm.register_norm_layer("ucb", nn.BatchNorm2d)

    def test_errors(self):
        with pytest.raises(ValueError, match=r"unknown norm layer 'groupnorm'; expected one of \[.*'scb'.*'ucb'"):
            cbnorm.get_norm_layer("groupnorm")
        with pytest.raises(ValueError, match=r"expected a norm layer name, class or partial, got int"):
            cbnorm.get_norm_layer(3)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6))


class TestConvertBatchnorm:
    def test_all(self):
        net = cbnorm.convert_batchnorm(small_net(), "ucb", num_components=2)
        assert [type(m) for m in net] == [nn.Conv2d, cbnorm.UCBNorm, nn.ReLU, nn.Conv2d, cbnorm.UCBNorm]
        assert net[4].num_features == 6 and net[4].num_components == 2
        assert net(torch.randn(2, 3, 9, 9)).shape == (2, 6, 5, 5)

    def test_only(self):
        net = cbnorm.convert_batchnorm(small_net(), "scb", only=["4"], num_clusters=3)
        assert isinstance(net[1], nn.BatchNorm2d) and isinstance(net[4], cbnorm.SCBNorm)
        with cbnorm.cluster_context(torch.tensor([0, 2])):
            assert net(torch.randn(2, 3, 9, 9)).shape == (2, 6, 5, 5)

    def test_nested_device_dtype_and_mode(self):
        net = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))).double().eval()
        net = cbnorm.convert_batchnorm(net, cbnorm.UCBNorm)
        layer = net[0][1]
        assert isinstance(layer, cbnorm.UCBNorm) and layer.running_mean.dtype == torch.float64 and not layer.training

    def test_root_batchnorm(self):
        assert isinstance(cbnorm.convert_batchnorm(nn.BatchNorm2d(4), "ucb"), cbnorm.UCBNorm)

    def test_unknown_names(self):
        with pytest.raises(ValueError, match=r"\['2'\] are not BatchNorm layers of the model; its BatchNorm layers are \['1', '4'\]"):
            cbnorm.convert_batchnorm(small_net(), "ucb", only=["2"])
