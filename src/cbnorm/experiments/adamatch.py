r"""AdaMatch with SCB-Norm, SCB-Norm-base or UCB-Norm as the initial layer of its WideResNet (paper IV-E).

    cbnorm adamatch --source mnist --target digits --norm scb --epochs 10 --out runs/da-scb   # one run
    cbnorm adamatch --out runs/da-scb --resume                                                # after a crash
    cbnorm reproduce adamatch --source mnist --target digits --scale small                    # Table VI, Figure 12

Unsupervised domain adaptation: labelled source images (MNIST), unlabelled target images
(scikit-learn's digits here, SVHN in the paper), one 10-class WideResNet-28-2
(:mod:`~cbnorm.experiments.models.wide_resnet`). The layer under test is the network's initial
layer; SCB-Norm and SCB-Norm-base get the domain as the cluster (source 0, target 1), UCB-Norm
learns ``K = 2`` components unsupervised; the baseline ("AdaMatch") is the plain network.
Both domains' images are brought to 32 x 32 x 3, scaled to ``[0, 1]`` (as the Keras example the
paper followed does): bilinear resizing (MNIST 28 -> 32, digits 8 -> 32, SVHN as is) and grey
images repeated on three channels.

**AdaMatch** (Berthelot et al., "AdaMatch: A Unified Approach to Semi-Supervised Learning and
Domain Adaptation", ICLR 2022, Section 3 and Algorithm 1; official code
``google-research/adamatch``, ``domain_adaptation/adamatch.py``). Per step, with ``n_S`` source
images and ``n_T = uratio * n_S`` target images, each weakly (``w``) and strongly (``s``) augmented
(:mod:`~cbnorm.experiments.augment`), :func:`adamatch_objective` computes:

1. *Random logit interpolation.* One pass over the whole batch in training mode,
   :math:`\{Z'_S, Z_T\} = f(\{X_S, X_T\})` (batch statistics of both domains, running statistics
   updated), and one over the source images alone, :math:`Z''_S = f(X_S)` (batch statistics of the
   source only; every buffer is restored afterwards, so the running statistics see only the first
   pass). Then :math:`Z_S = \lambda Z'_S + (1 - \lambda) Z''_S` with
   :math:`\lambda \sim U(0, 1)^{2 n_S \times k}`, one draw per logit.
2. *Distribution alignment.* :math:`\hat Y_S = \mathrm{softmax}(Z_{S,w})`,
   :math:`\hat Y_T = \mathrm{softmax}(Z_{T,w})`,
   :math:`\tilde Y_T = \mathrm{normalize}(\hat Y_T \odot \mathbb{E}[\hat Y_S] / \mathbb{E}[\hat Y_T])`,
   the expectations per class over the batch and ``normalize`` dividing each row by its sum
   (the official code adds 1e-6 to both expectations, as here, and averages them over past batches;
   the paper's equation, used here, takes the batch's).
3. *Relative confidence threshold.*
   :math:`c_\tau = \tau \cdot \frac{1}{n_S}\sum_i \max_j \hat Y_S^{(i,j)}`, :math:`\tau = 0.9`;
   target image ``i`` is kept when :math:`\max_j \tilde Y_T^{(i,j)} \ge c_\tau`.
4. *Losses.* :math:`L_S = \frac12 (H(Y_S, Z_{S,w}) + H(Y_S, Z_{S,s}))` (mean cross-entropies; the
   official code's ``1/2``, the Keras example sums them);
   :math:`L_T = \frac{1}{n_T}\sum_i \mathrm{mask}_i\, H(\arg\max_j \tilde Y_T^{(i,j)}, Z_{T,s}^{(i)})`,
   hard pseudo-labels of the aligned weak predictions for the strong images (as the official
   code), no gradient through mask or pseudo-labels.
5. *Warm-up of the unlabelled weight.*
   :math:`L = L_S + \mu(t) L_T`, :math:`\mu(t) = \frac12 - \frac12\cos(\min(\pi, 2\pi t / T))`,
   ``t`` the step and ``T`` the total steps: 0 at the start, 1 from half of training on.

**Optimiser** (the paper's): Adam, initial learning rate 0.03, cosine decay per step to 25% of it
at the end (Keras' ``CosineDecay(0.03, T, alpha=0.25)`` of the example the paper's baseline numbers
come from), no weight decay (that example's L2 regularisers are never added to its loss). Adam at
0.03 is far above Adam's usual range; see ``docs/reproducing.md`` (AdaMatch) for what it did here.

**Gradient variance** (Figure 12). On every ``--grad-every``-th step the gradients of the two loss
terms are taken separately, :math:`g_S = \nabla_\theta L_S` and :math:`g_T = \nabla_\theta L_T`
(unweighted by :math:`\mu`), over all ``P`` trainable parameters of the network, and the update
uses :math:`g_S + \mu g_T`, the gradient of ``L``. The gradient variance of a domain at that step
is the variance of its gradient's entries, :math:`\frac1P\sum_p (g_p - \bar g)^2`; each epoch
records its maximum and mean over the epoch's probed steps (``grad_var_{source,target}_{max,mean}``).

**Evaluation**, every epoch, on the source and target test sets: cross-entropy, accuracy and
macro precision, recall and F1 (:func:`~cbnorm.experiments.metrics.macro_scores`). SCB layers
get the **source** cluster id for every test image, as the paper does. After the last epoch
``inference.json`` also holds every other inference rule: the true domain id, and (SCB-Norm)
each unknown-cluster rule of SPEC.md, ``unknown`` in paper/posterior/map with the posterior per
element or per sample, or (SCB-Norm-base) the uniform assignment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

import cbnorm
from cbnorm.functional import POSTERIOR_SCOPES, UNKNOWN_RULES
from cbnorm.layers import SCBNorm

from . import augment, speed
from .config import RUN_CONTROL, AdaMatchConfig
from .data import Dataset, Split, atomic_write, available, load_dataset
from .device_data import images_on
from .driver import Finished, LayerSeedSpec, Scale, drive_experiment
from .metrics import confusion_matrix, macro_scores
from .models.wide_resnet import WideResNet
from .planner import EpochPart, plan_lines, time_layers
from .runs import RunFolder, clustered, keyed_generator, resolve_device
from .stats import comparison, interval
from .train import _subset, norm_kwargs, supervised_norm

__all__ = ["ADAMATCH_SCALES", "AdaMatch", "AdaMatchConfig", "AdaMatchScale", "adamatch_objective", "adamatch_step",
           "backward", "protocol", "reproduce_adamatch", "time_adamatch_epochs", "train_adamatch", "warmup"]

SOURCE, TARGET = 0, 1  # the domains' cluster ids


# -- the two domains ------------------------------------------------------------------------------------------


def common_images(images: Tensor, size: int) -> Tensor:
    """uint8 images at ``size x size`` (bilinear, antialiased when shrinking) with 3 channels (grey repeated)."""
    if tuple(images.shape[-2:]) != (size, size):
        shrink = images.shape[-1] > size
        images = nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=shrink).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


@dataclass
class Domains:
    """The four splits of a run, at the common geometry, and the number of classes."""

    source_train: Split
    target_train: Split
    source_test: Split
    target_test: Split
    num_classes: int


def domains(config: AdaMatchConfig, source: Dataset, target: Dataset) -> Domains:
    """The fixed random subsets (seed 0) of both domains, brought to ``config.image_size`` and 3 channels."""
    if source.num_classes != target.num_classes:
        raise ValueError(f"AdaMatch: expected the same classes in both domains, got {source.num_classes} in "
                         f"{source.name} and {target.num_classes} in {target.name}")

    def take(split: Split, size: int) -> Split:
        part = split.subset(_subset(split, size))
        return Split(common_images(part.images, config.image_size), part.labels)

    return Domains(take(source.train, config.source_train_size), take(target.train, config.target_train_size),
                   take(source.test, config.source_test_size), take(target.test, config.target_test_size),
                   source.num_classes)


def build_model(config: AdaMatchConfig, num_classes: int) -> WideResNet:
    norm = None if config.norm == "none" else config.norm
    kwargs = norm_kwargs(config.norm, config.num_clusters, config.norm_kwargs)
    return WideResNet(config.depth, config.width, num_classes, 3, norm, kwargs, bn_momentum=config.bn_momentum)


# -- the objective ---------------------------------------------------------------------------------------------


def warmup(progress: float) -> float:
    r""":math:`\mu(t) = \frac12 - \frac12\cos(\min(\pi, 2\pi t/T))` at ``progress = t / T``."""
    return 0.5 - math.cos(min(math.pi, 2 * math.pi * progress)) / 2


def adamatch_objective(joint: Tensor, source_only: Tensor, labels: Tensor, progress: float, tau: float = 0.9,
                       interpolation: Optional[Tensor] = None) -> dict:
    r"""AdaMatch's loss terms (steps 1 to 5 of the module docstring) from the logits of the two passes.

    Args:
        joint: logits of ``[source weak, source strong, target weak, target strong]``, ``(2 n_S + 2 n_T, k)``.
        source_only: logits of ``[source weak, source strong]`` from the source-only pass, ``(2 n_S, k)``.
        labels: source labels ``(n_S,)``.
        progress: ``t / T``, for the warm-up :math:`\mu`.
        tau: the relative confidence threshold.
        interpolation: :math:`\lambda`, ``(2 n_S, k)``; drawn from ``U(0, 1)`` (global RNG) when ``None``.

    Returns:
        ``loss_source``, ``loss_target`` (tensors with gradient), ``mu``, and, without gradient:
        ``source_weak`` (:math:`Z_{S,w}`), ``aligned`` (:math:`\tilde Y_T`), ``pseudo`` (its argmax),
        ``mask`` (float), ``threshold`` (:math:`c_\tau`).
    """
    n_s = len(labels)
    n_t = (len(joint) - 2 * n_s) // 2
    if source_only.shape != (2 * n_s, joint.shape[1]) or n_t < 1 or len(joint) != 2 * n_s + 2 * n_t:
        raise ValueError(f"adamatch_objective: expected joint logits (2 n_S + 2 n_T, k) and source-only logits "
                         f"(2 n_S, k) for n_S = {n_s}, got {tuple(joint.shape)} and {tuple(source_only.shape)}")
    joint, source_only = joint.float(), source_only.float()
    if interpolation is None:
        interpolation = torch.rand(source_only.shape, device=joint.device)
    source = interpolation * joint[: 2 * n_s] + (1 - interpolation) * source_only
    source_weak, source_strong = source[:n_s], source[n_s:]
    target_weak, target_strong = joint[2 * n_s: 2 * n_s + n_t], joint[2 * n_s + n_t:]
    with torch.no_grad():
        p_source, p_target = source_weak.softmax(1), target_weak.softmax(1)
        aligned = p_target * (1e-6 + p_source.mean(0)) / (1e-6 + p_target.mean(0))
        aligned = aligned / aligned.sum(1, keepdim=True)
        threshold = tau * p_source.max(1).values.mean()
        confidence, pseudo = aligned.max(1)
        mask = (confidence >= threshold).float()
    cross_entropy = nn.functional.cross_entropy
    loss_source = 0.5 * (cross_entropy(source_weak, labels) + cross_entropy(source_strong, labels))
    loss_target = (cross_entropy(target_strong, pseudo, reduction="none") * mask).mean()
    return {"loss_source": loss_source, "loss_target": loss_target, "mu": warmup(progress),
            "source_weak": source_weak.detach(), "aligned": aligned, "pseudo": pseudo, "mask": mask,
            "threshold": float(threshold)}


def _domain_ids(n: int, domain: int, device) -> Tensor:
    return torch.full((n,), domain, dtype=torch.long, device=device)


def _flat_variance(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor], scale: float = 1.0) -> float:
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return float(flat.double().var(unbiased=False)) / scale**2


def backward(loss_source: Tensor, loss_target: Tensor, mu: float, params: Sequence[Tensor],
             probe: bool, scaler=None) -> Optional[tuple[float, float]]:
    """Set ``p.grad`` to the gradient of ``loss_source + mu * loss_target``, times the loss ``scaler``'s scale
    when it has one (its ``step`` divides it out). With ``probe`` the two terms' gradients are taken apart first
    and their variances over the entries returned (Figure 12), without the scale; ``None`` when a float16
    gradient overflowed (the scaler skips that step)."""
    scale = scaler.scale if scaler is not None else lambda loss: loss
    if not probe:
        scale(loss_source + mu * loss_target).backward()
        return None
    grad_source = torch.autograd.grad(scale(loss_source), params, retain_graph=True, allow_unused=True)
    grad_target = torch.autograd.grad(scale(loss_target), params, allow_unused=True)
    for p, a, b in zip(params, grad_source, grad_target):
        a = torch.zeros_like(p) if a is None else a
        p.grad = a if b is None else a + mu * b
    factor = scaler.get_scale() if scaler is not None else 1.0  # 1.0 for a scaler that does nothing
    variances = _flat_variance(grad_source, params, factor), _flat_variance(grad_target, params, factor)
    return variances if all(map(math.isfinite, variances)) else None


# -- the loop -------------------------------------------------------------------------------------------------


def _to_input(images: Tensor, device, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    return (images.to(device).float() / 255).contiguous(memory_format=memory_format)


def _steps_per_epoch(config: AdaMatchConfig, data: Domains) -> int:
    return max(1, len(data.source_train) // config.batch_size)


def _probed(config: AdaMatchConfig, step: int) -> bool:
    """Whether the epoch's step ``step`` (from 0) takes the gradient variance."""
    return bool(config.grad_every) and step % config.grad_every == 0


