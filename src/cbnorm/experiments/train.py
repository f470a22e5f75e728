"""Train one model on one data set: the paper's classification loop, resumable at every epoch.

    cbnorm train --dataset cifar10 --norm ucb --lr 0.001 --epochs 100 --out runs/ucb      # Table V's protocol
    cbnorm train --out runs/ucb --resume                                                 # after a crash
    cbnorm train --model densenet40 --norm scb --num-clusters 5 --optimizer sgd --lr 0.1 \\
        --schedule step --batch-size 64 --epochs 200 --out runs/densenet40-scb           # IV-C's protocol

Every epoch prints a row of the progress table, rewrites RUN/metrics.csv and RUN/metrics.json and
saves RUN/checkpoint.pt atomically: model, optimiser, scheduler, AMP scaler, every RNG state and the
history. The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, so ``--resume``
continues exactly where the last checkpoint left off and a crash loses at most one epoch.

The data set stays on the device as uint8 and each batch is cut and augmented there
(:class:`~cbnorm.experiments.device_data.DeviceLoader`). On CUDA a run uses bfloat16 autocast,
channels-last tensors and cuDNN's autotuner unless told not to (``--no-bf16``, ``--no-channels-last``,
``--no-cudnn-benchmark``), and ``--compile`` compiles the model: see :mod:`cbnorm.experiments.speed`.

Distributed: ``torchrun --nproc_per_node=P -m cbnorm train ...`` trains on ``P`` processes (see
:mod:`cbnorm.experiments.distributed`). ``--batch-size`` is the global batch, each rank trains on its
share with every batch statistic taken over the global batch, and the metrics are those of one
process with the same flags, up to float rounding. Rank 0 prints and writes; ``--resume`` works the
same way.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cbnorm import kernels
from cbnorm.factory import norm_layer_info

from . import distributed, speed
from .clusters import ClusterIds, prior_clusters
from .config import RUN_CONTROL, SELECTIONS, TrainConfig
from .data import DATASETS, Dataset, Loader, Split, atomic_write, load_dataset
from .device_data import DeviceLoader
from .metrics import COLUMNS, confusion_matrix, macro_scores
from .models import build_model
from .runs import RunFolder, autocast, clustered, resolve_device

__all__ = ["SELECTIONS", "Setup", "TrainConfig", "best_val_row", "setup", "train"]


# -- what a run is made of -------------------------------------------------------------------------


@dataclass
class Setup:
    """A run's data (subsets), cluster ids, model and normalisation, built from its config."""

    data: Dataset
    train: Split
    test: Split
    train_ids: Optional[Tensor]
    test_ids: Optional[Tensor]
    val: Optional[Split]  # the held-out training images of --select best-val
    val_ids: Optional[Tensor]
    clusters: Optional[ClusterIds]
    model: nn.Module
    mean: Tensor
    std: Tensor


def _subset(split: Split, size: int) -> Tensor:
    """Indices of a fixed random subset (seed 0, whatever the run's seed), sorted; all when ``size`` is 0."""
    if not size or size >= len(split):
        return torch.arange(len(split))
    return torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:size].sort().values


def _hold_out(index: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """``index`` split into training and validation indices (``round(fraction * N)`` of them, at least 1),
    by a fixed draw (seed 0, whatever the run's seed), each sorted."""
    count = min(max(1, round(fraction * len(index))), len(index) - 1)
    if count < 1:
        raise ValueError(f"--select best-val: expected at least 2 training images to hold some out, got {len(index)}")
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))
    return index[order[count:]].sort().values, index[order[:count]].sort().values


def best_val_row(history: Sequence[dict]) -> dict:
    """The first epoch's row with the highest ``val_acc`` (the checkpoint the authors report)."""
    if not history or "val_acc" not in history[0]:
        raise ValueError("best_val_row: expected a history with val_acc (a run with --select best-val)")
    return max(history, key=lambda row: (row["val_acc"], -row["epoch"]))


def norm_kwargs(norm: str, k: int, extra: dict) -> dict:
    """``K`` under the keyword the registry declares for the layer (none for BatchNorm), then ``extra``."""
    k_arg = None if norm == "none" else norm_layer_info(norm).k_arg
    return {**({} if k_arg is None else {k_arg: k}), **extra}


def supervised_norm(norm: str) -> bool:
    """Whether the registry declares that the layer takes cluster ids (the SCB layers)."""
    return norm != "none" and norm_layer_info(norm).takes_clusters


