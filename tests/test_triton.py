"""The Triton kernels (cbnorm._triton) against the pure-PyTorch twins and the float64 reference.

Without CUDA they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, which conftest.py
sets before Triton is first imported). The interpreter runs each program in Python, so the inputs are
tiny, with tiles of 64 (``small_tiles``) so that they still span several tiles and splits, with
partial tiles. With CUDA the same tests run the compiled kernels on the
GPU, and the GPU-only tests (bfloat16, torch.compile, speed and memory) run too.
"""

import copy
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

import cbnorm
from cbnorm import _kernels, _reference
from cbnorm import functional as F

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytest.importorskip("triton")
# cbnorm._triton imports Triton, so it is imported once Triton is known to be there.
_triton = importlib.import_module("cbnorm._triton")
_core = importlib.import_module("cbnorm._triton._core")

gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]


if not (CUDA or _triton.INTERPRETED):
    pytest.fail("no CUDA, and Triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)", pytrace=False)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 components x entries and 6 programs per pass: tiny inputs then span several tiles per
    program and several programs per channel, with partial tiles and a program past the last tile."""
    monkeypatch.setattr(_core, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_core, "INTERPRETER_PROGRAMS", 6)
    monkeypatch.setattr(_core, "PROGRAMS_PER_MULTIPROCESSOR", 1)


@pytest.fixture
def kernels(monkeypatch):
    """``kernels("triton")``: the implementation the following calls use."""
    return lambda mode: monkeypatch.setenv("CBNORM_KERNELS", mode)


# (N, C, H, W) -> the same values in a memory layout; both keep x itself (no copy) on the way to the kernels.
LAYOUTS = {
    "contiguous": lambda x: x.contiguous(),
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
}
SHAPE = (3, 5, 4, 5)  # L = 20, N L = 60 entries per channel, C = 5: no multiple of any tile
LAYERS = {
    "ucb": lambda c, k: cbnorm.UCBNorm(c, k, affine=True),
    "ucb-weight": lambda c, k: cbnorm.UCBNorm(c, k, update="weight", affine=True),
    "mixture-norm": lambda c, k: cbnorm.MixtureNorm(c, k),
    "scb": lambda c, k: cbnorm.SCBNorm(c, k, affine=True),
    "scb-base": lambda c, k: cbnorm.SCBNormBase(c, k, affine=True),
}
COMPONENTS = [1, 2, 3, 5, 16]
DTYPES = [torch.float32, torch.float16]
# Every layer with every K; layouts and dtypes alternate so that each layer and each K meets both of each.
CASES = [
    (layer, k, list(LAYOUTS)[i % 2], DTYPES[i // 2 % 2])
    for i, (layer, k) in enumerate(itertools.product(LAYERS, COMPONENTS))
]
# Errors allowed beyond twice the twin's, relative to the size of what is compared
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def activations(shape=SHAPE, dtype=torch.float32, layout="contiguous"):
    """Two modes per channel, so that every component holds mass."""
    modes = torch.where(torch.rand(shape) < 0.4, -2.0, 2.0)
    x = (modes + 0.6 * torch.randn(shape)).to(dtype)
    return LAYOUTS[layout](x).to(DEVICE)


def seeded_layer(name, k, x):
    """The layer with random parameters and, for UCB-Norm and MN, the mixture its first batch seeds."""
    module = LAYERS[name](x.shape[1], k).to(DEVICE)
    with torch.no_grad():
        for name_, p in module.named_parameters():
            p.uniform_(-0.5, 0.5) if "weight" not in name_ else p.uniform_(0.5, 1.5)
    if isinstance(module, (cbnorm.UCBNorm, cbnorm.MixtureNorm)):
        with mock.patch.dict(os.environ, {"CBNORM_KERNELS": "eager"}):
            module(x.float())
    return module


def step(module, x, grad, ids, kernels):
    """Training forward + backward, then an eval forward without cluster ids:
    ``([y], grads of x and every parameter, buffers, [y_eval])``."""
    inputs = [x.detach().clone().requires_grad_(), *module.parameters()]
    with mock.patch.dict(os.environ, {"CBNORM_KERNELS": kernels}):
        with cbnorm.cluster_context(ids):
            y = module.train()(inputs[0])
        grads = torch.autograd.grad(y, inputs, grad)
        with torch.no_grad():
            y_eval = module.eval()(x)  # SCB-Norm: unknown clusters
    return [y], list(grads), [b.clone() for b in module.buffers()], [y_eval]


def reference_step(module, x, grad, ids):
    """:func:`step` in float64 on the straightforward implementation (cbnorm._reference)."""
    names = ("ucb_norm", "ucb_norm_batch", "scb_norm", "sample_norm")
    patches = [mock.patch.object(F, name, getattr(_reference, name)) for name in names]
    with patches[0], patches[1], patches[2], patches[3]:
        return step(copy.deepcopy(module).double(), x.double(), grad.double(), ids, "eager")


def assert_as_accurate(got, twin, reference, floor, what):
    """``got`` within twice the twin's distance from the float64 reference, plus ``floor`` times its size:
    as accurate as the pure-PyTorch kernels, however ill-conditioned (K = 16 on 60 entries per channel is)."""
    assert len(got) == len(twin) == len(reference), what
    for i, tensors in enumerate(zip(got, twin, reference)):
        g, t, r = (u.detach().double().cpu() for u in tensors)
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        error, twin_error = ((u - r).abs().max().item() if r.numel() else 0.0 for u in (g, t))
        assert error <= 2 * twin_error + floor * scale, (
            f"{what}[{i}]: {error:.3g} from float64, the twin {twin_error:.3g}"
        )


def assert_step_as_accurate(module, x, grad, ids, kernels):
    """:func:`step` on ``kernels``, as accurate as on the pure-PyTorch twins; returns its results."""
    got = step(copy.deepcopy(module), x, grad, ids, kernels)
    twin = step(copy.deepcopy(module), x, grad, ids, "eager")
    reference = reference_step(module, x, grad, ids)
    for what, *parts in zip(["output", "gradients", "buffers", "eval output"], got, twin, reference):
        assert_as_accurate(*parts, FLOOR[x.dtype], what)
    return got


@pytest.mark.parametrize("layer,k,layout,dtype", CASES, ids=[f"{c[0]}-K{c[1]}-{c[2]}-{str(c[3])[6:]}" for c in CASES])
def test_layer_matches_twins_and_reference(small_tiles, layer, k, layout, dtype):
    """Output, input gradient, every parameter gradient, the running state and the eval output."""
    x = activations(dtype=dtype, layout=layout)
    grad = torch.randn(SHAPE).to(dtype).to(DEVICE)
    ids = torch.randint(0, k, (SHAPE[0],), device=DEVICE) if layer.startswith("scb") else None
    module = seeded_layer(layer, k, x)
    (y,), grads, _, _ = assert_step_as_accurate(module, x, grad, ids, "triton")
    assert y.dtype == x.dtype and y.stride() == x.stride() and grads[0].stride() == x.stride()


def test_tokens_view_is_read_in_place(small_tiles, kernels, monkeypatch):
    """``channel_dim=-1`` on ``(N, L, C)`` tokens: every pass reads the caller's storage, in place."""
    kernels("triton")
    tokens = activations((4, 7, 5)).requires_grad_()
    norm = cbnorm.UCBNorm(5, 3, channel_dim=-1, affine=True).to(DEVICE)
    norm(tokens.detach())  # seeds the mixture
    read = []
    for name in ("mixture_moments", "mixture_transform", "mixture_transform_backward", "mixture_normalize_backward"):
        launcher = getattr(_triton, name)
        def recording(x, *args, launcher=launcher):
            read.append(x.data_ptr())
            return launcher(x, *args)

        monkeypatch.setattr(_triton, name, recording)
    y = norm(tokens)
    y.backward(torch.randn_like(y))
    assert len(read) == 4 and set(read) == {tokens.data_ptr()}
    assert y.stride() == tokens.stride() and tokens.grad.stride() == tokens.stride()