def _epoch_batches(config: AdaMatchConfig, data: Domains, epoch: int):
    """The epoch's ``(source images, labels, target images, labels)`` from generators keyed by ``(seed, epoch)``.
    The target labels are only ever used to monitor the pseudo-labels (``pseudo_acc``)."""
    steps = _steps_per_epoch(config, data)
    source_order = torch.randperm(len(data.source_train), generator=keyed_generator(config.seed, epoch, 0))
    # a source smaller than a batch
    source_order = source_order.repeat(-(-steps * config.batch_size // len(source_order)))
    n_t = config.uratio * config.batch_size
    target_generator = keyed_generator(config.seed, epoch, 1)
    target_order = torch.cat(
        [
            torch.randperm(len(data.target_train), generator=target_generator)
            for _ in range(-(-steps * n_t // len(data.target_train)))
        ]
    )
    for step in range(steps):
        s = source_order[step * config.batch_size : (step + 1) * config.batch_size]
        t = target_order[step * n_t : (step + 1) * n_t]
        yield (
            data.source_train.images[s],
            data.source_train.labels[s],
            data.target_train.images[t],
            data.target_train.labels[t],
        )


def adamatch_step(model, xs: Tensor, labels: Tensor, xt: Tensor, progress: float, augmentation: torch.Generator,
                  optimizer, scheduler, scaler, config: AdaMatchConfig, device, probe: bool):
    """One training step (the module docstring's 1 to 5) on source images ``xs`` with their ``labels`` (on
    ``device``) and target images ``xt``, at ``progress = t / T``: both domains' weak and strong views drawn
    from ``augmentation``, the joint and the source-only passes under a resolved ``config``'s autocast, the
    update (the loss scaled by ``scaler``; with the gradient-variance probe when ``probe``) and the scheduler's
    step. Returns :func:`adamatch_objective`'s terms, the loss and the probe's two variances (``None`` without
    it)."""
    n_s, n_t = len(xs), len(xt)
    supervised = supervised_norm(config.norm)
    weak_s, strong_s = augment.weak(xs, augmentation), augment.strong(xs, augmentation)
    weak_t, strong_t = augment.weak(xt, augmentation), augment.strong(xt, augmentation)
    source_ids = _domain_ids(2 * n_s, SOURCE, device) if supervised else None
    joint_ids = torch.cat([source_ids, _domain_ids(2 * n_t, TARGET, device)]) if supervised else None
    layout = speed.memory_format(config)
    with speed.autocast(config, device):
        with clustered(joint_ids):
            joint = model(_to_input(torch.cat([weak_s, strong_s, weak_t, strong_t]), device, layout)).float()
        with cbnorm.preserve_running_stats(model), clustered(source_ids):
            source_only = model(_to_input(torch.cat([weak_s, strong_s]), device, layout)).float()
    out = adamatch_objective(joint, source_only, labels, progress, config.tau)
    loss = out["loss_source"] + out["mu"] * out["loss_target"]
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    measured = backward(out["loss_source"], out["loss_target"], out["mu"], params, probe, scaler)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return out, loss, measured


def _train_epoch(train_step, model, data: Domains, epoch: int, optimizer, config: AdaMatchConfig, device,
                 bar) -> dict:
    model.train()
    steps = _steps_per_epoch(config, data)
    total = steps * config.epochs
    augmentation = keyed_generator(config.seed, epoch, 2)
    sums = {k: 0.0 for k in ("loss", "loss_source", "loss_target", "mask", "threshold", "train_source_acc")}
    pseudo_right = pseudo_kept = 0
    variances = {"source": [], "target": []}
    mu = 0.0
    for step, (xs, ys, xt, yt) in enumerate(_epoch_batches(config, data, epoch)):
        labels = ys.to(device)
        out, loss, measured = train_step(xs, labels, xt, ((epoch - 1) * steps + step) / total, augmentation,
                                         _probed(config, step))
        mu = out["mu"]
        if measured is not None:
            variances["source"].append(measured[0])
            variances["target"].append(measured[1])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"epoch {epoch}, step {step + 1}: the AdaMatch loss became {loss.item()} "
                f"(lr {optimizer.param_groups[0]['lr']:.3g})"
            )
        kept = out["mask"].bool().cpu()
        pseudo_kept += int(kept.sum())
        pseudo_right += int(((out["pseudo"].cpu() == yt) & kept).sum())
        sums["loss"] += loss.item()
        sums["loss_source"] += out["loss_source"].item()
        sums["loss_target"] += out["loss_target"].item()
        sums["mask"] += float(kept.float().mean())
        sums["threshold"] += out["threshold"]
        sums["train_source_acc"] += float((out["source_weak"].argmax(1) == labels).float().mean())
        bar.update(1)
        bar.set_postfix_str(f"loss {loss.item():.3f} mask {float(kept.float().mean()):.2f}")
    row = {k: v / steps for k, v in sums.items()}
    row["mu"] = mu
    row["pseudo_acc"] = pseudo_right / pseudo_kept if pseudo_kept else math.nan
    for domain, values in variances.items():
        row[f"grad_var_{domain}_max"] = max(values) if values else math.nan
        row[f"grad_var_{domain}_mean"] = sum(values) / len(values) if values else math.nan
    return row


@contextlib.contextmanager
def inference_rule(model: nn.Module, unknown: Optional[str] = None, posterior: Optional[str] = None):
    """Within the block, every SCB-Norm layer of ``model`` uses ``unknown`` and ``posterior`` (when given)."""
    layers = [m for m in model.modules() if isinstance(m, SCBNorm)]
    saved = [(m.unknown, m.posterior) for m in layers]
    for m in layers:
        m.unknown, m.posterior = unknown or m.unknown, posterior or m.posterior
    try:
        yield
    finally:
        for m, (u, p) in zip(layers, saved):
            m.unknown, m.posterior = u, p


def rules(norm: str) -> list[dict]:
    """The inference rules of the layer ``norm``: the paper's (the source id) first; the domain id first
    for the domain-specific BatchNorm control (``dsbn``), which has no rule for an unknown domain.

    ``ids`` is ``"source"`` (every test image gets the source id), ``"domain"`` (its own domain's
    id) or ``None`` (no id: the layer's unknown-cluster rule, ``unknown``/``posterior`` for SCB-Norm).
    """
    if norm == "dsbn":  # the control normalises each domain with its own BatchNorm, as Chang et al. infer
        return [{"name": "domain id", "ids": "domain"}, {"name": "source id", "ids": "source"}]
    if norm == "scb":
        unknown = [
            {"name": f"unknown: {u}, {p}", "ids": None, "unknown": u, "posterior": p}
            for u in UNKNOWN_RULES
            for p in POSTERIOR_SCOPES
        ]
    elif supervised_norm(norm):
        unknown = [{"name": "unknown: uniform assignment", "ids": None}]
    else:
        return [{"name": "—", "ids": None}]
    return [{"name": "source id (paper)", "ids": "source"}, {"name": "domain id", "ids": "domain"}] + unknown


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, domain: int, rule: dict, batch_size: int, device,
             config: AdaMatchConfig) -> dict:
    """Cross-entropy, accuracy and macro precision/recall/F1 of ``model`` (eval mode) on one domain's test split,
    under a resolved ``config``'s autocast and memory format."""
    model.eval()
    confusion, loss_sum = 0, 0.0
    ids_domain = {"source": SOURCE, "domain": domain, None: None}[rule["ids"]]
    with inference_rule(model, rule.get("unknown"), rule.get("posterior")):
        for images, labels in zip(split.images.split(batch_size), split.labels.split(batch_size)):
            ids = None if ids_domain is None else _domain_ids(len(images), ids_domain, device)
            with speed.autocast(config, device), clustered(ids):
                logits = model(_to_input(images, device, speed.memory_format(config))).float()
            loss_sum += nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").item()
            confusion = confusion + confusion_matrix(logits.argmax(1).cpu(), labels, logits.shape[1])
    scores = macro_scores(confusion)
    return {
        "loss": loss_sum / len(split),
        "acc": scores["accuracy"],
        **{k: scores[k] for k in ("precision", "recall", "f1")},
    }


def _evaluate_both(model, data: Domains, rule: dict, config: AdaMatchConfig, device) -> dict:
    row = {}
    for name, split, domain in (("source", data.source_test, SOURCE), ("target", data.target_test, TARGET)):
        for key, value in evaluate(model, split, domain, rule, config.eval_batch_size, device, config).items():
            row[f"{name}_{key}"] = value
    return row


TABLE = [
    ("epoch", "epoch", 5, "{:d}"),
    ("loss", "loss", 7, "{:.4f}"),
    ("mask", "mask", 6, "{:.1%}"),
    ("mu", "mu", 4, "{:.2f}"),
    ("source_acc", "src acc", 7, "{:.2%}"),
    ("target_acc", "tgt acc", 7, "{:.2%}"),
    ("target_f1", "tgt F1", 7, "{:.2%}"),
    ("grad_var_source_mean", "gvar src", 8, "{:.2e}"),
    ("grad_var_target_mean", "gvar tgt", 8, "{:.2e}"),
    ("lr", "lr", 8, "{:.2e}"),
    ("seconds", "time", 7, "{:.1f}s"),
]
COLUMNS = [
    "epoch",
    "loss",
    "loss_source",
    "loss_target",
    "mask",
    "threshold",
    "pseudo_acc",
    "mu",
    "train_source_acc",
    *[f"{d}_{m}" for d in ("source", "target") for m in ("loss", "acc", "precision", "recall", "f1")],
    *[f"grad_var_{d}_{s}" for d in ("source", "target") for s in ("max", "mean")],
    "lr",
    "seconds",
]


def _scheduler(config: AdaMatchConfig, optimizer, total_steps: int):
    """Per step: ``lr * (floor + (1 - floor) * (1 + cos(pi t / T)) / 2)``.

    Keras' ``CosineDecay`` with ``alpha=floor``."""
    floor = config.lr_floor
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
    )


def load_domains(config: AdaMatchConfig, source: Optional[Dataset] = None, target: Optional[Dataset] = None) -> Domains:
    source = source if source is not None else load_dataset(config.source, config.data_dir)
    target = target if target is not None else load_dataset(config.target, config.data_dir)
    return domains(config, source, target)


def _setup(config: AdaMatchConfig, source: Optional[Dataset], target: Optional[Dataset],
           device) -> tuple[Domains, dict, Callable]:
    """A run with a resolved ``config`` on ``device``: its domains (the training images on ``device``, where the
    batches and their augmentation are made); what its checkpoint holds (``model``, ``optimizer``,
    ``scheduler`` and the float16 autocast's loss ``scaler``); ``step(xs, labels, xt, progress, augmentation,
    probe)``, :func:`adamatch_step` with the model compiled under ``compile``."""
    data = load_domains(config, source, target)
    data = dataclasses.replace(data, source_train=images_on(data.source_train, device),
                               target_train=images_on(data.target_train, device))
    model = speed.prepare_model(build_model(config, data.num_classes).to(device), config)
    optimizer = torch.optim.Adam(model.parameters(), config.lr, weight_decay=config.weight_decay)
    scheduler = _scheduler(config, optimizer, _steps_per_epoch(config, data) * config.epochs)
    scaler = speed.grad_scaler(config, device)
    trained = speed.compiled(model, config)

    def step(xs, labels, xt, progress, augmentation, probe):
        with speed.retained_graphs(config):  # the probe takes two gradients of one graph
            return adamatch_step(trained, xs, labels, xt, progress, augmentation, optimizer, scheduler, scaler,
                                 config, device, probe)

    return data, dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler), step