def setup(config: TrainConfig, data: Optional[Dataset] = None) -> Setup:
    """Load the data (or use ``data``), draw the subsets, get SCB's clusters and build the model.

    The model is initialised from ``config.seed``. Layers take ``K = config.num_clusters``; for SCB
    layers it must be the number of their clusters (20 for CIFAR-100's superclasses, 2 for CIFAR-10's).
    """
    data = data if data is not None else load_dataset(config.dataset, config.data_dir)
    train_index, test_index = _subset(data.train, config.train_size), _subset(data.test, config.test_size)
    clusters = None
    k = config.num_clusters
    # A dataset mixture is cached where clusters.mixture_clusters says, never beside --out.
    if supervised_norm(config.norm):
        clusters = prior_clusters(data, config.clusters, config.num_clusters, config.cluster_method, 0)
        if clusters.k != config.num_clusters:  # config.json must record the K that runs
            raise ValueError(
                f"TrainConfig: expected num_clusters={clusters.k}, the number of {clusters.source} "
                f"clusters of {data.name} that the {config.norm} layer gets, got {config.num_clusters}"
            )
    torch.manual_seed(config.seed)
    norm = None if config.norm == "none" else config.norm
    model = build_model(
        config.model, data.num_classes, data.in_channels, norm, norm_kwargs(config.norm, k, config.norm_kwargs)
    )
    mean, std = data.channel_stats()
    val_index = None
    if config.select == "best-val":
        train_index, val_index = _hold_out(train_index, config.val_fraction)

    def ids(index, split):
        return None if clusters is None or index is None else getattr(clusters, split)[index]

    return Setup(
        data,
        data.train.subset(train_index),
        data.test.subset(test_index),
        ids(train_index, "train"),
        ids(test_index, "test") if config.test_clusters else None,
        None if val_index is None else data.train.subset(val_index),
        ids(val_index, "train") if config.test_clusters else None,
        clusters,
        model,
        mean,
        std,
    )


