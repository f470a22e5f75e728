"""DCGAN with BatchNorm, Mixture Normalization or UCB-Norm in the generator, scored by FID (paper IV-D).

    cbnorm gan --norm ucb --epochs 200 --out runs/dcgan-ucb                    # one run, the paper's protocol
    cbnorm gan --out runs/dcgan-ucb --resume                                   # after a crash
    cbnorm reproduce dcgan --scale small                                       # Figures 10 and 11: BN, MN, UCB

One run trains the generator and the discriminator of :mod:`~cbnorm.experiments.models.dcgan` with
Adam (lr 2e-4, betas (0, 0.9), both networks, the paper's values), one discriminator step per
generator step and the non-saturating loss of Goodfellow et al. (the paper names no loss;
DCGAN's is this one): ``L_D = softplus(-D(x)) + softplus(D(G(z)))``,
``L_G = softplus(-D(G(z)))``, ``z ~ N(0, I)``. Real images are scaled to ``[-1, 1]``, without
augmentation. The layer under test (``--norm mn`` or ``ucb``, ``K = 3``, with BatchNorm's
per-channel ``gamma``/``beta``: ``affine=True``) replaces the generator's first two BatchNorms.

Every ``--fid-every`` epochs and at the last epoch, the generator in eval mode (running
statistics, as at inference) draws ``--fid-samples`` images from noise fixed by ``(seed, epoch)``;
their FID against ``--fid-reference`` training images (a fixed random subset; its statistics are
cached in ``fid/`` of the cache folder, ``$CBNORM_CACHE_DIR``) goes into the metrics, and an 8 x 8 grid of samples
from one fixed noise batch into ``samples/epoch-NNNN.png``. FID is biased upwards at small sample
sizes: compare numbers only at equal sizes (:mod:`cbnorm.experiments.fid` has the details).

Each epoch rewrites ``metrics.csv``/``metrics.json`` (discriminator and generator losses, mean
``sigmoid D`` on real and generated images, FID, seconds of training and of FID) and saves the
checkpoint atomically, so a crash loses at most one epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from cbnorm import _cache

from . import speed
from .config import RUN_CONTROL, GANConfig
from .data import Dataset, Loader, Split, atomic_write, load_dataset
from .device_data import DeviceLoader
from .driver import Finished, LayerSeedSpec, Scale, drive_experiment
from .fid import FEATURES, FeatureStats, feature_extractor, frechet_distance, psd_sqrt, resolve_features, to_uint8
from .metrics import mean_std
from .models.dcgan import Discriminator, Generator
from .planner import EpochPart, plan_lines, time_layers
from .runs import RunFolder, keyed_generator, resolve_device
from .stats import Interval, comparison, interval
from .train import _subset, norm_kwargs

__all__ = ["DCGAN", "GANConfig", "GAN_SCALES", "GANScale", "gan_step", "reproduce_dcgan", "time_gan_epochs",
           "train_gan"]


def build_gan(config: GANConfig, channels: int, image_size: int) -> tuple[Generator, Discriminator]:
    """The generator (the layer under test in its first two norm positions) and the discriminator."""
    if config.norm == "batchnorm":
        norms, kwargs = ("batchnorm",) * 3, [{}] * 3
    else:
        extra = {"affine": True, **config.norm_kwargs}
        tested = norm_kwargs(config.norm, config.num_components, extra)
        norms, kwargs = (config.norm, config.norm, "batchnorm"), [tested, tested, {}]
    generator = Generator(config.latent_dim, channels, config.width, image_size, norms, kwargs)
    return generator, Discriminator(channels, config.width, image_size)


# -- noise, samples, FID ----------------------------------------------------------------------------------


@torch.no_grad()
def generate(generator: Generator, count: int, seed: int, tag: int, batch_size: int, device: torch.device):
    """``count`` uint8 images of ``generator`` in eval mode, from noise fixed by ``(seed, tag)``, in batches."""
    was_training = generator.training
    generator.eval()
    noise = torch.randn(count, generator.latent_dim, generator=keyed_generator(seed, tag))
    try:
        for z in noise.split(batch_size):
            yield to_uint8(generator(z.to(device))).cpu()
    finally:
        generator.train(was_training)


def feature_stats(extractor: nn.Module, batches, device: torch.device) -> FeatureStats:
    stats = FeatureStats(extractor.dim)
    extractor.to(device)
    for images in batches:
        stats.update(extractor(images.to(device)))
    return stats


def reference_stats(
    extractor: nn.Module,
    features: str,
    split: Split,
    size: int,
    name: str,
    cache: Path,
    batch_size: int,
    device: torch.device,
    with_sqrt: bool = True,
) -> tuple[FeatureStats, Optional[Tensor]]:
    """Feature statistics of a fixed random subset (seed 0) of ``size`` images of ``split`` (0: all) and,
    with ``with_sqrt``, the square root of their covariance (:func:`~cbnorm.experiments.fid.psd_sqrt`);
    cached in ``cache/<name>-<size>-<features>-<digest>.pt``, the digest that of the images themselves, so that
    two data sets of one name never share statistics."""
    index = _subset(split, size)
    images = split.images[index]
    digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
    path = cache / f"{name}-{len(index)}-{features}-{digest}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    if (
        "stats" in state
        and int(state["stats"]["count"]) == len(index)
        and (state.get("sqrt") is not None or not with_sqrt)
    ):
        return FeatureStats.from_state_dict(state["stats"]), state.get("sqrt")
    stats = feature_stats(extractor, images.split(batch_size), device)
    sqrt = psd_sqrt(stats.mean_cov()[1]) if with_sqrt else None
    atomic_write(path, lambda f: torch.save({"stats": stats.state_dict(), "sqrt": sqrt}, f))
    return stats, sqrt


def save_grid(images: Tensor, path: Union[str, os.PathLike], columns: int = 8, pad: int = 2, scale: int = 2) -> Path:
    """uint8 images ``(N, C, H, W)`` as one PNG grid, ``columns`` wide, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.full((3, rows * (h + pad) + pad, columns * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, image in enumerate(images.expand(-1, 3, -1, -1) if c == 1 else images):
        r, k = divmod(i, columns)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = image
    array = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()
    path = Path(path)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))
    return path