def time_adamatch_epochs(config: AdaMatchConfig, source: Dataset, target: Dataset, device: torch.device,
                         norms: Sequence[str], steps: int = 3, warmup: int = 2) -> dict:
    """Seconds per epoch of a run like ``config`` with each initial layer in ``norms`` on ``device``, by
    :func:`~cbnorm.experiments.planner.time_layers`. An epoch is its steps (:func:`adamatch_step` on the first
    batch of both domains at ``config.batch_size`` source images, ``steps`` timed after ``warmup``; those that
    probe the gradient variance, every ``grad_every``-th, timed apart), the evaluation of both test sets (one
    batch timed, times their batches), and its share of the last epoch's evaluations under every inference rule
    of the layer (``inference.json``, timed as the paper's rule). Not included: the checkpoint of each epoch."""
    config = speed.resolve_speed(config, device)

    def epoch(norm: str) -> list[EpochPart]:
        layer = dataclasses.replace(config, norm=norm)
        data, stateful, step = _setup(layer, source, target, device)
        model = stateful["model"]
        xs, ys, xt, _ = next(_epoch_batches(layer, data, 1))
        labels, augmentation = ys.to(device), keyed_generator(config.seed, 1, 2)
        per_epoch = _steps_per_epoch(layer, data)
        probed = sum(_probed(layer, step) for step in range(per_epoch))
        size = config.eval_batch_size
        test = Split(data.source_test.images[:size], data.source_test.labels[:size])
        batches = sum(math.ceil(len(split) / size) for split in (data.source_test, data.target_test))
        paper_rule = rules(norm)[0]

        def train_step(probe: bool):
            model.train()
            step(xs, labels, xt, 0.5, augmentation, probe)

        return [EpochPart(lambda: train_step(False), per_epoch - probed, steps, warmup),
                EpochPart(lambda: train_step(True), probed, steps, warmup),
                EpochPart(lambda: evaluate(model, test, SOURCE, paper_rule, size, device, layer),
                          batches * (1 + len(rules(norm)) / config.epochs), 1, 1)]

    return time_layers(norms, epoch, device)


