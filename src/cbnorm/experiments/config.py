"""The configs of the harness's runs, one dataclass per kind of run, and the fields they share.

Each field is a flag of its ``cbnorm`` command (its help is the field's ``help`` metadata) and a key
of the run's ``config.json``. This module imports neither torch nor numpy, so ``cbnorm --help`` is fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from .speed import SPEED_FIELDS, SpeedSettings

__all__ = ["DATASET_NAMES", "RUN_CONTROL", "SELECTIONS", "AdaMatchConfig", "GANConfig", "RunSettings",
           "TrainConfig", "check_fields", "option"]

# The keys of cbnorm.experiments.data.DATASETS (a test keeps the two equal).
DATASET_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "svhn", "tiny-imagenet", "oxford-pet", "digits")

# Which epoch's test accuracy a table reports (TrainConfig.select).
SELECTIONS = ("last", "best-val")

# What --amp means for every kind of run (cbnorm.experiments.speed.autocast_dtype).
AMP_HELP = "mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU"

# Config fields that may change when a run is resumed: they do not change what is computed (the speed settings
# change how it is rounded, as the device does).
RUN_CONTROL = frozenset({"data_dir", "device", "threads", "out", "resume", "overwrite", "progress",
                         "eval_batch_size"}) | SPEED_FIELDS


def option(text: str, **kwargs):
    """A config dataclass field with its command-line help (``cbnorm`` makes one flag per field)."""
    return field(metadata={"help": text}, **kwargs)


def check_fields(config, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise :class:`ValueError` for the first ``(field, ok, expected)`` of ``checks`` that is not ok."""
    for name, ok, expected in checks:
        if not ok:
            name_of = type(config).__name__
            raise ValueError(f"{name_of}: expected {name} to be {expected}, got {getattr(config, name)!r}")


@dataclass
class RunSettings(SpeedSettings):
    """The fields of a run's config that say where and how it runs; a config dataclass inherits them."""

    device: str = option("auto (CUDA when present), cpu, cuda, ...", default="auto")
    amp: bool = option(AMP_HELP, default=False)
    threads: int = option("CPU threads for torch (0: torch's default)", default=0)
    resume: bool = option("continue the run in --out from its checkpoint (with more --epochs, where the schedule "
                          "allows)", default=False)
    overwrite: bool = option("replace the run or files in --out", default=False)
    progress: bool = option("progress bar within epochs", default=True)


