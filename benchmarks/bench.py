"""Speed and memory of the cbnorm layers against ``nn.BatchNorm2d``, all measured in one run.

    python benchmarks/bench.py            # the full table and the targets of issue 6 (about 3 min on 2 cores)
    python benchmarks/bench.py --quick    # the (256, 128, 8, 8) rows and the targets only

Time: the median of ``--repeats`` calls, alternating BatchNorm and the layer call by call so that
both see the same machine load; "train" is forward + backward with a dense random upstream
gradient, "eval" a forward under ``torch.no_grad()``. SCB layers get cluster ids in training; in
eval they get none (Eq. 12, the unknown-cluster path).

Memory: the peak extra memory of one training forward + backward, as a multiple of the input's
size. ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the CPU
allocator with a timestamp (temporaries inside operators and native kernels included); the peak
of their running sum from just before the forward to just after the backward counts the output,
all that autograd saves, every temporary and the input's gradient, but not the input and the
upstream gradient, which exist before.

To add a layer, add one line to ``LAYERS``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import time
from typing import Callable, Optional
from unittest import mock

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import cbnorm
from cbnorm import _reference, functional
from cbnorm._native import kernels_mode
from cbnorm.experiments.models import ShallowCNN


@dataclasses.dataclass
class Layer:
    make: Callable[[int, int], nn.Module]  # (num_features, K) -> module
    kernels: Optional[str] = None  # CBNORM_KERNELS for this row
    reference: bool = False  # compute with cbnorm._reference, the straightforward implementation
    headline_only: bool = False  # only at the first shape with K = 3 (slow rows)


LAYERS = {
    "UCBNorm": Layer(lambda c, k: cbnorm.UCBNorm(c, k)),
    "UCBNorm(weight)": Layer(lambda c, k: cbnorm.UCBNorm(c, k, update="weight")),
    "SCBNorm": Layer(lambda c, k: cbnorm.SCBNorm(c, k)),
    "SCBNormBase": Layer(lambda c, k: cbnorm.SCBNormBase(c, k)),
    "MixtureNorm": Layer(lambda c, k: cbnorm.MixtureNorm(c, k)),
    "UCBNorm, pure-PyTorch kernels": Layer(lambda c, k: cbnorm.UCBNorm(c, k), kernels="eager", headline_only=True),
    "UCBNorm, reference": Layer(lambda c, k: cbnorm.UCBNorm(c, k), reference=True, headline_only=True),
}
SHAPES = [(256, 128, 8, 8), (64, 64, 32, 32), (256, 256, 4, 4)]
COMPONENTS = [1, 3, 5]
HEADLINE = (SHAPES[0], 3)


@contextlib.contextmanager
def setting(layer: Layer):
    """The kernels and implementation the row asks for, around forward and backward alike."""
    with contextlib.ExitStack() as stack:
        if layer.kernels:
            stack.enter_context(mock.patch.dict(os.environ, {"CBNORM_KERNELS": layer.kernels}))
        if layer.reference:
            for name in ("ucb_norm", "ucb_norm_batch", "scb_norm", "sample_norm"):
                stack.enter_context(mock.patch.object(functional, name, getattr(_reference, name)))
        yield


def train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor) -> Callable[[], None]:
    def step():
        with cbnorm.cluster_context(ids):
            module(x).backward(grad)

    return step


def eval_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            module(x)

    return step


def median_ms(steps: dict[str, Callable[[], None]], repeats: int, x: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Median wall time of each step, the steps interleaved call by call (``x.grad`` cleared before each)."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if x is not None:
                x.grad = None
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def peak_extra_bytes(step: Callable[[], None], x: torch.Tensor) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees during ``step``."""
    x.grad = None  # freed before, so that the step allocates it anew
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure(name: str, layer: Layer, shape, k: int, repeats: int) -> list[dict]:
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    ids = torch.randint(0, k, (shape[0],))
    bn, module = nn.BatchNorm2d(channels), layer.make(channels, k)
    rows = []
    with setting(layer):
        for mode in ("train", "eval"):
            bn.train(mode == "train"), module.train(mode == "train")
            if mode == "train":
                steps = {"bn": train_step(bn, x, grad, ids), "layer": train_step(module, x, grad, ids)}
            else:
                steps = {"bn": eval_step(bn, x), "layer": eval_step(module, x)}
            for step in steps.values():  # warm up (UCB-Norm seeds its mixture on the first training batch)
                step(), step()
            ms = median_ms(steps, repeats, x)
            row = dict(
                layer=name, shape=shape, k=k, mode=mode, ms=ms["layer"], bn_ms=ms["bn"], ratio=ms["layer"] / ms["bn"]
            )
            if mode == "train":
                size = x.numel() * x.element_size()
                row["memory"] = peak_extra_bytes(steps["layer"], x) / size
                row["bn_memory"] = peak_extra_bytes(steps["bn"], x) / size
            rows.append(row)
    return rows


