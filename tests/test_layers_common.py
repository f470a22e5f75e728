"""What every layer promises alike: a rejected training batch changes nothing, finite inputs give finite
posteriors, a failed load changes nothing, no forward or backward reads a device value on the host, and
``torch.compile(fullgraph=True)`` traces train and eval."""

import pytest
import torch
from torch import nn

import cbnorm
from cbnorm import functional as F
from tests.utils import device_path, no_host_reads

MIXTURE_LAYERS = {
    "ucb": lambda **kw: cbnorm.UCBNorm(4, 3, **kw),
    "ucb_weight": lambda **kw: cbnorm.UCBNorm(4, 3, update="weight", **kw),
    "mn": lambda **kw: cbnorm.MixtureNorm(4, 3, **kw),
}
SUPERVISED_LAYERS = {
    "scb": lambda **kw: cbnorm.SCBNorm(4, 3, **kw),
    "scb_base": lambda **kw: cbnorm.SCBNormBase(4, 3, **kw),
}
LAYERS = {**MIXTURE_LAYERS, **SUPERVISED_LAYERS}
NAMES = {"ucb": "UCBNorm", "ucb_weight": "UCBNorm", "mn": "MixtureNorm", "scb": "SCBNorm", "scb_base": "SCBNormBase"}


def modes(n=16, c=4, length=3, **kw):
    """Three well separated modes per channel."""
    return torch.randn(n, c, length, **kw) + 4.0 * torch.randint(0, 3, (n, c, length), **kw)


def call(layer, x, name):
    if name in SUPERVISED_LAYERS:
        return layer(x, torch.arange(x.shape[0], device=x.device) % 3)
    return layer(x)


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}, getattr(layer, "_initialized", None)


def assert_unchanged(layer, before):
    state, initialized = before
    after = layer.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert getattr(layer, "_initialized", None) == initialized


class TestRejectedBatch:
    CASES = {
        "one_sample": (lambda: torch.randn(1, 4), r"expected more than 1 value per channel when training, "
                                                   r"got input of shape \(1, 4\)"),
        "no_sample": (lambda: torch.randn(0, 4, 3), r"expected (more than|at least) 1 value per channel when training, "
                                                     r"got input of shape \(0, 4, 3\)"),
        "nan": (lambda: modes().index_fill_(0, torch.tensor([2]), float("nan")),
                r"the training batch contains non-finite values \(NaN or Inf\); the layer's state was left unchanged"),
        "huge": (lambda: modes() * 1e20, r"the training batch is finite, but its statistics overflow torch.float32: "
                                          r"its largest magnitude is [0-9.]+e\+2[0-9] \(the largest torch.float32 is "
                                          r"3.4e\+38\); scale the input down; the layer's state was left unchanged"),
    }

    @pytest.mark.parametrize("initialized", [False, True], ids=["fresh", "initialized"])
    @pytest.mark.parametrize("case", CASES)
    @pytest.mark.parametrize("name", MIXTURE_LAYERS)
    def test_changes_no_state(self, name, case, initialized, device, monkeypatch):
        monkeypatch.setenv("CBNORM_SYNC_CHECKS", "1")  # on CUDA, the synchronous errors (docs/gpu-errors.md)
        layer = MIXTURE_LAYERS[name](device=device)
        if initialized:
            layer(modes(device=device))
        make_batch, match = self.CASES[case]
        if name == "ucb_weight" and (case == "one_sample" or (initialized and case in ("no_sample", "huge"))):
            pytest.skip("Eq. 15 needs no batch statistics: UCB-Norm(update='weight') takes these batches")
        before = snapshot(layer)
        with pytest.raises(ValueError, match=f"^{NAMES[name]}: {match}"):
            layer(make_batch().to(device))
        assert_unchanged(layer, before)
        layer(modes(device=device))  # and the layer trains on as if the bad batch had never come
        assert torch.isfinite(layer.mean).all() and bool(layer.initialized)

    def test_one_sample_batch_does_not_seed_ucb_norm(self):
        """Regression: a (1, C) batch ran the k-means start from its one sample before it was rejected, and the
        layer never found the modes afterwards."""
        layer, clean = cbnorm.UCBNorm(1, 3), cbnorm.UCBNorm(1, 3)
        with pytest.raises(ValueError):
            layer(torch.zeros(1, 1))
        for _ in range(30):
            x = torch.randn(64, 1) * 0.1 + 4.0 * torch.randint(0, 3, (64, 1))
            layer(x), clean(x)
        torch.testing.assert_close(layer.mean[:, 0], torch.tensor([0.0, 4.0, 8.0]), atol=0.2, rtol=0)

    @pytest.mark.parametrize("name", MIXTURE_LAYERS)
    def test_rejected_on_the_device_path(self, name, monkeypatch):
        """Where checks are device-side assertions (CUDA, torch.compile), a rejected batch raises there, and the
        state updates, masked by the check, change nothing either."""
        device_path(monkeypatch)
        layer = MIXTURE_LAYERS[name]()
        layer(modes())
        before = snapshot(layer)
        with pytest.raises(RuntimeError, match=f"{NAMES[name]}: the training batch contains non-finite values"):
            layer(modes().index_fill_(0, torch.tensor([2]), float("nan")))
        assert_unchanged(layer, before)

    @pytest.mark.parametrize("name", SUPERVISED_LAYERS)
    def test_cluster_ids_out_of_range_on_the_device_path(self, name, monkeypatch):
        device_path(monkeypatch)
        with pytest.raises(RuntimeError, match=f"{NAMES[name]}: a cluster id is out of range for num_clusters=3"):
            LAYERS[name]()(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 0]))