def train_adamatch(
    config: AdaMatchConfig, source: Optional[Dataset] = None, target: Optional[Dataset] = None
) -> list[dict]:
    """Run (or resume, with ``config.resume``) one AdaMatch training; returns the history.

    ``source``/``target`` skip loading the data sets. After the last epoch the run folder also holds
    ``inference.json``: the final model under every inference rule of its layer (:func:`rules`).
    """
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    config = speed.resolve_speed(config, device)  # config.json records what the device uses
    out = Path(config.out)
    folder = RunFolder(
        out,
        dataclasses.asdict(config),
        resume=config.resume,
        overwrite=config.overwrite,
        run_control=RUN_CONTROL,
        columns=COLUMNS,
        table=TABLE,
    )
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data, stateful, train_step = _setup(config, source, target, device)
    model, optimizer = stateful["model"], stateful["optimizer"]
    steps = _steps_per_epoch(config, data)
    history = folder.restore(device, **stateful)
    norm = "none (plain WRN)" if config.norm == "none" else f"{config.norm} (K={config.num_clusters}) as initial layer"
    folder.start(
        f"{config.source} -> {config.target} ({len(data.source_train)} + {len(data.target_train)} train, "
        f"{len(data.source_test)} / {len(data.target_test)} test, {config.image_size}x{config.image_size}x3) | "
        f"AdaMatch, WRN-{config.depth}-{config.width} + {norm} | "
        f"Adam lr {config.lr:g} cosine to x{config.lr_floor:g} | "
        f"{config.epochs} epochs x {steps} steps of {config.batch_size} + {config.uratio * config.batch_size} | "
        f"seed {config.seed} | {device} ({speed.describe(config)}) | {out}"
    )
    paper_rule = rules(config.norm)[0]
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(total=steps, desc=f"epoch {epoch}", leave=False, disable=None if config.progress else True) as bar:
            row = {"epoch": epoch, **_train_epoch(train_step, model, data, epoch, optimizer, config, device, bar)}
        row.update(_evaluate_both(model, data, paper_rule, config, device))
        row.update(lr=lr, seconds=time.perf_counter() - start)
        folder.save(row, device, **stateful)
    if not (out / "inference.json").is_file():
        final = [
            {"rule": rule["name"], **_evaluate_both(model, data, rule, config, device)} for rule in rules(config.norm)
        ]
        content = json.dumps({"epoch": config.epochs, "rules": final}, indent=1) + "\n"
        atomic_write(out / "inference.json", lambda f: f.write(content.encode()))
    return folder.history


