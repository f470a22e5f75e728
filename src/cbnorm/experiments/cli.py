"""The ``cbnorm`` command line (also ``python -m cbnorm``).

    cbnorm demo                                            # BN vs SCB-Norm vs UCB-Norm on digits, ~1 min
    cbnorm train --dataset cifar10 --norm ucb --out runs/ucb
    cbnorm reproduce table5 --dataset cifar10 --scale small
    cbnorm reproduce densenet --depth 40 --scale small
    cbnorm reproduce superclass --model vit --scale small
    cbnorm gan --norm ucb --out runs/dcgan-ucb             # one DCGAN run with FID
    cbnorm reproduce dcgan --scale small                   # DCGAN-BN/MN/UCB-Norm, Figures 10-11
    cbnorm adamatch --target digits --norm scb --out runs/da-scb
    cbnorm reproduce adamatch --target digits --scale small  # Table VI, Figure 12
    cbnorm plot runs/bn runs/ucb [--activations] [--tsne]
    cbnorm data list | download NAME | verify NAME
    cbnorm clusters cifar10 --k 3 --out cifar10-k3.npz
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shlex
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from .speed import SpeedSettings

__all__ = ["main"]


def _kwargs(text: str) -> dict:
    """``"unknown=map,affine=True"`` -> ``{"unknown": "map", "affine": True}``."""
    result = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {item!r}")
        try:
            result[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = value.strip()
    return result


# The optional dependencies (module -> package), all in the `experiments` extra.
OPTIONAL = {"sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib", "tqdm": "tqdm", "PIL": "pillow"}
_CONFIGS = {"train": "TrainConfig", "gan": "GANConfig", "adamatch": "AdaMatchConfig"}
_SPEED_FLAGS = tuple(f.name for f in dataclasses.fields(SpeedSettings))

# The options of `reproduce` that some experiments only use: those experiments, and the default there (None: none,
# or one resolved from the data root). argparse leaves them None, so that an option given to an experiment
# that does not use it is refused rather than ignored.
_OWN_OPTIONS = {
    "dataset": (("table5", "densenet", "superclass", "dcgan"), None),
    "depth": (("densenet",), 40),
    "model": (("superclass",), "vit"),
    "fid_features": (("dcgan",), "auto"),
    "source": (("adamatch",), "mnist"),
    "target": (("adamatch",), None),
    "norms": (("adamatch",), None),
}


def _add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of ``config_class``, none with a default: only the flags given are set."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if "(default" not in help_text and default not in (None, {}, ""):
            help_text += f" (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, type=_kwargs, default=argparse.SUPPRESS, metavar="K=V,...", help=help_text)
        else:
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # Optional[str] -> str
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def _train_config(given: dict, config_class):
    """The config of a run command: the flags given, over the run's saved config with ``--resume``, which
    needs a checkpoint in ``--out``."""
    from .runs import has_checkpoint

    out = Path(given.get("out", config_class.out))
    base = {}
    if given.get("resume"):
        if not has_checkpoint(out):
            what = "does not exist" if not out.exists() else "holds no checkpoint.pt"
            raise FileNotFoundError(f"nothing to resume: {out} {what}; start the run without --resume")
        saved = out / "config.json"
        if saved.is_file():
            base = json.loads(saved.read_text())
            base.pop("overwrite", None)  # what the run was started with, never what continues it
    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in {**base, **given}.items() if k in fields})


_DESCRIPTIONS = {
    "train": """Train one model on one data set, resumable at every epoch.

  cbnorm train --dataset cifar10 --norm ucb --lr 0.001 --epochs 100 --out runs/ucb   # Table V's protocol
  cbnorm train --out runs/ucb --resume                           # after a crash (add --epochs N to go on)

