"""Seconds per epoch of the paper's models on this device, alone and with P copies training at once.

    python benchmarks/gpu_epochs.py --parallel 1 4 8 > benchmarks/gpu-epochs.md     # on a GPU: a few minutes

Each model trains with the layer under test (``--norm``, default BatchNorm) at its protocol's batch size,
on random images of its data set's shape, with the harness's CUDA settings (bfloat16 autocast,
channels-last, cuDNN benchmark; ``--no-fast`` turns them off). An epoch is the protocol's steps per
epoch times the time of a training step (forward, backward, AdamW), timed over ``--steps`` steps after
warm-up. With P > 1, P processes start their timed steps together (a barrier) and the table gives
each one's epoch and the epochs the device completes per hour all together. Nothing here is an
estimate of another device: run it where you want the numbers.
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
from torch import nn

# (name, model, classes, images per step, steps per epoch): the paper's protocols
MODELS = [
    ("shallow CNN, Table V (CIFAR-10, batch 256)", "shallow_cnn", 10, 256, math.ceil(50000 / 256)),
    ("DenseNet-BC-40, IV-C (CIFAR-100, batch 64)", "densenet40", 100, 64, math.ceil(50000 / 64)),
    ("ViT, Table VII (CIFAR-100, batch 256)", "vit", 100, 256, math.ceil(50000 / 256)),
    # AdaMatch's step forwards 2 x (64 + 3 x 64) images, then the 128 source ones again: timed here as a
    # supervised step on the 512 of its joint batch; an epoch is MNIST's 60000 source images in steps of 64
    ("WRN-28-2, AdaMatch (joint batch of 512)", "wrn28_2", 10, 512, 60000 // 64),
]


def build(model: str, classes: int, norm: str) -> nn.Module:
    from cbnorm.experiments.models import build_model
    from cbnorm.experiments.models.wide_resnet import WideResNet
    from cbnorm.experiments.train import norm_kwargs

    layer = None if norm == "none" else norm
    if model == "wrn28_2":
        return WideResNet(28, 2, classes, 3, layer, norm_kwargs(norm, 3, {}))
    return build_model(model, classes, 3, layer, norm_kwargs(norm, 3, {}))


def step_seconds(model_name: str, classes: int, batch: int, norm: str, fast: bool, steps: int, device) -> float:
    """Seconds per training step, timed over ``steps`` steps after 3 warm-up steps."""
    from cbnorm.experiments import speed
    from cbnorm.experiments.planner import _timed
    from cbnorm.experiments.runs import autocast, clustered
    from cbnorm.experiments.train import TrainConfig, supervised_norm

    settings = {} if fast else {"bf16": False, "channels_last": False, "cudnn_benchmark": False}
    config = speed.resolve_speed(TrainConfig(norm=norm, **settings), device)
    dtype = speed.autocast_dtype(config, device)
    model = speed.prepare_model(build(model_name, classes, norm).to(device), config)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=speed.memory_format(config))
    labels = torch.randint(0, classes, (batch,), device=device)
    ids = torch.randint(0, 3, (batch,), device=device) if supervised_norm(norm) else None

    def step():
        with autocast(device, dtype is not None, dtype), clustered(ids):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, steps, 3, device)


def _worker(barrier, results, model: tuple, args) -> None:
    device = torch.device(args.device)
    barrier.wait()
    results.put(step_seconds(*model, args.norm, args.fast, args.steps, device))


def epoch_seconds(spec, copies: int, args) -> list[float]:
    """Each copy's seconds per epoch of ``spec`` with ``copies`` processes training at once."""
    import torch.multiprocessing as mp

    _, model_name, classes, batch, steps_per_epoch = spec
    if copies == 1:
        device = torch.device(args.device)
        return [steps_per_epoch * step_seconds(model_name, classes, batch, args.norm, args.fast, args.steps, device)]
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(copies), context.Queue()
    model = (model_name, classes, batch)
    processes = [context.Process(target=_worker, args=(barrier, results, model, args)) for _ in range(copies)]
    for process in processes:
        process.start()
    seconds = [results.get() * steps_per_epoch for _ in processes]
    for process in processes:
        process.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8], help="processes at once (default: 1 4 8)")
    parser.add_argument("--norm", default="batchnorm", help="the layer under test (default: batchnorm)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default: 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-fast", dest="fast", action="store_false", help="float32, NCHW, no cuDNN benchmark")
    parser.add_argument("--models", nargs="+", help="a subset of: shallow_cnn densenet40 vit wrn28_2")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    specs = [spec for spec in MODELS if not args.models or spec[1] in args.models]
    print(f"Seconds per epoch on {name}, torch {torch.__version__}, layer {args.norm}, "
          f"{'bf16 + channels-last + cuDNN benchmark' if args.fast and device.type == 'cuda' else 'float32'}; "
          f"{args.steps} timed steps. With P at once: each run's epoch, and the epochs per hour of all P together.\n")
    print("| model | " + " | ".join(f"P = {p}: s/epoch | epochs/h" for p in args.parallel) + " |")
    print("| --- |" + " --- | --- |" * len(args.parallel))
    for spec in specs:
        cells = []
        for copies in args.parallel:
            seconds = epoch_seconds(spec, copies, args)
            mean = sum(seconds) / len(seconds)
            cells += [f"{mean:.1f}", f"{sum(3600 / s for s in seconds):.0f}"]
        print(f"| {spec[0]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