# -- the reproduction --------------------------------------------------------------------------------------------


def AdaMatchScale(name: str, source_train: int, target_train: int, source_test: int, target_test: int, epochs: int,
                  batch_size: int, seeds: Sequence[int] = (0,), depth: int = 28, lr: float = 0.03,
                  bn_momentum: float = 0.01, grad_every: int = 1) -> Scale:
    """An AdaMatch :class:`~cbnorm.experiments.driver.Scale`: the source subsets are its ``train_size`` and
    ``test_size`` (0: all); the target's, the source batch and the settings that a short run must change (WRN
    depth, learning rate, BN momentum, and the gradient-variance probe of Figure 12 on every ``grad_every``
    steps, which costs about 1.6 steps) are its extras."""
    return Scale(name, source_train, source_test, epochs, tuple(seeds), extra=dict(
        target_train=target_train, target_test=target_test, batch_size=batch_size, depth=depth, lr=lr,
        bn_momentum=bn_momentum, grad_every=grad_every))


def protocol(scale: Scale) -> str:
    """The training settings of an AdaMatch scale, for its table."""
    return (
        f"WRN-{scale.depth}-2, Adam lr {scale.lr:g} with cosine decay to 25%, BatchNorm momentum "
        f"{scale.bn_momentum:g}, tau 0.9, gradient variance probed every {scale.grad_every} step(s)"
    )