Every epoch rewrites RUN/metrics.csv and RUN/metrics.json and saves RUN/checkpoint.pt (the previous
epoch's kept as checkpoint-previous.pt). A folder that holds a run or other files is never written
into without --resume or --overwrite. Under torchrun, --batch-size is the global batch.""",
    "gan": """Train one DCGAN with FID, resumable at every epoch.

  cbnorm gan --norm ucb --out runs/dcgan-ucb
  cbnorm gan --out runs/dcgan-ucb --resume""",
    "adamatch": """Train one AdaMatch domain adaptation (a WideResNet with the layer under test as its initial
layer), resumable at every epoch.

  cbnorm adamatch --source mnist --target digits --norm scb --epochs 10 --out runs/da-scb
  cbnorm adamatch --out runs/da-scb --resume""",
}


def _add_gpu_harness_flags(parser: argparse.ArgumentParser) -> None:
    """Concurrent runs, a time budget, the epochs and the CUDA speed settings of a reproduction."""
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="train up to N runs at once, each in its own process (default: 1)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="time each layer's model here, then run only what fits MINUTES (seeds 0-2 or --seeds); "
                             "stops if not one run fits, unless --epochs is given")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the scale's)")
    _add_config_flags(parser, SpeedSettings)


def _parser() -> argparse.ArgumentParser:
    """The command line; builds without torch (``cbnorm --help`` is fast), each command imports what it runs."""
    from . import config

    datasets = sorted(config.DATASET_NAMES)
    parser = argparse.ArgumentParser(prog="cbnorm", description="Cluster-Based Normalization: experiments")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("demo", help="BN vs SCB-Norm vs UCB-Norm on a small data set, about a minute on CPU")
    p.add_argument("--dataset", default="digits", type=str.lower, choices=datasets, help="(default: digits)")
    p.add_argument("--data-dir", help="data root (default: $CBNORM_DATA); digits needs none")
    p.add_argument("--epochs", type=int, help="epochs (default: 8 for digits, 3 otherwise)")
    p.add_argument("--train-size", type=int, help="training images (default: all digits, 5000 otherwise)")
    p.add_argument("--test-size", type=int, help="test images (default: all digits, 1000 otherwise)")
    p.add_argument("--out", default=".", help="writes OUT/results/demo-DATASET/ (default: .)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ... (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    for command, what in (("train", "one model"), ("gan", "one DCGAN with FID"),
                          ("adamatch", "one AdaMatch domain adaptation")):
        p = commands.add_parser(command, help=f"train {what} (resumable); flags are {_CONFIGS[command]}'s fields",
                                description=_DESCRIPTIONS[command],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_flags(p, getattr(config, _CONFIGS[command]))

    p = commands.add_parser("reproduce", help="reproduce Table V (table5), the DenseNet experiment (densenet), "
                                              "Tables VII-VIII (superclass), the DCGAN experiment (dcgan) or "
                                              "Table VI (adamatch)",
                            description="Run (or continue) every run of one of the paper's experiments and write its "
                                        "table and figures to OUT/results/EXPERIMENT-DATASET/SCALE/. Running it again "
                                        "continues unfinished runs and reuses finished ones; it exits with status 1 "
                                        "when any run failed.")
    p.add_argument("experiment", choices=["table5", "densenet", "superclass", "dcgan", "adamatch"])
    p.add_argument("--dataset", type=str.lower,
                   help="table5: cifar10 (default), cifar100, tiny-imagenet, ...; densenet and dcgan: cifar100 when "
                        "present, else cifar10; superclass: cifar100 (vit) or oxford-pet (oxford_cnn) when present, "
                        "else cifar10 (adamatch: see --source and --target)")
    defaults = {name: default for name, (_, default) in _OWN_OPTIONS.items()}
    p.add_argument("--depth", type=int, choices=[40, 100],
                   help=f"densenet: DenseNet-BC depth (default: {defaults['depth']})")
    p.add_argument("--model", choices=["vit", "oxford_cnn", "oxford_cnn_controls"],
                   help="superclass: the ViT of Table VII, the OxfordCNN of Table VIII, or OxfordCNN with the "
                        f"controls of issue 14 (default: {defaults['model']})")
    p.add_argument("--fid-features", choices=["auto", "inception", "random-conv"],
                   help=f"dcgan: FID features (default: {defaults['fid_features']}, the Inception weights when "
                        "installed)")
    p.add_argument("--source", type=str.lower,
                   help=f"adamatch: labelled source data set (default: {defaults['source']})")
    p.add_argument("--target", type=str.lower,
                   help="adamatch: unlabelled target data set (default: svhn when present, else digits)")
    p.add_argument("--scale", choices=["smoke", "small", "paper", "converge"], default="smoke",
                   help="how much of the protocol runs: smoke (CI's, minutes on CPU), small (data subsets and few "
                        "epochs, about an hour on 2 CPU cores), paper (the paper's protocol, for a GPU), converge "
                        "(table5's lr-0.005 layers to a plateau on a fixed subset, 3 seeds, best-val) (default: smoke)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the scale's seeds")
    p.add_argument("--norms", nargs="+", help="adamatch: run only these of its layers (none, scb, dsbn, scb_base, ucb)")
    p.add_argument("--out", default=".", help="writes OUT/results/EXPERIMENT-DATASET/SCALE/ (default: .)")
    p.add_argument("--data-dir", help="data root (default: $CBNORM_DATA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ... (default: auto)")
    p.add_argument("--amp", action="store_true", help=config.AMP_HELP)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch (0: its default); on a busy 2-core machine 1 is faster")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_gpu_harness_flags(p)

    p = commands.add_parser("plot", help="curves of runs; --activations: Figure 2; --tsne: Figures 1/9")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default: the first run's folder)")
    p.add_argument("--metric", nargs="+", default=["test_error"],
                   help="metrics.csv columns to draw (default: test_error)")
    p.add_argument("--activations", action="store_true", help="activation histograms with their fitted mixture")
    p.add_argument("--layer", help="module whose output --activations shows (default: the model's probe layer)")
    p.add_argument("--tsne", action="store_true", help="t-SNE of the classifier's inputs at each snapshot")
    p.add_argument("--points", type=int, default=512, help="test images for --activations and --tsne (default: 512)")
    p.add_argument("--data-dir", help="data root, if not the one the runs used")

    p = commands.add_parser("data", help="list, download or verify data sets")
    p.add_argument("action", choices=["list", "download", "verify"])
    p.add_argument("name", nargs="?", type=str.lower, choices=datasets, metavar="NAME", help=", ".join(datasets))
    p.add_argument("--data-dir", help="data root (default: $CBNORM_DATA)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = commands.add_parser("clusters", help="write SCB-Norm cluster ids of a data set (its Gaussian mixture)")
    p.add_argument("dataset", type=str.lower, choices=datasets)
    p.add_argument("--k", type=int, default=3, help="clusters (default: 3)")
    p.add_argument("--method", choices=["gmm", "kmeans"], default="gmm", help="(default: gmm)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--out", required=True, help="the .npz ids file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--data-dir", help="data root (default: $CBNORM_DATA)")
    return parser


def _data(args) -> None:
    from . import data

    if args.action == "list":  # "present": the files are there, verify and read
        for name, spec in data.DATASETS.items():
            try:
                where = "bundled" if name == "digits" else data.data_root(args.data_dir) / spec.folder
                data.verify(name, args.data_dir)
                state = "present"
            except data.DataError as error:
                state = "no data root" if "no data directory" in str(error) else "missing"
                if name != "digits" and state == "missing" and data.available(name, args.data_dir):
                    state = "unusable"
                    where = f"{where}: {error}"
            print(f"{name:<14} {state:<12} {where}")
        return
    if args.name is None:
        raise ValueError(f"`cbnorm data {args.action}` needs a data set name: one of {sorted(data.DATASETS)}")
    if args.action == "download":
        folder = data.download(args.name, args.data_dir, progress=args.progress)
        print(f"{args.name}: downloaded and verified in {folder}")
    for line in data.verify(args.name, args.data_dir):
        print(line)


def _given(args) -> dict:
    """The config flags given on the command line."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "command_line", "argv")}


def _own_options(args) -> None:
    """Refuse an option of :data:`_OWN_OPTIONS` given to an experiment that does not use it; set the defaults of
    those it uses and was not given."""
    for name, (experiments, default) in _OWN_OPTIONS.items():
        value = getattr(args, name, None)  # a speed flag not given is absent
        if value is not None and args.experiment not in experiments:
            users = " and ".join(filter(None, [", ".join(experiments[:-1]), experiments[-1]]))
            raise ValueError(f"--{name.replace('_', '-')}: only the {users} experiment{'s' * (len(experiments) > 1)} "
                             f"use{'s' * (len(experiments) == 1)} it, not {args.experiment}")
        if value is None and default is not None and args.experiment in experiments:
            setattr(args, name, default)


def _reproduce(args) -> None:
    """``cbnorm reproduce EXPERIMENT``: each experiment's driver function with the flags that apply to it."""
    _own_options(args)
    speed_settings = {name: getattr(args, name) for name in _SPEED_FLAGS if hasattr(args, name)}  # those given
    common = dict(out=args.out, data_dir=args.data_dir, seeds=args.seeds, device=args.device, amp=args.amp,
                  threads=args.threads, progress=args.progress, command=args.command_line, parallel=args.parallel,
                  time_budget=args.time_budget, epochs=args.epochs, speed_settings=speed_settings)
    if args.experiment == "superclass":
        from .superclass import default_dataset, reproduce_superclass

        reproduce_superclass(args.model, args.dataset or default_dataset(args.model, args.data_dir), args.scale,
                             **common)
    elif args.experiment == "adamatch":
        from .adamatch import ADAMATCH_NORMS, adamatch_target, reproduce_adamatch

        unknown = set(args.norms or ()) - {norm for _, norm in ADAMATCH_NORMS}
        if unknown:
            raise ValueError(f"--norms: expected layers of the AdaMatch experiment "
                             f"{[norm for _, norm in ADAMATCH_NORMS]}, got {sorted(unknown)}")
        norms = [(label, norm) for label, norm in ADAMATCH_NORMS if not args.norms or norm in args.norms]
        reproduce_adamatch(args.source, args.target or adamatch_target(args.data_dir), args.scale, norms=norms,
                           **common)
    elif args.experiment == "dcgan":
        from .gan import reproduce_dcgan
        from .reproduce import densenet_dataset

        reproduce_dcgan(args.dataset or densenet_dataset(args.data_dir), args.scale, fid_features=args.fid_features,
                        **common)
    else:
        from .reproduce import densenet_dataset, reproduce

        if args.experiment == "table5":
            name, dataset = "table5", args.dataset or "cifar10"
        else:
            name, dataset = f"densenet{args.depth}", args.dataset or densenet_dataset(args.data_dir)
        reproduce(name, dataset, args.scale, **common)


def _run(args) -> None:
    if args.command == "demo":
        from .demo import demo

        demo(args.dataset, data_dir=args.data_dir, epochs=args.epochs, train_size=args.train_size,
             test_size=args.test_size, out=args.out, seed=args.seed, device=args.device, progress=args.progress)
    elif args.command == "train":
        from .train import TrainConfig, train

        train(_train_config(_given(args), TrainConfig))
    elif args.command == "gan":
        from .gan import GANConfig, train_gan

        train_gan(_train_config(_given(args), GANConfig))
    elif args.command == "adamatch":
        from .adamatch import AdaMatchConfig, train_adamatch

        train_adamatch(_train_config(_given(args), AdaMatchConfig))
    elif args.command == "reproduce":
        _reproduce(args)
    elif args.command == "plot":
        from .plots import plot_runs

        out = args.out or args.runs[0]
        for path in plot_runs(
            args.runs,
            out,
            metrics=args.metric,
            activations=args.activations,
            tsne=args.tsne,
            layer=args.layer,
            points=args.points,
            data_dir=args.data_dir,
        ):
            print(path)
    elif args.command == "data":
        _data(args)
    elif args.command == "clusters":
        from .clusters import mixture_clusters, save_cluster_ids
        from .data import load_dataset

        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        data = load_dataset(args.dataset, args.data_dir)
        ids = mixture_clusters(data, args.k, args.method, args.seed)
        save_cluster_ids(args.out, ids, args.dataset)
        sizes = ", ".join(str(int(n)) for n in ids.train.bincount(minlength=args.k))
        print(f"{args.out}: {args.k} clusters ({ids.source}) of {args.dataset}; training images per cluster: {sizes}")


def _interrupted(args) -> str:
    """The line printed on Ctrl-C: how far the run got and the command that continues it."""
    if args.command not in _CONFIGS:
        return f"interrupted; continue with: {args.command_line} (it reuses finished runs and resumes the others)"
    from . import config

    out = Path(getattr(args, "out", getattr(config, _CONFIGS[args.command]).out))
    try:
        epochs = len(json.loads((out / "metrics.json").read_text())["history"])
    except (OSError, ValueError, KeyError, TypeError):
        epochs = 0
    argv = [a for a in args.argv if a not in ("--overwrite", "--no-overwrite", "--resume", "--no-resume")]
    if not epochs:
        return f"interrupted before the first epoch ended; start again with: {args.command_line}"
    return f"interrupted after epoch {epochs}; continue with: {shlex.join(['cbnorm', *argv, '--resume'])}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line. Errors in the input (bad flags, missing data, a folder in use) print one line
    and return 2; a missing optional dependency or a failed run of a reproduction, one line and 1; Ctrl-C,
    one line saying how to continue, and 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv, args.command_line = argv, shlex.join(["cbnorm", *argv])
    try:
        from .data import DataError
        from .fid import MissingWeightsError
        from .runs import RunsFailed
    except ModuleNotFoundError as error:
        return _missing_module(args, error)
    try:
        _run(args)
    except (DataError, ValueError, FileNotFoundError, FileExistsError, MissingWeightsError) as error:
        print(f"cbnorm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunsFailed as error:
        print(f"cbnorm {args.command}: error: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        return _missing_module(args, error)
    except KeyboardInterrupt:
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


def _missing_module(args, error: ModuleNotFoundError) -> int:
    """One line naming the extra that installs a missing optional dependency; anything else is a bug: re-raised."""
    module = (error.name or "").split(".")[0]
    if module not in OPTIONAL:
        raise error
    print(
        f"cbnorm {args.command}: error: this command needs {OPTIONAL[module]} (no module named {module!r}); "
        f"install the experiments' dependencies with: pip install 'cbnorm[experiments]'",
        file=sys.stderr,
    )
    return 1


def console_main() -> None:
    """Entry point of the ``cbnorm`` script."""
    sys.exit(main())