# -- the loop ------------------------------------------------------------------------------------------------


def _setup(config: GANConfig, data: Dataset, device) -> tuple[DeviceLoader, dict, Callable[[Tensor], list]]:
    """A run with a resolved ``config`` on ``device``: its training batches (images in ``[-1, 1]``, in its
    memory format); what its checkpoint holds (``generator``, ``discriminator``, ``opt_g``, ``opt_d`` and the
    float16 autocast's loss ``scaler``); ``step(images)``, :func:`gan_step` with the networks compiled under
    ``compile``."""
    train_split = data.train.subset(_subset(data.train, config.train_size))
    generator, discriminator = (speed.prepare_model(m.to(device), config)
                                for m in build_gan(config, data.in_channels, data.train.images.shape[-1]))
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), config.lr, betas=betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), config.lr, betas=betas)
    half = torch.full((data.in_channels,), 0.5)
    loader = DeviceLoader(train_split, config.batch_size, half, half, train=True, seed=config.seed, device=device,
                          memory_format=speed.memory_format(config))
    scaler = speed.grad_scaler(config, device)
    stateful = dict(generator=generator, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d, scaler=scaler)
    networks = (speed.compiled(generator, config), speed.compiled(discriminator, config))
    return loader, stateful, lambda images: gan_step(*networks, images, opt_g, opt_d, scaler, config, device)


def _table(metric_key: str, metric_label: str) -> list[tuple]:
    return [
        ("epoch", "epoch", 5, "{:d}"),
        ("loss_d", "D loss", 7, "{:.4f}"),
        ("loss_g", "G loss", 7, "{:.4f}"),
        ("d_real", "D(real)", 7, "{:.3f}"),
        ("d_fake", "D(fake)", 7, "{:.3f}"),
        (metric_key, metric_label.split(" ")[0], 8, "{:.2f}"),
        ("seconds", "train", 7, "{:.1f}s"),
        ("fid_seconds", "FID time", 8, "{:.1f}s"),
    ]


def _columns(metric_key: str) -> list[str]:
    return ["epoch", "loss_d", "loss_g", "d_real", "d_fake", metric_key, "lr", "seconds", "fid_seconds"]


def fid_epochs(config: GANConfig) -> set[int]:
    return {e for e in range(1, config.epochs + 1) if e % config.fid_every == 0} | {config.epochs}


