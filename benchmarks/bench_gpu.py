"""Speed and memory of the cbnorm layers on one CUDA GPU against ``nn.BatchNorm2d`` (cuDNN), all measured in one run.

    python benchmarks/bench_gpu.py            # every table and the targets of issue 12 (meant to take under 3 min)
    python benchmarks/bench_gpu.py --quick    # the (256, 128, 8, 8) and (128, 256, 56, 56) rows only

Time: CUDA events around each call, the median of ``--repeats`` calls, BatchNorm and the layer
alternating call by call. "train" is forward + backward with a dense random upstream gradient, "eval"
a forward under ``torch.no_grad()``. Precision ``float32``, or ``bfloat16``: a bfloat16 input under
``torch.autocast`` (what a convolution hands its norm layer under autocast). SCB layers get cluster
ids in training and none in eval (Eq. 12, the unknown-cluster path). The first calls (Triton's
compilation, UCB-Norm seeding its mixture) are not timed.

Bandwidth: each pass of the Triton kernels timed alone on the row's input, as the bytes it must move
(``x`` read, plus the incoming gradient read and the output written where it has them) per second,
as a share of a device-to-device copy of ``x`` (``x.clone()``: one read and one write) timed in
the same run.

Memory: the peak of ``torch.cuda.max_memory_allocated`` during one training forward + backward, less
what was allocated just before (the input, the upstream gradient, the parameters), over the input's
size: the output, all that autograd saves, every temporary and the input's gradient.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

SHAPES = [(256, 128, 8, 8), (64, 64, 32, 32), (256, 256, 4, 4), (128, 256, 56, 56)]
HEADLINE = SHAPES[0]
TARGET_SHAPE = SHAPES[3]  # where the passes' bandwidth is judged
COMPONENTS = [1, 3, 5]
PRECISIONS = ["float32", "bfloat16"]
PASS_BYTES = {"moments": 1, "transform": 2, "reduce-only": 2, "mixed gradient": 3}  # x-sized tensors moved


@dataclasses.dataclass
class Row:
    layer: str
    shape: tuple
    k: int
    precision: str
    mode: str
    ms: float
    bn_ms: float
    memory: float | None = None  # peak extra training memory / input size
    bn_memory: float | None = None
    passes: dict = dataclasses.field(default_factory=dict)  # pass -> share of the copy bandwidth

    @property
    def ratio(self) -> float:
        return self.ms / self.bn_ms


class Target(NamedTuple):
    name: str
    value: float
    limit: float
    at_least: bool = False  # the value must reach the limit, not stay below it

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def layers() -> dict[str, Callable[[int, int], nn.Module]]:
    import cbnorm

    return {
        "UCBNorm": lambda c, k: cbnorm.UCBNorm(c, k),
        "UCBNorm(weight)": lambda c, k: cbnorm.UCBNorm(c, k, update="weight"),
        "MixtureNorm": lambda c, k: cbnorm.MixtureNorm(c, k),
        "SCBNorm": lambda c, k: cbnorm.SCBNorm(c, k),
        "SCBNormBase": lambda c, k: cbnorm.SCBNormBase(c, k),
    }


def precision_context(precision: str):
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, precision))


def median_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median CUDA-event time of each step, the steps interleaved call by call."""
    times = {name: [] for name in steps}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for name, step in steps.items():
            start.record()
            step()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_extra(step: Callable[[], None], x: torch.Tensor) -> float:
    """Peak memory one call of ``step`` allocates beyond what exists before it, over ``x``'s size."""
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / (x.numel() * x.element_size())


def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """Bytes per millisecond of ``x.clone()`` (read + write)."""
    ms = median_ms({"copy": lambda: x.clone()}, repeats)["copy"]
    return 2 * x.numel() * x.element_size() / ms


def pass_shares(x: torch.Tensor, k: int, repeats: int, copy: float) -> dict[str, float]:
    """Each Triton pass of UCB-Norm on ``x`` (N, C, H, W) alone: its bandwidth over the copy's."""
    from cbnorm import _triton, functional

    x3 = x.detach().flatten(2)
    channels = x3.shape[1]
    mean = torch.randn(k, channels, device=x.device)
    var = torch.rand(k, channels, device=x.device) + 0.5
    log_coef, quad_coef = functional._log_density(torch.full((k, 1), 1 / k, device=x.device), var, 1e-5)
    a, b = torch.randn(2, k, channels, device=x.device)
    omega = torch.randn_like(x3)
    sums_grad = torch.randn(3, k, channels, device=x.device)
    state = (mean, log_coef.contiguous(), quad_coef.contiguous())
    calls = {
        "moments": lambda: _triton.mixture_moments(x3, *state),
        "transform": lambda: _triton.mixture_transform(x3, *state, a, b),
        "reduce-only": lambda: _triton.mixture_transform_backward(x3, omega, *state, a, b, None, False, True, False),
        "mixed gradient": lambda: _triton.mixture_normalize_backward(x3, omega, *state, a, b, sums_grad),
    }
    for call in calls.values():
        call()
    ms = median_ms(calls, repeats)
    size = x3.numel() * x3.element_size()
    return {name: PASS_BYTES[name] * size / ms[name] / copy for name in calls}