@dataclass
class TrainConfig(SpeedSettings):
    """Everything a run depends on; saved as RUN/config.json. Each field is a ``cbnorm train`` flag."""

    # data
    dataset: str = option("dataset name: " + ", ".join(DATASET_NAMES), default="cifar10")
    data_dir: Optional[str] = option("data root (default: $CBNORM_DATA)", default=None)
    train_size: int = option("train on a fixed random subset of this many images (0: all)", default=0)
    test_size: int = option("test on a fixed random subset of this many images (0: all)", default=0)
    augment: bool = option("random crops and flips where the dataset allows them", default=True)
    # model
    model: str = option("shallow_cnn, densenet40, densenet100, vit or oxford_cnn", default="shallow_cnn")
    norm: str = option("the layer under test, a registry name (batchnorm, scb, scb_base, ucb, mn, ...) or none",
                      default="batchnorm")
    num_clusters: int = option("K: mixture components of UCB/MN, clusters of the dataset mixture for SCB", default=3)
    norm_kwargs: dict = option("more arguments of the layer, e.g. unknown=map,affine=True", default_factory=dict)
    clusters: str = option("SCB prior clusters: mixture (fitted on the training images, seed 0), superclass, "
                           "shuffled-superclass (a control), or an ids file from `cbnorm clusters`", default="mixture")
    cluster_method: str = option("the dataset mixture: gmm or kmeans", default="gmm")
    test_clusters: bool = option("give SCB layers the test images' cluster ids (else their unknown-cluster rule)",
                                default=True)
    # optimisation
    optimizer: str = option("adamw, adam, or sgd (Nesterov)", default="adamw")
    lr: float = option("initial learning rate", default=1e-3)
    weight_decay: float = option("weight decay", default=1e-4)
    momentum: float = option("SGD momentum", default=0.9)
    schedule: str = option("constant, or step: lr / 10 at 50%% and 75%% of the epochs", default="constant")
    epochs: int = option("epochs", default=100)
    batch_size: int = option("training batch size; under torchrun the global batch, shared by the ranks", default=256)
    eval_batch_size: int = option("evaluation batch size (global, as --batch-size)", default=1000)
    select: str = option("which epoch's test accuracy a table reports: last, or best-val (the authors' notebooks: "
                         "also the epoch of the best accuracy on --val-fraction of the training images, held out)",
                         default="last")
    val_fraction: float = option("with --select best-val, the fraction of the training images held out", default=0.1)
    # the run
    seed: int = option("seed of the initialisation, data order and augmentation", default=0)
    device: str = option("auto (CUDA when present), cpu, cuda, cuda:1, ...", default="auto")
    amp: bool = option(AMP_HELP, default=False)
    threads: int = option("CPU threads for torch (0: torch's default)", default=0)
    out: str = option("run directory", default="runs/run")
    resume: bool = option("continue the run in --out from its checkpoint (with more --epochs, where the schedule "
                          "allows)", default=False)
    overwrite: bool = option("replace the run or files in --out", default=False)
    snapshots: int = option("keep the weights at this many evenly spaced epochs (4: 25/50/75/100%%)", default=0)
    progress: bool = option("progress bar within epochs", default=True)

    def __post_init__(self) -> None:
        self.dataset = self.dataset.lower()
        checks = [
            ("dataset", self.dataset in DATASET_NAMES, f"one of {', '.join(DATASET_NAMES)}"),
            ("optimizer", self.optimizer in ("adamw", "adam", "sgd"), "adamw, adam or sgd"),
            ("schedule", self.schedule in ("constant", "step"), "constant or step"),
            ("epochs", self.epochs >= 1, "a positive int"),
            ("batch_size", self.batch_size >= 1, "a positive int"),
            ("lr", self.lr > 0, "a positive float"),
            ("num_clusters", self.num_clusters >= 1, "a positive int"),
            ("snapshots", 0 <= self.snapshots <= self.epochs, f"between 0 and epochs={self.epochs}"),
            ("select", self.select in SELECTIONS, " or ".join(SELECTIONS)),
            ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
        ]
        check_fields(self, checks)


@dataclass
class GANConfig(RunSettings):
    """Everything a DCGAN run depends on; saved as RUN/config.json. Each field is a ``cbnorm gan`` flag."""

    # data
    dataset: str = option("dataset (cifar100 is the paper's; cifar10, ...)", default="cifar10")
    data_dir: Optional[str] = option("data root (default: $CBNORM_DATA)", default=None)
    train_size: int = option("train on a fixed random subset of this many images (0: all)", default=0)
    # models
    norm: str = option("the generator's first two norm layers: batchnorm, mn or ucb (any registry name)",
                       default="batchnorm")
    num_components: int = option("K of MN / UCB-Norm", default=3)
    norm_kwargs: dict = option("more arguments of those layers (MN and UCB get affine=True unless given)",
                               default_factory=dict)
    latent_dim: int = option("size of the noise z", default=128)
    width: int = option("channels of the generator's last hidden layer (x8, x4, x2 before it)", default=64)
    # optimisation
    epochs: int = option("epochs", default=200)
    batch_size: int = option("batch size", default=64)
    lr: float = option("Adam learning rate of both networks", default=2e-4)
    beta1: float = option("Adam beta1", default=0.0)
    beta2: float = option("Adam beta2", default=0.9)
    # FID
    fid_every: int = option("FID every this many epochs (and at the last)", default=10)
    fid_samples: int = option("generated images per FID", default=10000)
    fid_reference: int = option("training images of the FID reference statistics (0: all)", default=0)
    fid_features: str = option("auto (Inception when installed, else FID* random-conv with a warning), "
                               "inception or random-conv", default="auto")
    # the run
    seed: int = option("seed of the initialisation, data order and noise", default=0)
    eval_batch_size: int = option("batch of generated images (and of FID features)", default=100)
    out: str = option("run directory", default="runs/dcgan")

    def __post_init__(self) -> None:
        from .fid import FEATURES  # torch: only when a config is made, never for --help

        checks = [
            ("epochs", self.epochs >= 1, "a positive int"),
            ("batch_size", self.batch_size >= 2, "an int >= 2 (batch statistics)"),
            ("lr", self.lr > 0, "a positive float"),
            ("fid_every", self.fid_every >= 1, "a positive int"),
            ("fid_samples", self.fid_samples >= 2, "an int >= 2"),
            ("fid_reference", self.fid_reference == 0 or self.fid_reference >= 2, "0 (all) or an int >= 2"),
            ("fid_features", self.fid_features in ("auto", *FEATURES), f"auto or one of {list(FEATURES)}"),
            ("num_components", self.num_components >= 1, "a positive int"),
        ]
        check_fields(self, checks)