# In the order they run: the baseline, the paper's best layer and its control first.
ADAMATCH_NORMS = (
    ("AdaMatch", "none"),
    ("AdaMatch+SCB-Norm", "scb"),
    ("AdaMatch+DSBN (control)", "dsbn"),
    ("AdaMatch+SCB-Norm-base", "scb_base"),
    ("AdaMatch+UCB-Norm", "ucb"),
)

# `paper` is the Keras example's schedule that the paper's baseline numbers come from (WRN-28-2,
# Adam lr 0.03, Keras' BN decay 0.99, 10 epochs, batch 64 + 192). `small` fits 2 CPU cores: a
# WRN-10-2 step of 16 + 48 images with the gradient-variance probe takes about 1.2 s at --threads 1,
# a WRN-28-2 one 5 s. Its 192 steps need their own settings. At lr 0.03 the plain WRN-28-2 never
# left chance in 48 steps (test loss 1e8), and with BN momentum 0.01 the running statistics are
# still 15% their initial values after 192 steps (0.99^192), so eval-mode accuracy swung by 30
# points epoch to epoch; with lr 1e-3, momentum 0.1 and WRN-10-2 the plain network reaches 87% on
# MNIST in 4 epochs. The probe runs on every 4th step (results before issue 14: every step), so that
# 4 seeds of the five variants fit.
ADAMATCH_SCALES = {
    "smoke": AdaMatchScale("smoke", 8, 24, 16, 16, 2, 4, depth=10, lr=1e-3, bn_momentum=0.1),
    "small": AdaMatchScale("small", 768, 1437, 500, 360, 4, 16, depth=10, lr=1e-3, bn_momentum=0.1, grad_every=4),
    "paper": AdaMatchScale("paper", 0, 0, 0, 0, 10, 64),
}