def coefficients(k, channels, dtype=torch.float32):
    mean = torch.randn(k, channels)
    var = torch.rand(k, channels) + 0.3
    log_coef, quad_coef = -0.5 * var.log() + 0.2 * torch.randn(k, channels), -0.5 / var
    return [t.to(dtype).to(DEVICE) for t in (mean, log_coef, quad_coef)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [1, 3])
def test_every_pass_matches_its_twin(small_tiles, layout, k):
    """Each launcher against its pure-PyTorch twin, with every combination of outputs the autograd asks for."""
    x = activations((3, 5, 2, 10), layout=layout).flatten(2)
    state = coefficients(k, 5)
    a, b, c = torch.randn(3, k, 5, device=DEVICE)
    omega = torch.randn_like(x)
    torch.testing.assert_close(_triton.mixture_moments(x, *state), _kernels._eager_moments(x, *state))
    torch.testing.assert_close(_triton.mixture_transform(x, *state, a, b), _kernels._eager_transform(x, *state, a, b))
    calls = [  # what the autograd asks: transform, moments, and the reduce-only pass of the fused backward
        *((omega, None, *flags) for flags in [(True, True, True), (True, False, False), (False, True, True)]),
        *((None, c, *flags) for flags in [(True, True, True), (False, False, True)]),
        (omega, None, False, True, False),
    ]
    for weight, quadratic, *flags in calls:
        got = _triton.mixture_transform_backward(x, weight, *state, a, b, quadratic, *flags)
        want = _kernels._eager_transform_backward(x, weight, *state, a, b, quadratic, *flags)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    sums_grad = torch.randn(3, k, 5, device=DEVICE)
    torch.testing.assert_close(
        _triton.mixture_normalize_backward(x, omega, *state, a, b, sums_grad),
        _kernels._eager_normalize_backward(x, omega, *state, a, b, sums_grad),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_scale_shift_and_backward(small_tiles, layout):
    """Rows longer than a tile (channels-first), channel blocks (channels-last) and ``(N, C)`` input."""
    x = activations((3, 6, 7, 10), layout="channels_last" if layout == "channels_last" else "contiguous").flatten(2)
    if layout == "rows":
        x = x[:, :, :1].contiguous()
    scale, shift = torch.randn(2, 3, 6, device=DEVICE)
    grad = torch.randn_like(x)
    y = _triton.scale_shift(x, scale, shift)
    torch.testing.assert_close(y, x * scale[..., None] + shift[..., None])
    assert y.stride() == x.stride()
    grad_x, grad_scale, grad_shift = _triton.scale_shift_backward(x, grad, scale)
    torch.testing.assert_close(grad_x, grad * scale[..., None])
    torch.testing.assert_close(grad_scale, (grad * x).sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_shift, grad.sum(2), rtol=1e-5, atol=1e-5)


def test_bitwise_deterministic(small_tiles, kernels):
    """Two runs of a training step give the same bits: the split sums are added in a fixed order."""
    kernels("triton")
    x = activations((6, 5, 3, 7), layout="channels_last")
    norm = seeded_layer("ucb", 3, x)

    def run():
        copy_ = copy.deepcopy(norm)
        xs = x.detach().clone().requires_grad_()
        y = copy_(xs)
        y.backward(torch.ones_like(y).cos() * xs.detach())
        return [y, xs.grad, *(p.grad for p in copy_.parameters()), *copy_.buffers()]

    assert _core.plan(x.flatten(2), 3).splits > 1
    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_no_atomics():
    """The default path has no atomics at all (float atomics would make the sums' order, and bits, vary)."""
    for path in Path(_triton.__file__).parent.glob("*.py"):
        assert "tl.atomic" not in path.read_text(), path.name


def test_empty_batch(kernels):
    kernels("triton")
    x = torch.empty(0, 5, 4, device=DEVICE)
    state = coefficients(3, 5)
    assert torch.equal(_triton.mixture_moments(x, *state), torch.zeros(3, 3, 5, device=DEVICE))
    assert F.ucb_norm(x, torch.ones(3, device=DEVICE) / 3, state[0], torch.ones(3, 5, device=DEVICE)).shape == x.shape


def test_launchers_reject_what_the_kernels_cannot_index():
    state = coefficients(3, 5)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, C, L\), contiguous as \(N, C, L\) or \(N, L, C\)"):
        _triton.mixture_moments(torch.randn(4, 5, 6, device=DEVICE)[:, :, ::2], *state)
    with pytest.raises(ValueError, match="take float32, float16 or bfloat16 x, got torch.float64"):
        _triton.mixture_moments(torch.randn(4, 5, 6, dtype=torch.float64, device=DEVICE), *state)
    with pytest.raises(ValueError, match=r"expected scale of shape \(4, 5\), got \(5, 4\)"):
        _triton.scale_shift(torch.randn(4, 5, 6, device=DEVICE), *torch.randn(2, 5, 4, device=DEVICE))