def shallow_cnn_steps(batch: int, repeats: int) -> dict:
    """One SGD step of Table IV's CNN, with BatchNorm everywhere or UCB-Norm (K = 3) at conv3."""
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {}
    for name, norm in (("bn", "batchnorm"), ("ucb", "ucb")):
        torch.manual_seed(0)
        kwargs = {"num_components": 3} if norm == "ucb" else None
        model = ShallowCNN(10, norm, norm_kwargs=kwargs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()

        step(), step()
        steps[name] = step
    ms = median_ms(steps, repeats)
    return dict(ms=ms["ucb"], bn_ms=ms["bn"], ratio=ms["ucb"] / ms["bn"])


def targets(rows: list[dict], cnn: dict) -> list[tuple[str, float, float]]:
    """(target, measured, limit) for every target of issue 6."""

    def row(layer, mode, k=3):
        return next(
            r for r in rows if r["layer"] == layer and r["mode"] == mode and r["k"] == k and r["shape"] == HEADLINE[0]
        )

    checks = [
        ("UCBNorm(128, 3) train vs BatchNorm2d", row("UCBNorm", "train")["ratio"], 3.0),
        ("UCBNorm(128, 3) eval vs BatchNorm2d", row("UCBNorm", "eval")["ratio"], 10.0),
        ("UCBNorm(128, 3) peak extra training memory / input size", row("UCBNorm", "train")["memory"], 4.0),
        ("UCBNorm train: K=5 time / K=3 time", row("UCBNorm", "train", 5)["ms"] / row("UCBNorm", "train")["ms"], 1.7),
        ("UCBNorm eval: K=5 time / K=3 time", row("UCBNorm", "eval", 5)["ms"] / row("UCBNorm", "eval")["ms"], 1.7),
        ("SCBNorm(128, 3) train vs BatchNorm2d", row("SCBNorm", "train")["ratio"], 1.5),
        ("SCBNormBase(128, 3) train vs BatchNorm2d", row("SCBNormBase", "train")["ratio"], 1.5),
    ]
    if cnn:
        checks.append(("shallow CNN step, UCB-Norm at conv3 vs all-BN", cnn["ratio"], 1.15))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the (256, 128, 8, 8) shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cnn-batch", type=int, default=256, help="batch of the shallow-CNN step; 0 skips it")
    parser.add_argument("--cnn-repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), CBNORM_KERNELS={kernels_mode()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = []
    for shape in shapes:
        for k in COMPONENTS:
            for name, layer in LAYERS.items():
                if layer.headline_only and (shape, k) != HEADLINE:
                    continue
                rows.extend(measure(name, layer, shape, k, args.repeats))
    cnn = shallow_cnn_steps(args.cnn_batch, args.cnn_repeats) if args.cnn_batch else {}

    print("\n| layer | input | K | mode | ms | BatchNorm2d ms | ratio | peak extra memory (x input) | BatchNorm2d |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        memory = (f"{r['memory']:.2f} | {r['bn_memory']:.2f}") if "memory" in r else " | "
        print(f"| {r['layer']} | {tuple(r['shape'])} | {r['k']} | {r['mode']} | {r['ms']:.2f} | {r['bn_ms']:.2f} | "
              f"{r['ratio']:.2f}x | {memory} |")
    if cnn:
        print(f"| shallow CNN step (UCB-Norm K=3 at conv3) | ({args.cnn_batch}, 3, 32, 32) | 3 | train | "
              f"{cnn['ms']:.1f} | {cnn['bn_ms']:.1f} (all-BN) | {cnn['ratio']:.2f}x | | |")

    print("\n| target | measured | limit | |\n| --- | --- | --- | --- |")
    for target, value, limit in targets(rows, cnn):
        print(f"| {target} | {value:.2f} | {limit:.2f} | {'pass' if value <= limit else 'FAIL'} |")
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