# Table VI (MNIST -> SVHN): accuracy, macro precision, recall, F1 (%), source (MNIST) then target (SVHN).
PAPER_TABLE6 = {
    "source": {
        "none": (97.36, 87.33, 79.39, 78.09),
        "scb_base": (99.26, 99.20, 99.32, 99.26),
        "scb": (98.92, 98.93, 98.92, 98.92),
        "ucb": (98.9, 98.5, 98.90, 98.95),
    },
    "target": {
        "none": (25.08, 31.64, 20.46, 24.73),
        "scb_base": (43.10, 53.83, 43.10, 47.46),
        "scb": (54.70, 59.74, 54.70, 54.55),
        "ucb": (33.4, 43.83, 40.28, 42.87),
    },
}
_SCORES = ("acc", "precision", "recall", "f1")


def adamatch_target(data_dir: Optional[str] = None) -> str:
    """SVHN, the paper's target, when the data root has it; scikit-learn's digits otherwise."""
    return "svhn" if available("svhn", data_dir) else "digits"


def _cell(values: Sequence[float]) -> str:
    """Mean ± half-width of the 95% Student-t interval over seeds, in %."""
    return interval([100 * v for v in values]).cell()


def _adamatch_table(source: str, target: str, scale: Scale, results: dict) -> str:
    import platform

    size = lambda n: "all" if n == 0 else f"{n:,}"  # noqa: E731
    lines = [
        f"# Table VI: AdaMatch with the layer under test as its initial layer — {source} -> {target}, scale "
        f"`{scale.name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Scale: {size(scale.train_size)} {source} + {size(scale.target_train)} {target} training images (the "
        f"target's unlabelled), {size(scale.test_size)} / {size(scale.target_test)} test images (fixed random "
        f"subsets), {scale.epochs} epochs, batch {scale.batch_size} source + {3 * scale.batch_size} target, seeds "
        f"{', '.join(map(str, results['seeds']))}. Protocol: {protocol(scale)}, "
        f"32x32x3 images in [0, 1]; SCB clusters: the domains (K = 2), UCB-Norm K = 2.",
        f"Torch {torch.__version__}, {platform.machine()}, {results['device']}; "
        f"{results['train_seconds'] / 60:.1f} min of training and evaluation, summed over the runs.",
        "",
        "Ours: the last epoch, SCB layers given the source cluster id at inference (the paper's rule), the "
        "domain-specific BatchNorm control (DSBN, Chang et al. 2019: one BatchNorm, statistics and affine, per "
        "domain, as the initial layer) its own domain's; mean ± half-width of the 95% Student-t interval over "
        "seeds, %. The paper's numbers are for its pair, MNIST -> SVHN, 10 epochs on the full data sets.",
    ]
    for domain, name in (("source", source), ("target", target)):
        paper_name = "MNIST" if domain == "source" else "SVHN"
        lines += [
            "",
            f"{name} ({domain} domain)",
            "",
            f"| model | accuracy | precision | recall | F1 "
            f"| paper ({paper_name}): accuracy | precision | recall | F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in results["rows"]:
            paper = PAPER_TABLE6[domain].get(row["norm"])
            paper_cells = [f"{v:.2f}" for v in paper] if paper else ["—"] * 4
            ours = (
                [_cell(row["final"][f"{domain}_{k}"]) for k in _SCORES]
                if row["status"] == "ok"
                else [row["status"], "", "", ""]
            )
            lines.append(f"| {row['label']} | " + " | ".join(ours + paper_cells) + " |")
    base = results["rows"][0]["label"] if results["rows"] else "the baseline"
    lines += [
        "",
        f"Target accuracy against {base} under the same seeds: paired difference (points), its 95% "
        "Student-t interval, and the verdict the code computes (`better`/`worse` when the interval "
        "excludes 0).",
        "",
        "| model | target accuracy | difference | 95% interval | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        if row["status"] != "ok":
            continue
        d = row.get("target_difference")
        cells = (
            ["(baseline)", "", ""]
            if d is None
            else [
                f"{d['difference']['mean']:+.2f}",
                f"[{d['difference']['low']:+.2f}, {d['difference']['high']:+.2f}]" if d["difference"]["n"] > 1 else "—",
                d["verdict"],
            ]
        )
        lines.append(f"| {row['label']} | {_cell(row['final']['target_acc'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The paper's AdaMatch row on MNIST gives a macro recall of 79.39 beside an accuracy of 97.36; on "
        "MNIST's nearly balanced test set a macro recall cannot fall that far below the accuracy, so that "
        "row's precision, recall and F1 are not macro averages of the same predictions.",
    ]
    ruled = [row for row in results["rows"] if row["status"] == "ok" and len(row["rules"]) > 1]
    if ruled:
        lines += [
            "",
            "Inference rules of the SCB layers (last epoch; accuracy and macro F1, %, mean ± half-width of "
            "the 95% interval over seeds). "
            '"source id" is the paper\'s; "domain id" gives each image its own domain; "unknown" gives '
            "none (SPEC.md's rules for unknown clusters).",
            "",
            "| model | rule | source acc | source F1 | target acc | target F1 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in ruled:
            for rule, scores in row["rules"].items():
                cells = [_cell(scores[k]) for k in ("source_acc", "source_f1", "target_acc", "target_f1")]
                lines.append(f"| {row['label']} | {rule} | " + " | ".join(cells) + " |")
            target = {rule: interval(scores["target_acc"]).mean for rule, scores in row["rules"].items()}
            top = max(target.values())
            best = [rule for rule, value in target.items() if value == top]
            verdict = "all rules tie" if len(best) == len(target) else " = ".join(best)
            lines += [f"| {row['label']} | **best on the target: {verdict}** | | | | |"]
    return "\n".join(lines + plan_lines(results["plan"])) + "\n"


def adamatch_figures(root: Path, histories: dict, source: str, target: str, scale: str) -> None:
    """``curves.png`` (accuracies, training loss and mask rate) and ``figure12.png`` (gradient variance) in ``root``,
    from each label's histories (one a seed)."""
    from .plots import curves_figure, gradient_variance_figure

    done = {label: hs for label, hs in histories.items() if hs}
    if not done:
        return
    setting = f"AdaMatch {source} → {target}, {scale} scale"
    curves_figure(
        {"": done}, root / "curves.png", ("source_acc", "target_acc", "loss", "mask"), title=f"{setting}: per epoch"
    )
    gradient_variance_figure(done, root / "figure12.png", title=f"Figure 12: gradient variance, {setting}")


@dataclass(kw_only=True)
class AdaMatch(LayerSeedSpec):
    """The AdaMatch experiment for :func:`~cbnorm.experiments.driver.drive`: a run per (layer, seed), trained by
    :func:`train_adamatch`; its rows add each run's ``inference.json`` (the SCB layers' inference rules).
    ``timer`` times the layers for a time budget (default :func:`time_adamatch_epochs`)."""

    source: str
    target: str
    norms: Sequence[tuple[str, str]] = ADAMATCH_NORMS
    headline: tuple[str, str, str] = ("target_acc", "target acc", "{:6.2%}")
    timer: Optional[Callable] = None

    @property
    def folder(self) -> str:
        return f"adamatch-{self.source}-{self.target}"

    @property
    def trainer(self):
        return train_adamatch

    def load(self) -> tuple:
        return self.given or (load_dataset(self.source, self.data_dir), load_dataset(self.target, self.data_dir))

    def configure(self, key: tuple, scale: Scale, root: Path) -> AdaMatchConfig:
        norm, seed = key
        return AdaMatchConfig(
            source=self.source, target=self.target, source_train_size=scale.train_size,
            target_train_size=scale.target_train, source_test_size=scale.test_size,
            target_test_size=scale.target_test, norm=norm, epochs=scale.epochs, batch_size=scale.batch_size,
            depth=scale.depth, lr=scale.lr, bn_momentum=scale.bn_momentum, grad_every=scale.grad_every, seed=seed,
            out=str(self.run_dir(root, norm, seed)), **self.run_settings(),
        )

    def epoch_seconds(self, scale: Scale, data: tuple, device, norms: Sequence[str]) -> dict:
        config = self.configure((norms[0], 0), scale, Path())  # the run's settings; its folder is not used
        return (self.timer or time_adamatch_epochs)(config, *data, device, norms)

    def results(self, done: Finished):
        scale, seeds, root, norms, runs = done.scale, done.seeds, done.root, self.norms, done.histories
        histories = self.by_label(done)
        target_acc = {norm: {s: 100 * runs[norm, s][-1]["target_acc"] for s in seeds if runs.get((norm, s))}
                      for _, norm in norms}
        base_norm = norms[0][1]
        rows = []
        for label, norm in norms:
            finals = [h[-1] for h in histories[label] if h]
            final = {f"{d}_{k}": [row[f"{d}_{k}"] for row in finals] for d in ("source", "target") for k in _SCORES}
            per_rule = {}
            for seed in seeds:
                if (norm, seed) not in runs:
                    continue
                inference = json.loads((self.run_dir(root, norm, seed) / "inference.json").read_text())
                for rule in inference["rules"]:
                    scores = per_rule.setdefault(rule["rule"], {})
                    for key in ("source_acc", "source_f1", "target_acc", "target_f1"):
                        scores.setdefault(key, []).append(rule[key])
            common = sorted(set(target_acc[norm]) & set(target_acc[base_norm]))
            versus = None if norm == base_norm else comparison([target_acc[norm][s] for s in common],
                                                               [target_acc[base_norm][s] for s in common])
            rows.append({"label": label, "norm": norm, "seeds": [s for s in seeds if (norm, s) in runs],
                         "final": final, "rules": per_rule, "target_difference": versus,
                         "status": self.status(done, norm)})
        results = done.summary(experiment="adamatch", source=self.source, target=self.target, rows=rows)
        results["scale"].update(source_train=scale.train_size, source_test=scale.test_size)  # the names of old
        figures = lambda: adamatch_figures(root, histories, self.source, self.target, scale.name)  # noqa: E731
        return _adamatch_table(self.source, self.target, scale, results), results, figures


def reproduce_adamatch(source: str, target: str, scale: Union[str, Scale], *,
                       norms: Sequence[tuple[str, str]] = ADAMATCH_NORMS,
                       data: Optional[tuple[Dataset, Dataset]] = None, **options) -> Path:
    """Train AdaMatch, its cluster-based variants and the DSBN control at ``scale``.

    Writes ``results/adamatch-<source>-<target>/<scale>/``.

    That folder gets ``runs/<norm>-seed<seed>/`` (each a resumable run with ``inference.json``),
    ``table.md`` (Table VI beside the paper's, and the SCB inference rules), ``summary.json``,
    ``figure12.png`` (gradient variance) and ``curves.png``. Running the command again resumes
    unfinished runs and reuses finished ones. ``data``: the source and target data sets, not loaded
    again; ``options`` are those of :func:`~cbnorm.experiments.reproduce.reproduce` (``out``, ``seeds``,
    ``device``, ``parallel``, ``time_budget``, ``epochs``, ``speed_settings``, ...);
    ``timer``: what times the layers for ``time_budget`` (default :func:`time_adamatch_epochs`, which
    says what an epoch includes).
    """
    return drive_experiment(AdaMatch, scale, ADAMATCH_SCALES, name="adamatch", source=source, target=target,
                            norms=tuple(norms), data=data, **options)