def test_float64_keeps_the_other_kernels(kernels):
    """The Triton kernels take float32, float16 and bfloat16; float64 runs the native or pure-PyTorch kernels."""
    kernels("triton")
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    state = [t.double().cpu() for t in coefficients(3, 5)]
    with mock.patch.object(_triton, "mixture_moments", side_effect=AssertionError("Triton got float64")):
        torch.testing.assert_close(_kernels.mixture_moments(x, *state), _kernels._eager_moments(x, *state))



# Every layer whose eval pass runs the mixture kernels (SCB-Norm: the unknown-cluster rules of one posterior per entry)
HUGE_INPUT_LAYERS = {
    **{name: LAYERS[name] for name in ("ucb", "ucb-weight", "mixture-norm")},
    "ucb-weight-tiny-prior": LAYERS["ucb-weight"],
    **{f"scb-{rule}": lambda c, k, rule=rule: cbnorm.SCBNorm(c, k, affine=True, unknown=rule)
       for rule in ("paper", "posterior")},
}


def eval_step(module, x, grad, kernels):
    """Eval forward + backward: ``[y, grad of x, grads of the parameters]`` (``None`` for one left unused)."""
    inputs = [x.detach().clone().requires_grad_(), *module.parameters()]
    with mock.patch.dict(os.environ, {"CBNORM_KERNELS": kernels}):
        y = module.eval()(inputs[0])
        return [y, *torch.autograd.grad(y, inputs, grad, allow_unused=True)]


