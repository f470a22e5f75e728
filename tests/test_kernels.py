"""The fused mixture kernels against the straightforward reference (cbnorm._reference), on both backends."""

import itertools
import os
import shutil
import warnings

import pytest
import torch

import cbnorm
from cbnorm import _kernels, _native
from cbnorm import _reference as R
from cbnorm import functional as F
from tests.utils import compiled


@pytest.fixture(params=["native", "eager"])
def kernels(request, monkeypatch):
    """Run the test on the native CPU kernels, then on the pure-PyTorch ones."""
    if request.param == "native" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the native kernels")
    monkeypatch.setenv("CBNORM_KERNELS", request.param)  # "native" raises if the build fails
    return request.param


# (N, C, H, W) data in four memory layouts; L = 12 and C = 5 leave partial vectors in both kernels.
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "tokens": lambda x: x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2),  # channel_dim=-1 as a view
    "rows": lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]),  # (N, C)
    "strided": lambda x: x[:, :, ::2],  # neither layout: copied
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def mixture(num_components=3, channels=5, per_channel_prior=False, dtype=torch.float64):
    shape = (num_components, channels) if per_channel_prior else (num_components,)
    prior = torch.softmax(torch.randn(shape, dtype=dtype), 0)
    centres = torch.linspace(-2, 2, num_components, dtype=dtype).unsqueeze(1)
    mean = centres + 0.3 * torch.randn(num_components, channels, dtype=dtype)
    var = torch.rand(num_components, channels, dtype=dtype) + 0.2
    return prior, mean, var


def activations(shape=(6, 5, 4, 6), dtype=torch.float64, offset=0.0, spread=1.0):
    modes = torch.where(torch.rand(shape) < 0.4, -2.0, 2.0)
    return (offset + spread * (modes + 0.6 * torch.randn(shape))).to(dtype)


def affine(channels, dtype):
    return torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs, grad):
    out = fn(*inputs)
    y = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(y, inputs, grad)
    return out, grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_channel_prior", [False, True])
def test_training_matches_reference(kernels, layout, dtype, per_channel_prior):
    x = LAYOUTS[layout](activations(dtype=dtype))
    state = [t.to(dtype) for t in mixture(per_channel_prior=per_channel_prior)]
    params = leaves(x, *affine(5, dtype))
    grad = torch.randn_like(x)

    def run(impl):
        return outputs_and_grads(lambda x, w, b: impl(x, *state, w, b), params, grad)

    (y, stats), grads = run(F.ucb_norm_batch)
    (y_ref, stats_ref), grads_ref = run(R.ucb_norm_batch)
    torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=10 * TOLERANCE[dtype]["rtol"], atol=10 * TOLERANCE[dtype]["atol"])
    for got, want in zip(stats[:3], stats_ref[:3]):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        assert not got.requires_grad
    assert stats.count == stats_ref.count
    if layout != "strided":
        assert y.stride() == x.stride() and grads[0].stride() == x.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_matches_reference(kernels, layout, dtype):
    x = LAYOUTS[layout](activations(dtype=dtype))
    params = leaves(x, *mixture(dtype=dtype), *affine(5, dtype))
    grad = torch.randn_like(x)
    y, grads = outputs_and_grads(F.ucb_norm, params, grad)
    y_ref, grads_ref = outputs_and_grads(R.ucb_norm, params, grad)
    torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype])
    for got, want in zip(grads, grads_ref):  # x, prior, mean, var, weight, bias
        torch.testing.assert_close(got, want, rtol=10 * TOLERANCE[dtype]["rtol"], atol=10 * TOLERANCE[dtype]["atol"])
    if layout != "strided":
        assert y.stride() == x.stride()


def test_far_from_zero_float32(kernels):
    """Activations far from zero relative to their spread: no cancellation beyond the reference's."""
    x = activations(dtype=torch.float64, offset=50.0, spread=0.05)
    prior, mean, var = mixture()
    mean, var = 50.0 + 0.05 * mean, 0.0025 * var
    exact = R.ucb_norm_batch(x, prior, mean, var)[0]
    exact_eval = R.ucb_norm(x, prior, mean, var)
    state = [t.float() for t in (prior, mean, var)]
    err = (F.ucb_norm_batch(x.float(), *state)[0].double() - exact).abs().max()
    err_ref = (R.ucb_norm_batch(x.float(), *state)[0].double() - exact).abs().max()
    assert err <= max(2 * err_ref, 1e-5)
    err = (F.ucb_norm(x.float(), *state).double() - exact_eval).abs().max()
    err_ref = (R.ucb_norm(x.float(), *state).double() - exact_eval).abs().max()
    assert err <= max(2 * err_ref, 1e-5)