# -- the loop --------------------------------------------------------------------------------------


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":  # L2 penalty added to the gradient, as torch.optim.Adam does
        return torch.optim.Adam(model.parameters(), config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch schedule: constant, or divided by 10 at 50% and 75% of the epochs (``step``)."""
    milestones = [config.epochs // 2, (3 * config.epochs) // 4] if config.schedule == "step" else []
    milestones = [m for m in milestones if m >= 1]  # a 1-epoch run has no epoch boundary to decay at
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)


def _train_epoch(model, loader: Loader, epoch: int, optimizer, scaler, config: TrainConfig, device, bar) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    batches = zip(loader.epoch(epoch), loader.global_batch_sizes)
    for step, ((images, labels, ids), global_batch) in enumerate(batches):
        with speed.autocast(config, device), clustered(ids):
            logits = model(images)
            # the mean over the global batch, times the ranks: DDP's average of the ranks' gradients is its gradient
            total = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            loss = total / (global_batch / loader.world_size)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += total.detach()
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix_str(f"loss {total.item() / max(len(labels), 1):.4f}")
    loss_sum, correct, seen = distributed.all_reduce_sum(loss_sum, correct, torch.tensor(seen))
    accuracy = correct.item() / seen.item()
    return {"train_loss": loss_sum.item() / seen.item(), "train_acc": accuracy, "train_error": 1 - accuracy}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Loader, device: torch.device, amp: bool = False, dtype: Optional[torch.dtype] = None
) -> dict:
    """Mean cross-entropy, accuracy and macro precision, recall and F1 of ``model`` (in eval mode) on ``loader``'s
    split.

    A loader of one rank's share (``world_size > 1``) gives the metrics of the whole split: the sums are
    all-reduced over the ranks. ``dtype``: of the autocast (with ``amp``), by default :func:`~.runs.autocast`'s.
    """
    model.eval()
    loss_sum, seen, confusion = torch.zeros((), dtype=torch.float64), 0, 0
    for images, labels, ids in loader.epoch():
        with autocast(device, amp, dtype), clustered(ids):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        confusion = confusion + confusion_matrix(logits.argmax(1), labels, logits.shape[1])
        seen += len(labels)
    if loader.world_size > 1:
        loss_sum, confusion, seen = distributed.all_reduce_sum(loss_sum, confusion, torch.tensor(seen))
    loss_sum, seen = loss_sum.item(), int(seen)
    scores = macro_scores(confusion)
    return {
        "test_loss": loss_sum / seen,
        "test_acc": scores["accuracy"],
        "test_error": 1 - scores["accuracy"],
        "test_precision": scores["precision"],
        "test_recall": scores["recall"],
        "test_f1": scores["f1"],
    }


def _epochs_fixed(config: TrainConfig) -> Optional[str]:
    """Why a resumed run may not change its number of epochs, or ``None`` when it may (train longer)."""
    if config.schedule == "step":
        return "the step schedule divides the learning rate at 50% and 75% of the epochs"
    if config.snapshots:
        return "the snapshots are taken at fractions of the epochs"
    return None


def _snapshot_epochs(config: TrainConfig) -> set[int]:
    return {round(i * config.epochs / config.snapshots) for i in range(1, config.snapshots + 1)}


def _describe(config: TrainConfig, run: Setup, device: torch.device, batches: int, world_size: int = 1) -> str:
    ranks = f" over {world_size} processes" if world_size > 1 else ""
    norm = config.norm
    if run.clusters is not None:
        norm += f" (K={run.clusters.k} clusters: {run.clusters.source})"
    elif norm_kwargs(config.norm, config.num_clusters, {}):  # a layer with K of its own (UCB-Norm, MN)
        norm += f" (K={config.num_clusters})"
    return (
        f"{config.dataset} ({len(run.train)} train / {len(run.test)} test) | {config.model} + {norm} | "
        f"{config.optimizer} lr {config.lr:g} wd {config.weight_decay:g} {config.schedule} | "
        f"{config.epochs} epochs x {batches} batches of {config.batch_size}{ranks} | seed {config.seed} | {device} "
        f"({speed.describe(config)}) | {config.out}"
    )


def train(config: TrainConfig, data: Optional[Dataset] = None) -> list[dict]:
    """Run (or resume, with ``config.resume``) the training ``config`` describes; returns the history.

    ``data`` skips loading the dataset (the reproduction loads it once for all its runs). A run
    directory that holds a checkpoint is only continued with ``resume=True``, and only with the
    config it was started with (fields in :data:`RUN_CONTROL` may differ). Under ``torchrun`` every
    rank runs this, and the process group is opened (and closed) here unless it is already open.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cpu" and config.norm != "none" and not config.norm.startswith("batchnorm"):
        kernels.build()  # before any epoch is timed: the first build takes about a minute
    ranks = distributed.join(device)
    try:
        return _train(config, data, device, ranks)
    finally:
        distributed.leave(ranks)


def _rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank > 0``'s own random stream (dropout); rank 0 keeps the one-process stream."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _train(config: TrainConfig, data: Optional[Dataset], device: torch.device, ranks: distributed.Ranks) -> list[dict]:
    from tqdm.auto import tqdm

    is_main = ranks.is_main
    out = Path(config.out)
    config = speed.resolve_speed(config, device)  # config.json records what the device uses
    columns = COLUMNS + ["val_loss", "val_acc"] if config.select == "best-val" else COLUMNS
    folder = RunFolder(
        out,
        dataclasses.asdict(config),
        resume=config.resume,
        overwrite=config.overwrite,
        run_control=RUN_CONTROL,
        epochs_fixed=_epochs_fixed(config),
        ranks=ranks,
        columns=columns,
    )

    random.seed(config.seed)
    np.random.seed(config.seed)
    with distributed.main_first(ranks):  # rank 0 writes the SCB cluster cache, the others read it
        run = setup(config, data)
    if not ranks.is_main:
        torch.manual_seed(_rank_seed(config.seed, ranks.rank))
    model = speed.prepare_model(run.model.to(device), config)
    shard = dict(rank=ranks.rank, world_size=ranks.world_size, device=device)
    shard.update(memory_format=speed.memory_format(config))
    train_loader = DeviceLoader(
        run.train,
        config.batch_size,
        run.mean,
        run.std,
        train=True,
        cluster_ids=run.train_ids,
        flip=config.augment and DATASETS[config.dataset].flip,
        crop_padding=DATASETS[config.dataset].crop_padding if config.augment else 0,
        seed=config.seed,
        **shard,
    )
    test_loader = DeviceLoader(run.test, config.eval_batch_size, run.mean, run.std, cluster_ids=run.test_ids, **shard)
    val_loader = (
        None
        if run.val is None
        else DeviceLoader(run.val, config.eval_batch_size, run.mean, run.std, cluster_ids=run.val_ids, **shard)
    )
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer)
    scaler = speed.grad_scaler(config, device)
    stateful = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    history = folder.restore(device, **stateful)
    trained = distributed.wrap_model(model, ranks, device)  # DDP, statistics over the global batch
    trained = speed.compiled(trained, config)
    folder.start(_describe(config, run, device, len(train_loader), ranks.world_size))
    snapshot_epochs = _snapshot_epochs(config)
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch}",
            leave=False,
            disable=None if config.progress and is_main else True,
        ) as bar:
            row = {"epoch": epoch, **_train_epoch(trained, train_loader, epoch, optimizer, scaler, config, device, bar)}
        scheduler.step()
        dtype = speed.autocast_dtype(config, device)
        row.update(evaluate(model, test_loader, device, dtype is not None, dtype))
        if val_loader is not None:
            val = evaluate(model, val_loader, device, dtype is not None, dtype)
            row.update(val_loss=val["test_loss"], val_acc=val["test_acc"])
        row.update(lr=lr, seconds=time.perf_counter() - start)
        if is_main and epoch in snapshot_epochs:  # before the checkpoint: a checkpointed epoch has its snapshot
            atomic_write(out / "snapshots" / f"epoch-{epoch:04d}.pt", lambda f: torch.save(model.state_dict(), f))
        folder.save(row, device, **stateful)
    return folder.history