@pytest.mark.parametrize("layer", HUGE_INPUT_LAYERS)
def test_huge_inputs_give_the_twins_finite_posteriors(small_tiles, layer):
    """float32 entries of 1e20 to 1e30 among ordinary ones: past ~1e19 the squared offsets of the logits overflow,
    so the logits take ``x`` clamped to the channel's bounds, as the twins do; the output and every gradient are
    finite and the twin's. The last channel's components are wide, where the bounds once overflowed to infinite
    (|quad_coef| < 1/8). ``tiny-prior``: a prior of e^-80, far below float32 epsilon, whose component's scale
    (e^40) keeps its term finite up to ~1e20 only (at 1e30 it is inf times a posterior of 0 in every kernel)."""
    x = activations((4, 3, 5))
    x[:, 2] *= 10
    module = HUGE_INPUT_LAYERS[layer](3, 3).to(DEVICE)
    with torch.no_grad(), mock.patch.dict(os.environ, {"CBNORM_KERNELS": "eager"}):
        for name, p in module.named_parameters():
            p.uniform_(-0.5, 0.5) if "weight" not in name else p.uniform_(0.5, 1.5)
        if layer.startswith("scb"):
            module.log_var[:, 2] += 4.0
        else:
            module(x)  # seeds the mixture
        if layer.endswith("tiny-prior"):
            module.prior_logits.copy_(torch.tensor([0.0, 0.0, -80.0]))
    largest = 1e20 if layer.endswith("tiny-prior") else 1e30
    x[0, :, 0], x[1, :, 1], x[2, 1:, 2], x[3, 2, 3] = largest, -largest, 3e19, -1e20
    grad = torch.randn_like(x)
    got, twin = (eval_step(copy.deepcopy(module), x, grad, kernels) for kernels in ("triton", "eager"))
    assert all(torch.isfinite(g).all() for g in got if g is not None)
    for i, (g, t) in enumerate(zip(got, twin)):
        assert (g is None) == (t is None), i
        if g is not None:
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-5, msg=lambda message, i=i: f"[{i}] {message}")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CBNORM_KERNELS")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**environment, **env},
                          capture_output=True, text=True, timeout=300, check=False)


