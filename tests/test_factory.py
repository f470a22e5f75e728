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


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(cbnorm.factory, "_NORM_LAYERS", dict(cbnorm.factory._NORM_LAYERS))


class TestRegistryMetadata:
    def test_builtin_layers_declare_k_and_cluster_ids(self):
        info = cbnorm.norm_layer_info
        assert info("scb") == (cbnorm.SCBNorm, "num_clusters", True)
        assert info("SCB-base") == (cbnorm.SCBNormBase, "num_clusters", True)
        assert info("ucb") == (cbnorm.UCBNorm, "num_components", False)
        assert info("mn") == (cbnorm.MixtureNorm, "num_components", False)
        assert info("batchnorm") == (nn.BatchNorm2d, None, False)

    @pytest.mark.parametrize("name", ["scb", "scb_base", "ucb", "mn"])
    def test_k_reaches_every_layer_that_has_one(self, name):
        layer = cbnorm.create_norm_layer(name, 6, k=4)
        assert getattr(layer, cbnorm.norm_layer_info(name).k_arg) == 4 and layer.num_features == 6

    def test_k_errors(self):
        with pytest.raises(ValueError, match=r"create_norm_layer: 'batchnorm' declares no K, got k=3"):
            cbnorm.create_norm_layer("batchnorm", 6, k=3)
        with pytest.raises(ValueError, match=r"K given twice, as k=3 and num_components=2"):
            cbnorm.create_norm_layer("ucb", 6, k=3, num_components=2)

    def test_classes_partials_and_subclasses_take_the_registered_entry(self):
        class Tuned(cbnorm.UCBNorm):
            pass

        five = functools.partial(cbnorm.SCBNorm, num_clusters=5)
        assert cbnorm.norm_layer_info(Tuned) == (Tuned, "num_components", False)
        assert cbnorm.norm_layer_info(five) == (five, "num_clusters", True)
        assert cbnorm.create_norm_layer(five, 6, k=2).num_clusters == 2  # k wins over the partial's, as a call's keyword does
        assert cbnorm.norm_layer_info(nn.GroupNorm) == (nn.GroupNorm, None, False)  # unknown: declares nothing
        with pytest.raises(ValueError, match=r"nn.modules.normalization.GroupNorm'> declares no K, got k=2"):
            cbnorm.create_norm_layer(nn.GroupNorm, 6, k=2)

    def test_register_with_metadata(self, registry):
        def grouped(num_features, groups=1):
            return nn.GroupNorm(groups, num_features)

        cbnorm.register_norm_layer("grouped", grouped, k_arg="groups")
        assert cbnorm.create_norm_layer("grouped", 6, k=3).num_groups == 3
        assert cbnorm.norm_layer_info(grouped).k_arg == "groups"
        cbnorm.register_norm_layer("grouped", grouped, k_arg="groups")  # the same entry again: nothing to do
        with pytest.raises(ValueError, match=r"norm layer 'grouped' is already registered as NormLayerInfo\("):
            cbnorm.register_norm_layer("grouped", grouped, k_arg="groups", takes_clusters=True)
        cbnorm.register_norm_layer("grouped", grouped, k_arg="groups", takes_clusters=True, overwrite=True)
        assert cbnorm.norm_layer_info("grouped").takes_clusters
        with pytest.raises(ValueError, match=r"expected k_arg to be a keyword name or None, got 'num groups'"):
            cbnorm.register_norm_layer("other", grouped, k_arg="num groups")
        assert "other" not in cbnorm.norm_layer_names()

    def test_registered_partial_keeps_its_own_entry(self, registry):
        five = functools.partial(cbnorm.UCBNorm, num_components=5)
        cbnorm.register_norm_layer("ucb5", five)
        assert cbnorm.norm_layer_info("ucb5") == cbnorm.norm_layer_info(five) == (five, None, False)

    def test_harness_reads_the_registry_not_signatures(self, registry):
        from cbnorm.experiments.train import norm_kwargs, supervised_norm

        def grouped(num_features, groups=1):  # a signature that names neither K nor cluster ids
            return nn.GroupNorm(groups, num_features)

        cbnorm.register_norm_layer("grouped", grouped, k_arg="groups", takes_clusters=True)
        assert supervised_norm("grouped") and norm_kwargs("grouped", 3, {"eps": 0.1}) == {"groups": 3, "eps": 0.1}
        assert norm_kwargs("ucb", 3, {"num_components": 5}) == {"num_components": 5}  # the explicit one wins
        assert norm_kwargs("scb", 3, {}) == {"num_clusters": 3} and supervised_norm("scb_base")
        assert norm_kwargs("batchnorm", 3, {}) == {} and not supervised_norm("ucb") and not supervised_norm("none")


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

    def test_k(self):
        net = cbnorm.convert_batchnorm(small_net(), "mn", k=2)
        assert net[1].num_components == net[4].num_components == 2

    def test_root_batchnorm(self):
        assert isinstance(cbnorm.convert_batchnorm(nn.BatchNorm2d(4), "ucb"), cbnorm.UCBNorm)

    def test_unknown_names(self):
        with pytest.raises(ValueError, match=r"\['2'\] are not BatchNorm layers of the model; its BatchNorm layers are \['1', '4'\]"):
            cbnorm.convert_batchnorm(small_net(), "ucb", only=["2"])