def measure(name: str, make, shape, k: int, precision: str, repeats: int, with_passes: bool) -> list[Row]:
    dtype = getattr(torch, precision)
    x = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    grad = torch.randn_like(x)
    ids = torch.randint(0, k, (shape[0],), device="cuda")
    bn, module = nn.BatchNorm2d(shape[1]).cuda(), make(shape[1], k).cuda()
    supervised = name.startswith("SCB")
    shares = pass_shares(x, k, repeats, copy_bandwidth(x.detach(), repeats)) if with_passes else {}
    rows = []
    for mode in ("train", "eval"):
        bn.train(mode == "train"), module.train(mode == "train")

        def run(layer, mode=mode):
            with precision_context(precision):
                if mode == "eval":
                    with torch.no_grad():
                        layer(x)
                    return
                x.grad = None
                layer(*((x, ids) if supervised and layer is module else (x,))).backward(grad)

        steps = {"bn": lambda: run(bn), "layer": lambda: run(module)}
        for step in steps.values():  # compile, seed the mixture, warm the allocator
            step(), step()
        ms = median_ms(steps, repeats)
        row = Row(name, tuple(shape), k, precision, mode, ms["layer"], ms["bn"])
        if mode == "train":
            row.memory, row.bn_memory = peak_extra(steps["layer"], x), peak_extra(steps["bn"], x)
        if shares:
            row.passes = shares if mode == "train" else {"transform": shares["transform"]}
        rows.append(row)
    return rows


def shallow_cnn_step(batch: int, precision: str, repeats: int) -> dict:
    """One SGD step of Table IV's CNN, BatchNorm everywhere or UCB-Norm (K = 3) at conv3."""
    from cbnorm.experiments.models import ShallowCNN

    images, labels = torch.randn(batch, 3, 32, 32, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")
    steps = {}
    for name, norm in (("bn", "batchnorm"), ("ucb", "ucb")):
        torch.manual_seed(0)
        model = ShallowCNN(10, norm, norm_kwargs={"num_components": 3} if norm == "ucb" else None).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with precision_context(precision):
                loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

        step(), step()
        steps[name] = step
    ms = median_ms(steps, repeats)
    return {"precision": precision, "ms": ms["ucb"], "bn_ms": ms["bn"], "ratio": ms["ucb"] / ms["bn"]}


def targets(rows: list[Row], cnn: dict) -> list[Target]:
    """Issue 12's targets, for the rows measured."""
    checks = []
    for precision in PRECISIONS:
        for mode in ("train", "eval"):
            row = next((r for r in rows if (r.layer, r.shape, r.k, r.precision, r.mode) ==
                        ("UCBNorm", HEADLINE, 3, precision, mode)), None)
            if row is not None:
                checks.append(Target(f"UCBNorm({HEADLINE[1]}, 3) {mode} vs BatchNorm2d, {precision}", row.ratio, 2.0))
                if mode == "train" and precision == "float32":
                    checks.append(Target(f"UCBNorm({HEADLINE[1]}, 3) peak extra training memory / input size",
                                         row.memory, 2.0))
    shares = [share for r in rows if r.shape == TARGET_SHAPE and r.k == 3 for share in r.passes.values()]
    if shares:
        checks.append(Target(f"every pass at {TARGET_SHAPE}: share of the copy bandwidth (lowest)", min(shares), 0.5,
                             at_least=True))
    if cnn:
        checks.append(Target("shallow CNN step, UCB-Norm at conv3 vs all-BN", cnn["ratio"], 1.1))
    return checks


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_rows(rows: list[Row]) -> str:
    header = ("| layer | input | K | precision | mode | ms | BatchNorm2d ms | ratio | peak extra memory (x input) "
              "| BatchNorm2d | passes (share of the copy bandwidth) |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        passes = ", ".join(f"{name} {share:.0%}" for name, share in r.passes.items())
        lines.append(f"| {r.layer} | {r.shape} | {r.k} | {r.precision} | {r.mode} | {r.ms:.3f} | {r.bn_ms:.3f} | "
                     f"{r.ratio:.2f}x | {_cell(r.memory, '.2f')} | {_cell(r.bn_memory, '.2f')} | {passes} |")
    return "\n".join(lines)


def format_targets(checks: list[Target]) -> str:
    lines = ["| target | measured | limit | |", "| --- | --- | --- | --- |"]
    for t in checks:
        lines.append(f"| {t.name} | {t.value:.2f} | {'>=' if t.at_least else '<='} {t.limit:.2f} | "
                     f"{'pass' if t.met else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only the {HEADLINE} and {TARGET_SHAPE} shapes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cnn-batch", type=int, default=256, help="batch of the shallow-CNN step; 0 skips it")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "bench_gpu.py needs a CUDA GPU; none is available (torch.cuda.is_available() is False)\n")
    import triton

    from cbnorm._native import kernels_mode

    began = time.perf_counter()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}), triton {triton.__version__}, CBNORM_KERNELS={kernels_mode()}")
    shapes = [HEADLINE, TARGET_SHAPE] if args.quick else SHAPES
    rows = []
    for precision in PRECISIONS:
        for shape in shapes:
            for k in COMPONENTS:
                for name, make in layers().items():
                    if name != "UCBNorm" and (shape, k) != (HEADLINE, 3):
                        continue  # the other layers at the headline only
                    with_passes = name == "UCBNorm"
                    rows.extend(measure(name, make, shape, k, precision, args.repeats, with_passes))
    cnn = [shallow_cnn_step(args.cnn_batch, p, args.repeats) for p in PRECISIONS] if args.cnn_batch else []
    print()
    print(format_rows(rows))
    for step in cnn:
        print(f"\nshallow CNN step ({args.cnn_batch}, 3, 32, 32), UCB-Norm K=3 at conv3, {step['precision']}: "
              f"{step['ms']:.2f} ms, all-BN {step['bn_ms']:.2f} ms, {step['ratio']:.2f}x")
    print()
    print(format_targets(targets(rows, cnn[0] if cnn else {})))
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