def test_cpu_path_never_needs_triton_and_forcing_it_needs_the_interpreter():
    """Without Triton (an import of it fails), the layers run on CPU and cbnorm's Triton kernels are never
    imported; ``CBNORM_KERNELS=triton`` on a CPU tensor outside the interpreter then says what to set."""
    result = run_python("""
        import os, sys
        sys.modules["triton"] = None  # import triton raises ImportError: as if it were not installed
        import torch, cbnorm
        for norm in (cbnorm.UCBNorm(4, 3), cbnorm.MixtureNorm(4, 3), cbnorm.SCBNorm(4, 3)):
            norm(torch.randn(8, 4, 3), *([torch.randint(0, 3, (8,))] if isinstance(norm, cbnorm.SCBNorm) else []))
        assert "cbnorm._triton" not in sys.modules, "cbnorm._triton imported on the CPU path"
        del sys.modules["triton"]
        os.environ["CBNORM_KERNELS"] = "triton"
        try:
            cbnorm.UCBNorm(4, 3)(torch.randn(8, 4, 3))
        except RuntimeError as error:
            print(error)
        """, CBNORM_KERNELS="auto")
    assert result.returncode == 0, result.stderr
    assert ("CBNORM_KERNELS=triton got a CPU tensor; the Triton kernels run CPU tensors only in Triton's "
            "interpreter: set TRITON_INTERPRET=1 before triton is imported") in result.stdout


def test_every_kernel_compiles_for_a_gpu():
    """Triton's GPU compiler, which the interpreter skips, accepts every kernel (PTX for sm_90, no GPU needed):
    each kernel and option once, with a bfloat16 input."""
    result = run_python("""
        import importlib, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        modules = ("moments", "transform", "backward", "scale_shift", "_core")
        kernels = {name: importlib.import_module(f"cbnorm._triton.{name}") for name in modules}
        bf16_pointers = ("x_ptr", "omega_ptr", "out_ptr", "grad_ptr", "grad_x_ptr")
        def compile(fn, **constants):
            signature = {
                name: "constexpr" if name in constants else "*bf16" if name in bf16_pointers
                else "*fp32" if name.endswith("_ptr") else "i32"
                for name in fn.arg_names
            }
            ptx = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert ".entry" in ptx
        for last in (False, True):
            mixture = dict(
                K=3, BLOCK_K=4, ROWS=8 if last else 1, COLS=64 if last else 512, CHANNELS_LAST=last, WIDE=last
            )
            compile(kernels["moments"]._moments_kernel, **mixture)
            compile(kernels["transform"]._transform_kernel, **mixture)
            for mixed in (False, True):
                compile(kernels["backward"]._vjp_kernel, **mixture, HAS_OMEGA=True, HAS_C=True, MIXED=mixed, GRAD=True,
                        TAU_MOMENTS=not mixed, U_MOMENTS=not mixed)
            sample = dict(ROWS=32 if last else 4, COLS=64 if last else 512, CHANNELS_LAST=last, WIDE=last)
            compile(kernels["scale_shift"]._scale_shift_kernel, **sample)
            compile(kernels["scale_shift"]._scale_shift_backward_kernel, **sample)
        compile(kernels["_core"]._sum_splits_kernel, BLOCK=1024)
        print("compiled")
        """, TRITON_DEFAULT_FP_FUSION="1")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {spec.name: module}):  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def test_benchmark_tables():
    """The GPU benchmark's tables and targets from made-up measurements (its numbers need a GPU)."""
    bench = load_benchmark()
    shape = bench.TARGET_SHAPE
    rows = [
        bench.Row("UCBNorm", shape, 3, "float32", "train", ms=2.0, bn_ms=1.0, memory=1.5, bn_memory=1.0,
                  passes={"moments": 0.6, "transform": 0.55}),
        bench.Row("UCBNorm", shape, 3, "float32", "eval", ms=0.9, bn_ms=0.5),
        bench.Row("UCBNorm", bench.SHAPES[0], 3, "float32", "train", ms=0.5, bn_ms=0.125, memory=3.0, bn_memory=1.0),
        bench.Row("UCBNorm", bench.SHAPES[0], 3, "float32", "eval", ms=0.1, bn_ms=0.1),
    ]
    table = bench.format_rows(rows)
    assert table.splitlines()[2] == (
        f"| UCBNorm | {shape} | 3 | float32 | train | 2.000 | 1.000 | 2.00x | 1.50 | 1.00 "
        "| moments 60%, transform 55% |"
    )
    checks = {target.name: (target.value, target.limit) for target in bench.targets(rows, {"ratio": 1.2})}
    assert checks["UCBNorm(128, 3) train vs BatchNorm2d, float32"] == (4.0, 2.0)
    assert checks["UCBNorm(128, 3) peak extra training memory / input size"] == (3.0, 2.0)
    assert checks["every pass at (128, 256, 56, 56): share of the copy bandwidth (lowest)"] == (0.55, 0.5)
    assert checks["shallow CNN step, UCB-Norm at conv3 vs all-BN"] == (1.2, 1.1)
    report = bench.format_targets(bench.targets(rows, {"ratio": 1.2}))
    assert re.search(r"\| UCBNorm\(128, 3\) train vs BatchNorm2d, float32 \| 4.00 \| <= 2.00 \| FAIL \|", report)