def _resolved(config: GANConfig) -> GANConfig:
    """``fid_features="auto"`` made concrete: the resumed run's choice, else what is installed."""
    if config.fid_features != "auto":
        return config
    saved = Path(config.out) / "config.json"
    if config.resume and (Path(config.out) / "checkpoint.pt").exists() and saved.is_file():
        return dataclasses.replace(config, fid_features=json.loads(saved.read_text())["fid_features"])
    return dataclasses.replace(config, fid_features=resolve_features("auto"))


def gan_step(generator, discriminator, images: Tensor, opt_g, opt_d, scaler, config: GANConfig,
             device) -> list[float]:
    """One discriminator step, then one generator step, on the real ``images`` (both networks in training mode),
    under a resolved ``config``'s autocast, both losses scaled by ``scaler`` (one scale, updated after both
    steps): ``[D loss, G loss, mean sigmoid D of the real images, of the generated ones]``."""
    softplus = nn.functional.softplus
    z = torch.randn(len(images), config.latent_dim, device=device)
    with speed.autocast(config, device):
        fake = generator(z)
        real_logits, fake_logits = discriminator(images).float(), discriminator(fake.detach()).float()
        loss_d = softplus(-real_logits).mean() + softplus(fake_logits).mean()
    opt_d.zero_grad(set_to_none=True)
    scaler.scale(loss_d).backward()
    scaler.step(opt_d)
    with speed.autocast(config, device):
        loss_g = softplus(-discriminator(fake).float()).mean()
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss_g).backward()
    scaler.step(opt_g)
    scaler.update()
    return [loss_d.item(), loss_g.item(), real_logits.sigmoid().mean().item(), fake_logits.sigmoid().mean().item()]