class TestLoadStateDict:
    @pytest.mark.parametrize("bad", ["K=5", "C+1", "missing"])
    @pytest.mark.parametrize("name", MIXTURE_LAYERS)
    def test_failed_load_changes_nothing(self, name, bad):
        fresh = MIXTURE_LAYERS[name]()
        if bad == "K=5":
            source = cbnorm.UCBNorm(4, 5, update=fresh.update) if name != "mn" else cbnorm.MixtureNorm(4, 5)
        elif bad == "C+1":
            source = cbnorm.UCBNorm(5, 3, update=fresh.update) if name != "mn" else cbnorm.MixtureNorm(5, 3)
        else:
            source = MIXTURE_LAYERS[name]()
        source(modes(c=source.num_features))
        state = source.state_dict()
        if bad == "missing":
            del state["loc" if name == "ucb_weight" else "running_mean"]
        before = snapshot(fresh)
        with pytest.raises(RuntimeError, match="Error"):
            fresh.load_state_dict(state)
        assert_unchanged(fresh, before)
        assert not fresh.initialized and not fresh._initialized

    @pytest.mark.parametrize("name", MIXTURE_LAYERS)
    def test_partial_load_keeps_the_flag(self, name):
        source, fresh = MIXTURE_LAYERS[name](), MIXTURE_LAYERS[name]()
        source(modes())
        state = source.state_dict()
        del state["log_var" if name == "ucb_weight" else "running_var"]
        fresh.load_state_dict(state, strict=False)
        assert not fresh.initialized and not fresh._initialized  # the next batch seeds the whole mixture


class TestHugeInputs:
    LAYERS = {**MIXTURE_LAYERS, **{f"scb_{unknown}_{scope}": (lambda u=unknown, s=scope: cbnorm.SCBNorm(4, 3, unknown=u,
                                                                                                 posterior=s))
                                   for unknown in F.UNKNOWN_RULES for scope in F.POSTERIOR_SCOPES}}

    @pytest.mark.parametrize("kernels", ["native", "eager"])
    @pytest.mark.parametrize("name", LAYERS)
    def test_eval_posteriors_stay_finite(self, name, kernels, monkeypatch):
        """float32 beyond ~1.8e19 squared past its largest value in the log-density: all NaN. The posteriors now
        take their limit there, so float32 gives float64's output, which does not overflow at 1e20."""
        monkeypatch.setenv("CBNORM_KERNELS", kernels)
        layer = self.LAYERS[name]().double()
        if name.startswith("scb"):
            with torch.no_grad():
                layer.loc.copy_(torch.randn(3, 4))
                layer.log_var.copy_(torch.randn(3, 4))
        else:
            layer(modes(dtype=torch.float64))
        layer.eval()
        x = torch.tensor([[1e20] * 4, [-3e20] * 4, [1.0] * 4, [1e30] * 4], dtype=torch.float64)
        x32 = x.float().requires_grad_()
        y32 = layer.float()(x32)
        y32.sum().backward()
        assert torch.isfinite(y32).all() and torch.isfinite(x32.grad).all()
        y64 = layer.double()(x)
        torch.testing.assert_close(y32[:3].double(), y64[:3], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("kernels", ["native", "eager"])
    def test_wide_components(self, kernels, monkeypatch):
        """Variances above 4 (|quad_coef| < 1/8): the room of the logits over |quad_coef| overflowed, so the bounds
        were infinite and the logits NaN; and the eager twin's p * p overflowed at the bounds."""
        monkeypatch.setenv("CBNORM_KERNELS", kernels)
        layer = cbnorm.UCBNorm(4, 3).double()
        layer(10 * modes(dtype=torch.float64))
        layer.eval()
        x = torch.tensor([[1e20] * 4, [-3e20] * 4, [1.0] * 4, [1e30] * 4], dtype=torch.float64)
        assert (layer.running_var > 4).all()
        x32 = x.float().requires_grad_()
        y32 = layer.float()(x32)
        y32.sum().backward()
        assert torch.isfinite(y32).all() and torch.isfinite(x32.grad).all()
        torch.testing.assert_close(y32[:3].double(), layer.double()(x)[:3], rtol=1e-5, atol=1e-5)

    def test_float32_gradients_with_a_prior_far_below_the_others(self):
        """A UCB-Norm(update='weight') prior logit 80 below the others: its prior, e^-80, is far below float32
        epsilon, and the gradient of (prior var)^(-1/2) overflowed to inf, then NaN."""
        grads = {}
        for dtype in (torch.float64, torch.float32):
            torch.manual_seed(0)
            layer = cbnorm.UCBNorm(2, 3, update="weight", dtype=dtype)
            with torch.no_grad():
                layer.loc.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, 2.0]]))
                layer.log_var.zero_()
                layer.prior_logits.copy_(torch.tensor([0.0, 0.0, -80.0]))
            layer._mark_initialized(True)
            x, g = torch.randn(16, 2, 5, dtype=torch.float64), torch.randn(16, 2, 5, dtype=torch.float64)
            (layer(x.to(dtype)) * g.to(dtype)).sum().backward()
            grads[dtype] = {n: p.grad.double() for n, p in layer.named_parameters()}
        for n, grad in grads[torch.float64].items():
            torch.testing.assert_close(grads[torch.float32][n], grad, rtol=1e-4, atol=1e-6, msg=n)


