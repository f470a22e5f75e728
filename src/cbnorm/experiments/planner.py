"""What of an experiment fits a time budget on this device, decided before anything trains.

    seconds = time_epochs(experiment, data, scale, device)     # one epoch of each layer, from timed steps
    plan = plan_runs(experiment, seconds, budget_seconds=8 * 60, seeds=(0, 1, 2), epochs=100)
    print(plan.describe())                                     # which layers, lrs, seeds and epochs fit

:func:`time_epochs` times a few training steps (forward, backward, optimiser) of the experiment's
model with each layer under test at the protocol's batch size, and a few evaluation batches, on
real images on the device, after warm-up steps; an epoch is its steps times the step time plus its
evaluation. :func:`time_layers` does the same for any run made of such parts (the DCGAN's and
AdaMatch's steps and evaluations). :func:`plan_runs` then takes whole rounds of runs (every layer
at one learning rate and seed) while they fit: both learning rates at seed 0, then at seed 1, and
so on; then, in a last round, as many layers as still fit. An experiment without a learning-rate
axis (``lrs=()``: a run per layer and seed) plans runs ``(layer, seed)``, a round per seed. The
plan assumes the runs go one after another: ``--parallel`` can only finish it sooner. When not
even one run fits at the protocol's epochs it raises :class:`BudgetError`, which says how long one
run takes; ``--epochs`` plans at fewer epochs instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

__all__ = ["BudgetError", "EpochPart", "Plan", "Protocol", "plan_lines", "plan_runs", "time_epochs", "time_layers",
           "timing_lines"]


class BudgetError(ValueError):
    """Not even one run of the protocol fits the time budget."""


@dataclass(frozen=True)
class Plan:
    """The runs ``(norm, lr, seed)``, or ``(norm, seed)`` without a learning-rate axis, that fit ``budget_seconds``
    at ``epochs`` each, estimated to take ``seconds``."""

    runs: tuple[tuple, ...]
    epochs: int
    seconds: float
    budget_seconds: float
    epoch_seconds: dict
    considered: int  # runs the protocol asks for at the seeds considered

    def describe(self) -> str:
        layers = list(dict.fromkeys(run[0] for run in self.runs))
        per_epoch = ", ".join(f"{norm} {s:.2f} s" for norm, s in self.epoch_seconds.items())
        axes = "(layer, lr, seed)" if len(self.runs[0]) == 3 else "(layer, seed)"
        return (f"time budget {self.budget_seconds / 60:g} min: {len(self.runs)} of {self.considered} runs at "
                f"{self.epochs} epochs, estimated {self.seconds / 60:.1f} min one after another "
                f"(an epoch: {per_epoch}). Layers {', '.join(layers)}; runs {axes}: "
                + ", ".join("(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in run) + ")"
                            for run in self.runs))

    def as_dict(self) -> dict:
        return {"budget_minutes": self.budget_seconds / 60, "epochs": self.epochs,
                "estimated_minutes": self.seconds / 60, "epoch_seconds": self.epoch_seconds,
                "runs": [list(run) for run in self.runs], "considered": self.considered}


@dataclass(frozen=True)
class Protocol:
    """What :func:`time_epochs` times: a :func:`~cbnorm.experiments.models.build_model` model at a batch size,
    its layers with ``k`` clusters (an :class:`~cbnorm.experiments.reproduce.Experiment` is one too)."""

    model: str
    batch_size: int
    k: int


def plan_runs(experiment, epoch_seconds: dict, budget_seconds: float, seeds: Sequence[int], epochs: int,
              norms: Optional[Sequence[str]] = None, lrs: Optional[Sequence[float]] = None) -> Plan:
    """The runs of ``experiment`` (its ``norms`` and ``lrs``, or those given, and ``seeds``) that fit the budget.

    ``epoch_seconds[norm]``: one epoch of that layer's run (``norms`` may be any names of the layers, such as
    the reproduction's variant keys). ``lrs=()``: the runs have no learning rate; they are ``(norm, seed)``.
    Raises :class:`BudgetError` when no run fits.
    """
    norms = list(norms if norms is not None else [norm for _, norm in experiment.norms])
    lrs = list(lrs if lrs is not None else experiment.lrs)
    if budget_seconds <= 0:
        raise ValueError(f"expected a positive time budget, got {budget_seconds / 60:g} minutes")
    axis = [(lr,) for lr in lrs] or [()]  # no learning-rate axis: one round a seed
    rounds = [[(norm, *lr, seed) for norm in norms] for seed in seeds for lr in axis]
    cost = {norm: epochs * epoch_seconds[norm] for norm in norms}
    chosen, spent = [], 0.0
    for runs in rounds:
        round_cost = sum(cost[run[0]] for run in runs)
        if spent + round_cost <= budget_seconds:
            chosen += runs
            spent += round_cost
            continue
        for run in runs:  # the last round: the layers that still fit, in the table's order
            if spent + cost[run[0]] <= budget_seconds:
                chosen.append(run)
                spent += cost[run[0]]
        break
    if not chosen:
        cheapest = min(norms, key=cost.get)
        raise BudgetError(f"not even one run fits the time budget of {budget_seconds / 60:g} min: the cheapest, "
                          f"{cheapest}, takes about {cost[cheapest] / 60:.1f} min for {epochs} epochs "
                          f"({epoch_seconds[cheapest]:.2f} s per epoch on this device); give a larger --time-budget, "
                          f"or --epochs to plan fewer epochs than the protocol's")
    return Plan(tuple(chosen), epochs, spent, budget_seconds, dict(epoch_seconds), len(norms) * len(rounds))


class EpochPart(NamedTuple):
    """A part of an epoch for :func:`time_layers`: ``step()`` called ``calls`` times an epoch (a mean, such as the
    share of an evaluation made every few epochs, may be fractional), timed over ``timed`` calls after ``warmup``."""

    step: Callable[[], object]
    calls: float
    timed: int = 3
    warmup: int = 2


def time_layers(norms: Sequence[str], epoch: Callable[[str], Sequence[EpochPart]], device) -> dict:
    """Seconds per epoch of a run with each layer in ``norms``: ``epoch(norm)`` builds that layer's run on ``device``
    and returns the parts of its epoch (training steps, evaluation batches, ...); each part is timed on its own
    (the device synchronised around it) and counts its calls. Parts called 0 times are not timed."""
    if device.type == "cpu":
        from cbnorm import kernels

        kernels.build()  # a first build takes about a minute: not in the warm-up steps' time, nor the timed ones
    return {norm: sum(part.calls * _timed(part.step, part.timed, part.warmup, device)
                      for part in epoch(norm) if part.calls) for norm in norms}


def time_epochs(experiment, data, train_size: int, test_size: int, device, norms: Sequence[str],
                speed_settings: Optional[dict] = None, steps: int = 3, warmup: int = 2) -> dict:
    """Seconds per epoch of each layer in ``norms``: ``steps`` timed training steps (after ``warmup``) of the
    experiment's model at its batch size and one timed evaluation batch, on ``data``'s images on ``device``.
    ``experiment``: a :class:`Protocol`, or anything with its fields."""
    import torch
    from torch import nn

    from . import speed
    from .models import build_model
    from .runs import clustered
    from .train import TrainConfig, norm_kwargs, supervised_norm

    train_images = train_size or len(data.train)
    test_images = test_size or len(data.test)
    mean, std = data.channel_stats()
    draws = torch.Generator().manual_seed(0)

    def epoch(norm: str) -> list[EpochPart]:
        config = speed.resolve_speed(TrainConfig(model=experiment.model, norm=norm, **(speed_settings or {})), device)
        model = build_model(experiment.model, data.num_classes, data.in_channels, None if norm == "none" else norm,
                            norm_kwargs(norm, experiment.k, {}))
        model = speed.compiled(speed.prepare_model(model.to(device), config), config)
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)

        def batch(size: int):
            index = torch.randint(0, len(data.train), (size,), generator=draws)
            images = ((data.train.images[index].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
            images = images.to(device).contiguous(memory_format=speed.memory_format(config))
            ids = torch.randint(0, experiment.k, (size,), generator=draws).to(device) if supervised_norm(norm) else None
            return images, data.train.labels[index].to(device), ids

        train_batch = batch(min(experiment.batch_size, train_images))
        eval_batch = batch(min(1000, test_images))

        def train_step():
            images, labels, ids = train_batch
            model.train()
            with speed.autocast(config, device), clustered(ids):
                loss = nn.functional.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def eval_step():
            images, _, ids = eval_batch
            model.eval()
            with torch.no_grad(), speed.autocast(config, device), clustered(ids):
                model(images)

        return [EpochPart(train_step, math.ceil(train_images / experiment.batch_size), steps, warmup),
                EpochPart(eval_step, math.ceil(test_images / 1000), 1, 1)]

    return time_layers(norms, epoch, device)


def _timed(step, steps: int, warmup: int, device) -> float:
    """Seconds per call of ``step``, over ``steps`` calls after ``warmup`` (the device synchronised around them)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def timing_lines(seconds_per_epoch: Mapping[str, float], device_name: str) -> list[str]:
    """A table's time per run: the seconds per epoch of each configuration (by name) on ``device_name``."""
    timed = [f"{config}: {seconds:.2f} s" for config, seconds in seconds_per_epoch.items()]
    return ["", f"Time per run on {device_name}, seconds per epoch (training and evaluation, mean over the seeds): "
            + ("; ".join(timed) or "none ran") + "."]


def plan_lines(plan: Optional[dict]) -> list[str]:
    """What a table says of a ``--time-budget`` plan (as ``summary.json`` holds it): which subset ran."""
    return ["", f"Only part of the protocol ran, as planned by --time-budget: {plan['text']}"] if plan else []