def _train_epoch(step, stateful: dict, loader: Loader, epoch: int, bar):
    stateful["generator"].train()
    stateful["discriminator"].train()
    sums = torch.zeros(4, dtype=torch.float64)
    steps = 0
    for images, _, _ in loader.epoch(epoch):
        values = step(images)
        loss_d, loss_g = values[:2]
        if not (math.isfinite(loss_d) and math.isfinite(loss_g)):
            raise FloatingPointError(f"epoch {epoch}: the GAN losses became non-finite (D {loss_d}, G {loss_g})")
        sums += torch.tensor(values, dtype=torch.float64)
        steps += 1
        bar.update(1)
        bar.set_postfix_str(f"D {loss_d:.3f} G {loss_g:.3f}")
    loss_d, loss_g, d_real, d_fake = (sums / steps).tolist()
    return {"loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake}


def train_gan(config: GANConfig, data: Optional[Dataset] = None) -> list[dict]:
    """Run (or resume, with ``config.resume``) one DCGAN training; returns the history.

    ``data`` skips loading the dataset. A folder holding a checkpoint is only continued with
    ``resume=True`` and the config it was started with (fields in :data:`RUN_CONTROL` may differ).
    """
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    config = speed.resolve_speed(_resolved(config), device)  # config.json records what the device uses
    metric = FEATURES[config.fid_features]
    out = Path(config.out)
    folder = RunFolder(
        out,
        dataclasses.asdict(config),
        resume=config.resume,
        overwrite=config.overwrite,
        run_control=RUN_CONTROL,
        columns=_columns(metric.key),
        table=_table(metric.key, metric.label),
    )

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    data = data if data is not None else load_dataset(config.dataset, config.data_dir)
    loader, stateful, step = _setup(config, data, device)
    generator = stateful["generator"]
    betas = (config.beta1, config.beta2)
    history = folder.restore(device, **stateful)
    norm = config.norm if config.norm == "batchnorm" else f"{config.norm} (K={config.num_components}) x2 + batchnorm"
    folder.start(
        f"{config.dataset} ({len(loader.labels)} train) | DCGAN, generator norms: {norm} | Adam lr {config.lr:g} "
        f"betas {betas} | {config.epochs} epochs x {len(loader)} batches of {config.batch_size} | "
        f"{metric.label} of {config.fid_samples} samples vs {config.fid_reference or len(data.train)} training images "
        f"every {config.fid_every} epochs | seed {config.seed} | {device} ({speed.describe(config)}) | {out}"
    )

    evaluated = fid_epochs(config)
    extractor, reference, reference_sqrt = None, None, None
    grid_noise_tag = 2**31 - 1  # the grid's noise: the same at every epoch
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        with tqdm(
            total=len(loader), desc=f"epoch {epoch}", leave=False, disable=None if config.progress else True
        ) as bar:
            row = {
                "epoch": epoch,
                **_train_epoch(step, stateful, loader, epoch, bar),
            }
        row.update(lr=config.lr, seconds=time.perf_counter() - start)
        if epoch in evaluated:
            start = time.perf_counter()
            if extractor is None:
                extractor = feature_extractor(config.fid_features).to(device)
                reference, reference_sqrt = reference_stats(
                    extractor,
                    config.fid_features,
                    data.train,
                    config.fid_reference,
                    f"{config.dataset}-train",
                    _cache.cache_dir("fid"),
                    config.eval_batch_size,
                    device,
                )
            samples = feature_stats(
                extractor,
                generate(generator, config.fid_samples, config.seed, epoch, config.eval_batch_size, device),
                device,
            )
            row[metric.key] = frechet_distance(*reference.mean_cov(), *samples.mean_cov(), cov1_sqrt=reference_sqrt)
            grid = torch.cat(list(generate(generator, 64, config.seed, grid_noise_tag, 64, device)))
            save_grid(grid, out / "samples" / f"epoch-{epoch:04d}.png")
            row["fid_seconds"] = time.perf_counter() - start
        folder.save(row, device, **stateful)
    return folder.history


# -- the reproduction ------------------------------------------------------------------------------------------


def time_gan_epochs(config: GANConfig, data: Dataset, device: torch.device, norms: Sequence[str], steps: int = 3,
                    warmup: int = 2) -> dict:
    """Seconds per epoch of a run like ``config`` (concrete ``fid_features``) with each generator layer in
    ``norms`` on ``device``, by :func:`~cbnorm.experiments.planner.time_layers`. An epoch is its training steps
    (:func:`gan_step` on a batch of real training images, ``steps`` timed after ``warmup``) and its share of the
    FID evaluations (every ``fid_every`` epochs and at the last: a batch of generated images through the
    feature extractor, times the batches of ``fid_samples`` images, and one Fréchet distance). Not included: the
    feature extractor's loading and the reference statistics (once, cached for every run and the table), the
    8 x 8 sample grid and the checkpoint of each epoch."""
    config = speed.resolve_speed(config, device)
    extractor = feature_extractor(config.fid_features).to(device)
    evaluations = len(fid_epochs(config)) / config.epochs
    batch = min(config.eval_batch_size, config.fid_samples)

    def epoch(norm: str) -> list[EpochPart]:
        loader, stateful, step = _setup(dataclasses.replace(config, norm=norm), data, device)
        images = next(loader.epoch(1))[0]
        generator = stateful["generator"]  # in training mode, as gan_step needs
        features = FeatureStats(extractor.dim)
        identity = torch.eye(extractor.dim, dtype=torch.float64)  # stands for the reference's square root

        def fid_batch():
            for fake in generate(generator, batch, config.seed, 1, batch, device):
                features.update(extractor(fake.to(device)))

        return [EpochPart(lambda: step(images),
                          len(loader), steps, warmup),
                EpochPart(fid_batch, evaluations * math.ceil(config.fid_samples / batch), steps, warmup),
                EpochPart(lambda: frechet_distance(*features.mean_cov(), *features.mean_cov(), cov1_sqrt=identity),
                          evaluations, 1, 0)]

    return time_layers(norms, epoch, device)


def GANScale(name: str, train_size: int, epochs: int, fid_every: int, fid_samples: int, fid_reference: int,
             seeds: Sequence[int] = (0,)) -> Scale:
    """A DCGAN :class:`~cbnorm.experiments.driver.Scale`: training images (0: all), epochs, the FID schedule
    (every ``fid_every`` epochs, ``fid_samples`` generated images against ``fid_reference`` training images,
    0: all) and the seeds."""
    return Scale(name, train_size, 0, epochs, tuple(seeds),
                 extra={"fid_every": fid_every, "fid_samples": fid_samples, "fid_reference": fid_reference})


GAN_NORMS = (("DCGAN-BN", "batchnorm"), ("DCGAN-MN", "mn"), ("DCGAN-UCB-Norm", "ucb"))

# `small` is sized from timings with --threads 1 on 2 shared CPU cores: a training step of 64 images takes
# 2.4 s (BN) to 2.8 s (MN), the Inception features 0.26 s an image; `paper` is IV-D's protocol with the
# FID sample sizes of common practice (the paper does not give its own).
GAN_SCALES = {
    "smoke": GANScale("smoke", 64, 2, 2, 10, 10),
    "small": GANScale("small", 2560, 2, 1, 250, 500),
    "paper": GANScale("paper", 0, 200, 10, 10000, 0),
}


def dcgan_figures(root: Path, histories: dict, metric, grids: dict, setting: str) -> None:
    """``figure10.png`` (the metric's curves) and ``figure11.png`` (the sample ``grids``' images) in ``root``."""
    from .plots import curves_figure, samples_figure

    panel = {label: [[r for r in h if metric.key in r] for h in hs] for label, hs in histories.items() if hs}
    if panel:
        curves_figure(
            {f"{metric.label}, lower is better": panel},
            root / "figure10.png",
            (metric.key,),
            title=f"Figure 10: {metric.label} per epoch, {setting}",
        )
    grids = {label: path for label, path in grids.items() if Path(path).is_file()}
    if grids:
        samples_figure(grids, root / "figure11.png", title=f"Figure 11: samples after the last epoch, {setting}")


@dataclass(kw_only=True)
class DCGAN(LayerSeedSpec):
    """The DCGAN experiment for :func:`~cbnorm.experiments.driver.drive`: a run per (layer, seed), trained by
    :func:`train_gan`; its table holds the FID of real test images as the floor of every FID. ``timer`` times
    the layers for a time budget (default :func:`time_gan_epochs`)."""

    dataset: str
    fid_features: str  # resolved: inception or random-conv
    norms: Sequence[tuple[str, str]] = GAN_NORMS
    timer: Optional[Callable] = None

    def __post_init__(self) -> None:
        metric = FEATURES[self.fid_features]
        self.headline = (metric.key, metric.label.split(" ")[0], "{:7.1f}")

    @property
    def folder(self) -> str:
        return f"dcgan-{self.dataset}"

    @property
    def trainer(self):
        return train_gan

    def load(self) -> tuple:
        return self.given or (load_dataset(self.dataset, self.data_dir),)

    def configure(self, key: tuple, scale: Scale, root: Path) -> GANConfig:
        norm, seed = key
        return GANConfig(dataset=self.dataset, train_size=scale.train_size, norm=norm, epochs=scale.epochs,
                         fid_every=scale.fid_every, fid_samples=scale.fid_samples, fid_reference=scale.fid_reference,
                         fid_features=self.fid_features, seed=seed, out=str(self.run_dir(root, norm, seed)),
                         **self.run_settings())

    def epoch_seconds(self, scale: Scale, data: tuple, device, norms: Sequence[str]) -> dict:
        config = self.configure((norms[0], 0), scale, Path())  # the run's settings; its folder is not used
        return (self.timer or time_gan_epochs)(config, data[0], device, norms)

    def results(self, done: Finished):
        scale, seeds, root, (data,), norms = done.scale, done.seeds, done.root, done.data, self.norms
        metric = FEATURES[self.fid_features]
        runs = done.histories
        histories = self.by_label(done)
        grids = {
            label: self.run_dir(root, norm, s) / "samples" / f"epoch-{scale.epochs:04d}.png"
            for label, norm in norms
            for s in reversed(seeds)
            if (norm, s) in runs
        }  # the first finished seed's

        # FID of real test images against the same reference, at the generated sample size: the floor
        # that the finite sample size alone puts under every FID of the table.
        device = resolve_device(self.device)
        extractor = feature_extractor(self.fid_features).to(device)
        cache = _cache.cache_dir("fid")  # where the runs keep theirs
        reference, reference_sqrt = reference_stats(
            extractor, self.fid_features, data.train, scale.fid_reference, f"{self.dataset}-train", cache, 100, device
        )
        test, _ = reference_stats(extractor, self.fid_features, data.test, scale.fid_samples, f"{self.dataset}-test",
                                  cache, 100, device, with_sqrt=False)
        floor = frechet_distance(*reference.mean_cov(), *test.mean_cov(), cov1_sqrt=reference_sqrt)

        final = {
            norm: {s: runs[norm, s][-1][metric.key] for s in seeds
                   if (norm, s) in runs and runs[norm, s] and metric.key in runs[norm, s][-1]}
            for _, norm in norms
        }
        base = norms[0][1]
        rows = []
        for label, norm in norms:
            finals = list(final[norm].values())
            bests = [min(r[metric.key] for r in h if metric.key in r) for h in histories[label]
                     if any(metric.key in r for r in h)]
            common = sorted(set(final[norm]) & set(final[base]))
            versus = None if norm == base else comparison([final[norm][s] for s in common],
                                                          [final[base][s] for s in common], higher_is_better=False)
            rows.append({"label": label, "norm": norm, "status": self.status(done, norm),
                         "final": mean_std(finals), "best": mean_std(bests),
                         "final_interval": interval(finals).to_dict(), "best_interval": interval(bests).to_dict(),
                         "final_difference": versus, "seeds": [s for s in seeds if done.planned((norm, s))]})
        results = done.summary(experiment="dcgan", dataset=self.dataset, metric=dataclasses.asdict(metric),
                               real_test_floor=floor, rows=rows)
        setting = f"{self.dataset}, {scale.name} scale"
        figures = lambda: dcgan_figures(root, histories, metric, grids, setting)  # noqa: E731
        return _gan_table(self.dataset, scale, results), results, figures


def reproduce_dcgan(dataset: str, scale: Union[str, Scale], *, fid_features: str = "auto",
                    norms: Sequence[tuple[str, str]] = GAN_NORMS, data: Optional[Dataset] = None, **options) -> Path:
    """Train DCGAN-BN, -MN and -UCB-Norm at ``scale``; write ``results/dcgan-<dataset>/<scale>/``.

    That folder gets ``runs/<norm>-seed<seed>/`` (each a resumable run), ``table.md`` (our FID beside
    the paper's claim, with the FID of real test images at the same sample size), ``summary.json``,
    ``figure10.png`` (FID curves) and ``figure11.png`` (final samples). Running the command again
    resumes unfinished runs and reuses finished ones. ``data`` skips loading the data set; ``options``
    are those of :func:`~cbnorm.experiments.reproduce.reproduce` (``out``, ``seeds``, ``device``,
    ``parallel``, ``time_budget``, ``epochs``, ``speed_settings``, ...); ``timer``: what times the
    layers for ``time_budget`` (default :func:`time_gan_epochs`, which says what an epoch includes).
    """
    return drive_experiment(DCGAN, scale, GAN_SCALES, name="dcgan", dataset=dataset, norms=tuple(norms),
                            fid_features=resolve_features(fid_features), data=data, **options)


def _gan_table(dataset: str, scale: Scale, results: dict) -> str:
    import platform

    metric = results["metric"]
    size = lambda n: "all" if n == 0 else f"{n:,}"  # noqa: E731
    cell = lambda i: Interval.from_dict(i).cell(1)  # noqa: E731
    base = results["rows"][0]["label"] if results["rows"] else "—"
    lines = [
        f"# Figure 10: DCGAN with BN, MN or UCB-Norm in the generator — {dataset}, scale `{scale.name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Scale: {size(scale.train_size)} training images, {scale.epochs} epochs, seeds "
        f"{', '.join(map(str, results['seeds']))}; {metric['label']} every {scale.fid_every} epochs of "
        f"{size(scale.fid_samples)} generated images against {size(scale.fid_reference)} training images. "
        f"Protocol: Adam lr 2e-4, betas (0, 0.9), batch 64, K = 3 in the generator's first two norm layers.",
        f"Features: {metric['extractor']}. Torch {torch.__version__}, {platform.machine()}, {results['device']}; "
        f"{results['train_seconds'] / 60:.1f} min of training and FID, summed over the runs.",
        "",
        f"Our {metric['label']} (lower is better) at the last epoch and the best over the evaluated epochs "
        f"(mean ± half-width of the 95% Student-t interval over seeds), and the last epoch's paired difference "
        f"against {base} under the same seeds with its computed verdict. The paper (Figure 10, CIFAR-100, 200 "
        f"epochs) gives curves only, no numbers: DCGAN-UCB-Norm converges faster and reaches a lower FID than "
        f"DCGAN-MN and DCGAN-BN.",
        "",
        f"| model | ours, last epoch | ours, best | last epoch vs {base} | paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        ours = (
            [row["status"], ""] if row["status"] != "ok" else [cell(row["final_interval"]), cell(row["best_interval"])]
        )
        d = row["final_difference"]
        versus = "" if d is None else f"{d['difference']['mean']:+.1f}: {d['verdict']}"
        lines.append(f"| {row['label']} | {ours[0]} | {ours[1]} | {versus} | curve only |")
    lines += [
        "",
        f"Floor: the {metric['label']} of {size(scale.fid_samples)} real test images against the same reference is "
        f"{results['real_test_floor']:.1f}; at this sample size no generator can be expected to score below it.",
    ]
    return "\n".join(lines + plan_lines(results["plan"])) + "\n"