class TestNoHostSynchronisation:
    @pytest.mark.parametrize("name", LAYERS)
    def test_device_path_reads_nothing_on_the_host(self, name, monkeypatch):
        """The path CUDA takes, on the CPU: no value of a tensor is read by Python, and none of the operators
        that read one inside (multinomial's check, one_hot's range check) is called, in train (the first
        batch's k-means start included), backward and eval."""
        device_path(monkeypatch)
        layer = LAYERS[name](affine=True)
        x = modes().requires_grad_()
        call(layer, x, name)  # warm-up: lazy kernel build, which may read values
        layer = LAYERS[name](affine=True)
        with no_host_reads():
            for _ in range(2):
                call(layer, x, name).square().sum().backward()
            call(layer.eval(), x, name)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("name", LAYERS)
    def test_cuda_training_step_under_sync_debug_mode(self, name):
        layer = LAYERS[name](affine=True, device="cuda")
        x = modes(device="cuda").requires_grad_()
        call(layer, x, name).sum().backward()  # kernel builds and caches outside the checked steps
        layer = LAYERS[name](affine=True, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                call(layer, x, name).square().sum().backward()
            call(layer.eval(), x, name)
        finally:
            torch.cuda.set_sync_debug_mode("default")


class TestCompile:
    """``torch.compile(fullgraph=True)`` in train and eval is tested with each layer (test_ucb, test_scb,
    test_mixture_norm, test_kernels); here, the first training batch, k-means start included, in the graph."""

    @pytest.mark.parametrize("name", MIXTURE_LAYERS)
    def test_first_batch_in_the_graph(self, name, device):
        layer = MIXTURE_LAYERS[name](device=device)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(modes(device=device))
        assert layer.initialized and layer._initialized and torch.isfinite(y).all()
        start = layer.fit_mean if name == "mn" else layer.mean  # MixtureNorm's running mean starts at 0
        modes_found = start.sort(0).values
        torch.testing.assert_close(modes_found, torch.tensor([[0.0], [4.0], [8.0]], device=device).expand(3, 4),
                                   atol=1.0, rtol=0)


class TestSingleComponentIsBatchNorm:
    def test_ucb_norm_k1_against_batchnorm(self):
        """Training outputs are BatchNorm's from the first batch on. The running state starts from the first
        batch's own statistics (the SPEC's k-means start; with K = 1 it is the batch's mean and biased variance)
        where BatchNorm's starts from (0, 1); both then follow the same update, so they differ by
        (1 - momentum)^t times that start's difference after t batches, and not at all with momentum=None."""
        for momentum in (0.1, None):
            norm, bn = cbnorm.UCBNorm(4, 1, momentum=momentum).double(), nn.BatchNorm2d(4, affine=False,
                                                                                          momentum=momentum).double()
            batches = [3 * torch.randn(16, 4, 5, 5, dtype=torch.float64) + 2 for _ in range(4)]
            first = batches[0]
            start_mean, start_var = first.mean((0, 2, 3)), first.var((0, 2, 3), correction=0)
            for t, x in enumerate(batches, 1):
                norm.train(), bn.train()
                torch.testing.assert_close(norm(x), bn(x), rtol=1e-10, atol=1e-10)
                decay = 0.0 if momentum is None else (1 - momentum) ** t
                torch.testing.assert_close(norm.running_mean[0], bn.running_mean + decay * start_mean)
                torch.testing.assert_close(norm.running_var[0], bn.running_var + decay * (start_var - 1))
                norm.eval(), bn.eval()
                if momentum is None:
                    torch.testing.assert_close(norm(x), bn(x), rtol=1e-10, atol=1e-10)

    def test_ucb_norm_k1_from_batchnorm_state_is_batchnorm(self):
        """Loaded with BatchNorm's initial state, K = 1 is BatchNorm in train and eval, step for step."""
        norm, bn = cbnorm.UCBNorm(4, 1), nn.BatchNorm2d(4, affine=False)
        norm.load_state_dict({**norm.state_dict(), "initialized": torch.tensor(True)})
        for _ in range(3):
            x = 3 * torch.randn(16, 4, 5, 5) + 2
            norm.train(), bn.train()
            torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)
            norm.eval(), bn.eval()
            torch.testing.assert_close(norm(x), bn(x), rtol=1e-5, atol=1e-5)