@dataclass
class AdaMatchConfig(RunSettings):
    """Everything an AdaMatch run depends on; saved as RUN/config.json. Each field is a ``cbnorm adamatch`` flag."""

    # data
    source: str = option("labelled source data set", default="mnist")
    target: str = option("unlabelled target data set: digits, svhn, ...", default="digits")
    data_dir: Optional[str] = option("data root (default: $CBNORM_DATA)", default=None)
    source_train_size: int = option("fixed random subset of the source training images (0: all)", default=0)
    target_train_size: int = option("fixed random subset of the target training images (0: all)", default=0)
    source_test_size: int = option("fixed random subset of the source test images (0: all)", default=0)
    target_test_size: int = option("fixed random subset of the target test images (0: all)", default=0)
    image_size: int = option("the common image size of both domains (3 channels)", default=32)
    # model
    norm: str = option("the initial layer: none (the AdaMatch baseline), scb, scb_base, ucb, ...", default="none")
    num_clusters: int = option("K: the domains for SCB (2), components for UCB", default=2)
    norm_kwargs: dict = option("more arguments of the layer", default_factory=dict)
    depth: int = option("WideResNet depth (6n + 4)", default=28)
    width: int = option("WideResNet widening factor", default=2)
    bn_momentum: float = option("momentum of the WRN's BatchNorm running statistics (Keras' 0.99 decay)", default=0.01)
    # optimisation
    epochs: int = option("epochs (passes over the source training images)", default=10)
    batch_size: int = option("source images per step (n_S)", default=64)
    uratio: int = option("target images per source image (n_T = uratio * n_S)", default=3)
    lr: float = option("Adam's initial learning rate", default=0.03)
    lr_floor: float = option("the cosine decay ends at this fraction of lr", default=0.25)
    weight_decay: float = option("Adam's L2 weight decay", default=0.0)
    tau: float = option("relative confidence threshold", default=0.9)
    grad_every: int = option("take the gradient variance every this many steps", default=1)
    # the run
    seed: int = option("seed of the initialisation, data order, augmentation and interpolation", default=0)
    eval_batch_size: int = option("evaluation batch size", default=500)
    out: str = option("run directory", default="runs/adamatch")

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "a positive int"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("uratio", self.uratio >= 1, "a positive int"),
            ("lr", self.lr > 0, "a positive float"),
            ("lr_floor", 0 <= self.lr_floor <= 1, "in [0, 1]"),
            ("tau", 0 <= self.tau <= 1, "in [0, 1]"),
            ("grad_every", self.grad_every >= 0, "0 (never) or a positive int"),
            ("image_size", self.image_size >= 8, "an int >= 8"),
            ("num_clusters", self.num_clusters >= 1, "a positive int"),
            ("bn_momentum", 0 < self.bn_momentum <= 1, "in (0, 1]"),
        ]
        check_fields(self, checks)