def test_posteriors_are_accurate_far_into_the_tail(kernels):
    """Posteriors of logit gaps up to log(smallest normal float) to float precision (the inline exp2).

    The native kernel takes the logits in base 2, rounded to float like any logit: against the
    posterior of those rounded logits the error is the exp2's alone; against the exact one it stays
    within what rounding a logit of that size to float costs (a relative 2^-24 of the gap).
    """
    gap = torch.linspace(0, 87, 4001)
    channels = gap.numel()
    zeros, ones = torch.zeros(channels), torch.ones(channels)
    log_coef, select = torch.stack([zeros, -gap]), torch.stack([zeros, ones])
    tau = _kernels.mixture_transform(torch.zeros(1, channels, 1), select * 0, log_coef, select * 0, select, select * 0)
    tau = tau.flatten().double()
    exact = torch.sigmoid(-gap.double())
    assert ((tau - exact).abs() / exact <= 2.4e-7 + 2 * 2**-24 * gap.double()).all()
    if kernels == "native":
        log2e = 1.4426950408889634
        rounded = torch.sigmoid(-(gap * log2e).double() / log2e)  # the base-2 logit rounded to float
        assert ((tau - rounded).abs() / rounded).max() < 1e-6


@pytest.mark.parametrize("rule,scope", list(itertools.product(F.UNKNOWN_RULES, F.POSTERIOR_SCOPES)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_scb_unknown_matches_reference(kernels, rule, scope, layout):
    x = LAYOUTS[layout](activations())
    _, mean, var = mixture()
    params = leaves(x, mean, var, *affine(5, torch.float64))
    grad = torch.randn_like(x)

    def run(impl):
        return outputs_and_grads(lambda x, m, v, w, b: impl(x, None, m, v, w, b, 1e-5, rule, scope), params, grad)

    (y, grads), (y_ref, grads_ref) = run(F.scb_norm), run(R.scb_norm)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_clusters_match_reference(kernels, layout, dtype):
    """SCB-Norm with cluster ids (Eq. 10) and the per-sample normalisation under it."""
    x = LAYOUTS[layout](activations(dtype=dtype))
    ids = torch.randint(0, 3, (x.shape[0],))
    _, mean, var = (t.to(dtype) for t in mixture())
    params = leaves(x, mean, var, *affine(5, dtype))
    grad = torch.randn_like(x)
    y, grads = outputs_and_grads(lambda x, *p: F.scb_norm(x, ids, *p), params, grad)
    y_ref, grads_ref = outputs_and_grads(lambda x, *p: R.scb_norm(x, ids, *p), params, grad)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    if layout != "strided":
        assert y.stride() == x.stride() and grads[0].stride() == x.stride()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_operator_gradcheck(kernels, layout):
    """Every input of both operators, in float64, with the kernel's partial vectors and blocks."""
    x = LAYOUTS[layout](activations((2, 5, 2, 5)))
    x3 = x.reshape(x.shape[0], 5, -1)
    _, mean, var = mixture()
    coefficients = [mean, -0.5 * var.log(), -0.5 / var]
    a, b = torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(_kernels.mixture_moments, leaves(x3, *coefficients))
    assert torch.autograd.gradcheck(_kernels.mixture_transform, leaves(x3, *coefficients, a, b))
    scale, shift = torch.rand(2, x3.shape[0], 5, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(_kernels.scale_shift, leaves(x3, scale, shift))


@pytest.mark.parametrize("rule,scope", [*itertools.product(F.UNKNOWN_RULES, F.POSTERIOR_SCOPES), ("known", None)])
def test_scb_gradcheck(kernels, rule, scope):
    x = activations((4, 3, 5))
    _, mean, var = mixture(2, 3)
    ids = torch.tensor([0, 1, 1, 0]) if rule == "known" else None

    def fn(x, mean, log_var, weight, bias):
        return F.scb_norm(x, ids, mean, log_var.exp(), weight, bias, 1e-5, *((rule, scope) if ids is None else ()))

    assert torch.autograd.gradcheck(fn, leaves(x, mean, var.log(), *affine(3, torch.float64)))
    soft = torch.softmax(torch.randn(4, 2, dtype=torch.float64), 1)
    maps = torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(F.scb_base_norm, leaves(x, soft, maps[0][0], maps[1][0], maps[0][1], maps[1][1]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_custom_operators_pass_opcheck(kernels, layout):
    """Schemas, fake implementations and autograd registrations, as torch.compile and export rely on them."""
    x = LAYOUTS[layout](activations((3, 5, 2, 3))).reshape(3, 5, 6)
    coefficients = leaves(*torch.randn(5, 2, 5, dtype=torch.float64))
    grad = torch.randn_like(x)
    scale, shift = leaves(*torch.rand(2, 3, 5, dtype=torch.float64))
    cases = [
        (_kernels._moments_op, (x.requires_grad_(), *coefficients[:3])),
        (_kernels._transform_op, (x, *coefficients)),
        (
            _kernels._transform_backward_op,
            (x.detach(), grad, *[t.detach() for t in coefficients], None, True, True, True),
        ),
        (_kernels._scale_shift_op, (x, scale, shift)),
        (_kernels._scale_shift_backward_op, (x.detach(), grad, scale.detach())),
        (_kernels._snapshot_op, (coefficients[:3],)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("per_channel_prior", [False, True])
def test_gradcheck_every_input(kernels, per_channel_prior):
    x = activations((4, 3, 5))
    state = mixture(2, 3, per_channel_prior)
    inputs = leaves(x, *state, *affine(3, torch.float64))
    assert torch.autograd.gradcheck(lambda *args: F.ucb_norm_batch(*args)[0], inputs)
    assert torch.autograd.gradcheck(F.ucb_norm, inputs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_training_backward(kernels, layout):
    """Running state as constants (UCB-Norm and MN training): one autograd node whose backward reduces once
    and writes the whole input gradient once; gradcheck in float64, the distributed seam included."""
    x = LAYOUTS[layout](activations((3, 4, 2, 3)))
    state = mixture(2, 4)
    inputs = leaves(x, *affine(4, torch.float64))
    y, _ = F.ucb_norm_batch(*inputs[:1], *state, *inputs[1:])
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_NormalizeWithMomentsBackward"
    for reduce_sums in (None, lambda s: 3 * s):
        def fn(x, weight, bias):
            return F.ucb_norm_batch(x, *state, weight, bias, reduce_sums=reduce_sums)[0]

        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradcheck(lambda w, b: fn(x, w, b), inputs[1:])  # x needs no gradient
    with pytest.raises(RuntimeError, match="twice"):  # no double backward: said, not silently wrong
        (grad,) = torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)
        grad.sum().backward()


def test_single_component_gradient_is_as_accurate_as_batchnorm(kernels):
    """K = 1 is BatchNorm: its float32 input gradient stays within a few float roundings of the float64 one
    (the posterior-weighted terms vanish exactly instead of leaving the rounding of the gradient's size)."""
    torch.manual_seed(0)
    x, grad = 3 * torch.randn(32, 16, 8, 8, dtype=torch.float64) + 1, torch.randn(32, 16, 8, 8, dtype=torch.float64)
    state = torch.ones(1, dtype=torch.float64), x.mean((0, 2, 3))[None], torch.ones(1, 16, dtype=torch.float64)

    def input_grad(dtype):
        (xd,) = leaves(x.to(dtype))
        F.ucb_norm_batch(xd, *[t.to(dtype) for t in state])[0].backward(grad.to(dtype))
        return xd.grad.double()

    exact = input_grad(torch.float64)
    (xb,) = leaves(x)
    torch.nn.functional.batch_norm(xb, None, None, training=True).backward(grad)
    torch.testing.assert_close(exact, xb.grad)
    assert (input_grad(torch.float32) - exact).abs().max() <= 5e-7 * exact.abs().max()


def test_blocks_and_threads(kernels):
    """Channels split over several work items (many samples, long rows) still sum to the reference."""
    torch.manual_seed(1)
    for layout in ("contiguous", "channels_last"):
        x = LAYOUTS[layout](activations((64, 19, 7, 10), dtype=torch.float32))
        state = [t.float() for t in mixture(channels=19)]
        y, stats = F.ucb_norm_batch(x, *state)
        y_ref, stats_ref = R.ucb_norm_batch(x, *state)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.mass, stats_ref.mass, rtol=1e-5, atol=1e-3)


def test_saves_only_the_input(kernels):
    """Backward keeps x itself (no copy, any layout) and (K, C) tensors: never a posterior."""
    for layout in ("contiguous", "channels_last", "tokens"):
        x = LAYOUTS[layout](torch.randn(8, 16, 6, 6)).requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, _ = F.ucb_norm_batch(x, *[t.float() for t in mixture(3, 16)], *affine(16, torch.float32))
        large = {t.untyped_storage().data_ptr() for t in saved if t.numel() > 16 * 3}
        assert large == {x.untyped_storage().data_ptr()}, layout
        y.sum().backward()
        assert x.grad.stride() == x.stride()


def test_reduce_sums_is_the_distributed_seam(kernels):
    """Sums reduced over P identical 'ranks' (here: doubled) give the statistics of the P-fold batch."""
    x = activations((4, 5, 6))
    state = mixture()
    grad = torch.randn_like(x)
    (y, stats), (gx,) = outputs_and_grads(
        lambda x: F.ucb_norm_batch(x, *state, reduce_sums=lambda s: 2 * s), leaves(x), grad
    )
    twice = leaves(torch.cat([x, x]))
    (y2, stats2), (gx2,) = outputs_and_grads(lambda x: F.ucb_norm_batch(x, *state), twice, torch.cat([grad, grad]))
    torch.testing.assert_close(y, y2[:4])
    torch.testing.assert_close(gx, gx2[:4])
    for got, want in zip(stats[:3], stats2[:3]):  # the statistics of the global batch
        torch.testing.assert_close(got, want)
    inputs = leaves(x[:2, :, :3], *state)
    assert torch.autograd.gradcheck(lambda *a: F.ucb_norm_batch(*a, reduce_sums=lambda s: 3 * s)[0], inputs)


def test_many_components_and_empty_batch(kernels):
    x = activations((5, 4, 3))
    state = mixture(17, 4)
    torch.testing.assert_close(F.ucb_norm_batch(x, *state)[0], R.ucb_norm_batch(x, *state)[0])
    torch.testing.assert_close(F.ucb_norm(x, *state), R.ucb_norm(x, *state))
    empty = x[:0]
    assert F.ucb_norm(empty, *mixture(3, 4)).shape == empty.shape


@pytest.mark.parametrize(
    "make",
    [
        lambda: cbnorm.UCBNorm(6, 3),
        lambda: cbnorm.UCBNorm(6, 3, update="weight", affine=True),
        lambda: cbnorm.SCBNorm(6, 3, affine=True),
        lambda: cbnorm.SCBNormBase(6, 3),
        lambda: cbnorm.MixtureNorm(6, 3),
    ],
    ids=["ucb", "ucb-weight", "scb", "scb-base", "mn"],
)
def test_layers_compile_without_graph_break_at_any_batch(make):
    norm, eager = make(), make()
    supervised = isinstance(norm, (cbnorm.SCBNorm, cbnorm.SCBNormBase))

    def inputs(batch):
        x = torch.randn(batch, 6, 5, requires_grad=True)
        return (x, torch.randint(0, 3, (batch,))) if supervised else (x,)

    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(-0.5, 0.5)
    norm(*inputs(16))  # UCB-Norm seeds its mixture
    eager.load_state_dict(norm.state_dict())
    fn = compiled(norm, fullgraph=True)
    for batch in (16, 16, 7):  # the last batch of an epoch is smaller
        args = inputs(batch)
        y, y_eager = fn(*args), eager(*args)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), (args[0], *norm.parameters()))
        grads_eager = torch.autograd.grad(y_eager.square().sum(), (args[0], *eager.parameters()))
        for got, want in zip(grads, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(norm.buffers(), eager.buffers()):
        torch.testing.assert_close(got, want)


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_ops", None)
    monkeypatch.setenv("CBNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CBNORM_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        assert _native.native_ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.native_ops() is None  # decided once
        x, state = activations(), mixture()
        torch.testing.assert_close(F.ucb_norm(x, *state), R.ucb_norm(x, *state))
    monkeypatch.setenv("CBNORM_KERNELS", "native")
    with pytest.raises(RuntimeError, match="CBNORM_KERNELS=native"):
        _native.native_ops()
    monkeypatch.setenv("CBNORM_KERNELS", "fast")
    message = r"CBNORM_KERNELS must be one of \('auto', 'native', 'eager', 'triton'\), got 'fast'"
    with pytest.raises(ValueError, match=message):
        _native.native_ops()