def test_benchmark_times_each_pass_of_the_kernels(monkeypatch):
    """The launcher calls behind the bandwidth column, run once each (their timing needs a GPU)."""
    bench = load_benchmark()
    calls = []

    def call_once(steps, repeats):
        for name, step in steps.items():
            calls.append(name)
            step()
        return dict.fromkeys(steps, 2.0)

    monkeypatch.setattr(bench, "median_ms", call_once)
    x = activations((2, 3, 4, 5), layout="channels_last")
    shares = bench.pass_shares(x, 3, repeats=1, copy=x.numel() * x.element_size())
    assert calls == list(bench.PASS_BYTES) and shares == {name: n / 2.0 for name, n in bench.PASS_BYTES.items()}


def test_benchmark_without_cuda_says_so():
    if CUDA:
        pytest.skip("CUDA is available")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120, check=False)
    assert result.returncode == 2 and "bench_gpu.py needs a CUDA GPU; none is available" in result.stderr


# -- GPU only ----------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("layer", LAYERS)
def test_bfloat16_matches_twins_and_reference(layer):
    x = activations(dtype=torch.bfloat16, layout="channels_last")
    grad = torch.randn(SHAPE).to(torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, 3, (SHAPE[0],), device=DEVICE) if layer.startswith("scb") else None
    module = seeded_layer(layer, 3, x)
    assert_step_as_accurate(module, x, grad, ids, "auto")


@gpu_only
@pytest.mark.parametrize("layer", ["ucb", "ucb-weight", "scb"])
def test_compiled_layer_runs_the_triton_kernels(layer, monkeypatch):
    """torch.compile keeps the custom operators, whose CUDA implementation is the Triton kernels."""
    x = activations(layout="channels_last")
    ids = torch.randint(0, 3, (SHAPE[0],), device=DEVICE) if layer.startswith("scb") else None
    module = seeded_layer(layer, 3, x)
    calls = []
    for name in ("mixture_moments", "mixture_transform", "scale_shift"):
        launcher = getattr(_triton, name)
        monkeypatch.setattr(_triton, name, lambda *args, launcher=launcher: calls.append(1) or launcher(*args))
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    grad = torch.randn_like(x)
    with cbnorm.cluster_context(ids):
        y = compiled(x.requires_grad_())
        (gx,) = torch.autograd.grad(y, x, grad)
        y_eager = copy.deepcopy(module)(x)
        (gx_eager,) = torch.autograd.grad(y_eager, x, grad)
    assert calls
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-5)


def gpu_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@gpu_only
def test_speed_and_memory_targets():
    """Issue 12's targets at (256, 128, 8, 8), K = 3: train and eval within 2x BatchNorm2d, peak extra
    training memory within 2x the input (benchmarks/bench_gpu.py measures them all)."""
    x = torch.randn(256, 128, 8, 8, device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)
    bn, norm = torch.nn.BatchNorm2d(128).to(DEVICE), cbnorm.UCBNorm(128, 3).to(DEVICE)
    norm(x.detach())
    for mode in ("train", "eval"):
        bn.train(mode == "train"), norm.train(mode == "train")
        if mode == "train":
            ratio = gpu_ms(lambda: norm(x).backward(grad)) / gpu_ms(lambda: bn(x).backward(grad))
        else:
            with torch.no_grad():
                ratio = gpu_ms(lambda: norm(x)) / gpu_ms(lambda: bn(x))
        assert ratio <= 2.0, f"{mode}: {ratio:.2f}x BatchNorm2d"
    norm.train()
    x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    norm(x).backward(grad)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / (x.numel() * x.element_size())
    assert extra <= 2.0, f"peak extra training memory {extra:.2f}x the input"
