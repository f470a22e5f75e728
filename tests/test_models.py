import functools

import pytest
import torch
from torch import nn

import cbnorm
from cbnorm.experiments.models import DenseNet, ShallowCNN, build_model


def norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, cbnorm.SCBNorm,
                                                                              cbnorm.SCBNormBase, cbnorm.UCBNorm))]


class TestShallowCNN:
    @pytest.mark.parametrize("size,channels", [(32, 3), (64, 3), (28, 1), (8, 1)])
    def test_any_image_size(self, size, channels):
        net = ShallowCNN(7, in_channels=channels)
        assert net(torch.randn(2, channels, size, size)).shape == (2, 7)

    def test_table_iv_shapes(self):
        net = ShallowCNN()
        shapes = []
        for i in (1, 3, 5, 6, 7):  # pool1, pool2, pool3, conv4, pool4
            net.features[i].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
        net(torch.randn(2, 3, 32, 32))
        assert shapes == [(64, 16, 16), (128, 8, 8), (128, 4, 4), (256, 4, 4), (256, 1, 1)]

    def test_layer_under_test_replaces_the_third_bn(self):
        net = ShallowCNN(10, "ucb", norm_kwargs={"num_components": 4})
        found = norms(net)
        assert [type(m) for _, m in found] == [nn.BatchNorm2d, nn.BatchNorm2d, cbnorm.UCBNorm, nn.BatchNorm2d]
        assert found[2][0] == "features.4.1" and net.norm is found[2][1] and net.norm.num_components == 4
        assert isinstance(ShallowCNN(norm_layer=None).norm, nn.Identity)

    def test_scb_gets_ids_from_the_context(self):
        net = ShallowCNN(10, "scb", norm_kwargs={"num_clusters": 2})
        with torch.no_grad():
            net.norm.loc[1].fill_(3.0)
        x = torch.randn(4, 3, 32, 32)
        with cbnorm.cluster_context(torch.zeros(4, dtype=torch.long)):
            a = net(x)
        with cbnorm.cluster_context(torch.ones(4, dtype=torch.long)):
            b = net(x)
        assert not torch.allclose(a, b)
        with pytest.raises(ValueError, match="cluster ids are required in training mode"):
            net(x)


class TestDenseNet:
    @pytest.mark.parametrize("depth,params", [(40, 188_092), (100, 800_032)])
    def test_densenet_bc_size(self, depth, params):
        # DenseNet-BC-100 (k=12) on 100 classes has the published 0.8M parameters.
        net = DenseNet(depth, num_classes=100)
        assert sum(p.numel() for p in net.parameters()) == params
        bottlenecks = [m for m in net.modules() if type(m).__name__ == "Bottleneck"]
        assert len(bottlenecks) == 3 * (depth - 4) // 6

    def test_channels_and_shapes(self):
        net = DenseNet(40, num_classes=10)
        assert net.classifier.in_features == 132  # 24 + 6*12 = 96 -> 48 -> 120 -> 60 -> 132
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    def test_initial_layer(self):
        plain = DenseNet(40, 10)
        assert isinstance(plain.norm, nn.Identity)  # the BN model: the plain network
        net = DenseNet(40, 10, norm_layer="ucb", norm_kwargs={"num_components": 5})
        found = norms(net)
        assert found[0][0] == "norm" and isinstance(net.norm, cbnorm.UCBNorm) and net.norm.num_features == 3
        assert all(isinstance(m, nn.BatchNorm2d) for _, m in found[1:])
        seen = []
        net.features[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        x = torch.randn(4, 3, 32, 32)
        net.eval()(x)
        torch.testing.assert_close(seen[0], net.norm(x))  # the first conv sees the normalised image

    def test_block_norm_injectable(self):
        net = DenseNet(40, 10, block_norm=functools.partial(nn.GroupNorm, 1))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())

    def test_depth(self):
        with pytest.raises(ValueError, match=r"expected depth = 6n \+ 4 with n >= 1 \(40, 100, ...\), got 41"):
            DenseNet(41)


def test_build_model():
    net = build_model("densenet100", 10, 1, "scb", {"num_clusters": 5})
    assert isinstance(net.norm, cbnorm.SCBNorm) and net.norm.num_clusters == 5 and net.features[0].in_channels == 1
    with pytest.raises(ValueError, match=r"unknown model 'resnet'; expected one of \['densenet100', 'densenet40'"):
        build_model("resnet", 10, 3, None)
