"""One reproduction driver for every ``cbnorm reproduce`` experiment, and the scale they share.

    spec = Table5(experiment=TABLE5, dataset="cifar10", device="cpu")   # an experiment: see Spec
    root = drive(spec, scale, out=".", seeds=None, epochs=None, parallel=1, time_budget=None)

:func:`drive` does what every reproduction does, once: the scale (``epochs`` and ``seeds`` over its
own), the data, the results folder ``OUT/results/<spec.folder>/<scale>/``, the experiment's
preparation (SCB-Norm's dataset clusters), the ``time_budget`` plan (:mod:`.planner`), every run,
one after another (:func:`.runs.run_each`) or ``parallel`` at once, each in its own process
(:func:`.parallel.run_parallel`), then the spec's rows, table and figures
(:func:`.runs.write_results`, which raises :class:`~.runs.RunsFailed` after writing them when any
run failed). An experiment is a :class:`Spec`: its runs' configs, its trainer, its table and figures.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

from .parallel import RunState, run_parallel
from .planner import timing_lines
from .runs import command_line, resolve_device, results_folder, run_each, write_results

__all__ = ["Finished", "LayerSeedSpec", "NOT_PLANNED", "Scale", "Spec", "drive", "drive_experiment"]

NOT_PLANNED = "not run: outside the --time-budget plan"  # a table row's status


@dataclass(frozen=True)
class Scale:
    """How much of an experiment's protocol runs: data subsets (0: all), epochs and seeds. A scale may
    also run some of the experiment's layers (``norms``) and learning rates (``lrs``) only, draw t-SNE
    figures of ``tsne_points`` test images, and report the best-validation epoch beside the last
    (``select="best-val"``). ``extra`` holds an experiment's own settings (the DCGAN's FID sizes,
    AdaMatch's target subsets and short-run settings), read as attributes: ``scale.fid_every``."""

    name: str
    train_size: int
    test_size: int
    epochs: int
    seeds: tuple[int, ...]
    tsne_points: int = 0  # 0: no t-SNE figure
    norms: tuple = ()  # (label, registry name[, TrainConfig overrides]); () for the experiment's
    lrs: tuple[float, ...] = ()  # () for the experiment's
    select: str = "last"
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        """What ``summary.json`` records: the fields, those of ``extra`` among them."""
        fields = asdict(self)
        return {**fields, **fields.pop("extra")}


def _seconds(history: Sequence[dict]) -> float:
    """The seconds a run's epochs took: training and evaluation, the DCGAN's FID included."""
    return sum(row["seconds"] + row.get("fid_seconds", 0) for row in history)


@dataclass
class Finished:
    """What :func:`drive` hands :meth:`Spec.results`: the runs' histories and failures by key, and how they ran."""

    scale: Scale
    seeds: tuple[int, ...]
    root: Path
    data: tuple  # the trainer's data arguments
    command: str
    histories: dict
    failures: dict
    plan: Optional[object]  # the --time-budget :class:`~.planner.Plan`, if any
    parallel: int
    device: str
    runs: Sequence[tuple[Hashable, str]] = ()  # (key, title) of every run that was to run

    def seconds_per_epoch(self) -> dict[str, float]:
        """Seconds per epoch (training and evaluation) of each configuration that ran, mean over its seeds; a
        configuration is named by its runs' title without the seed (keys end with the seed, titles with ", seed N")."""
        per_config: dict[str, list[float]] = {}
        for key, title in self.runs:
            history = self.histories.get(key)
            if history:
                per_config.setdefault(title.removesuffix(f", seed {key[-1]}"), []).append(
                    _seconds(history) / len(history))
        return {config: sum(values) / len(values) for config, values in per_config.items()}

    def planned(self, key: Hashable) -> bool:
        """Whether the run ``key`` is part of what ran (everything, without a time budget)."""
        return self.plan is None or key in self.plan.runs

    def status(self, keys: Sequence[Hashable]) -> str:
        """A table row's status from its runs ``keys``: outside the time budget's plan, failed (the first
        failure), or ok."""
        if not any(self.planned(key) for key in keys):
            return NOT_PLANNED
        failed = [self.failures[key] for key in keys if key in self.failures]
        return f"failed: {failed[0]}" if failed else "ok"

    def summary(self, **fields) -> dict:
        """``summary.json``: the experiment's ``fields`` (``experiment``, ``rows``, ...), then what every
        reproduction records: its scale, seeds, command, device, concurrency, plan and training time."""
        from .speed import device_name

        where = resolve_device(self.device)
        plan = None if self.plan is None else {**self.plan.as_dict(), "text": self.plan.describe()}
        seconds = sum(_seconds(history) for history in self.histories.values())
        return {**fields, "scale": self.scale.to_dict(), "seeds": list(self.seeds), "command": self.command,
                "device": str(where), "device_name": device_name(where), "parallel": self.parallel, "plan": plan,
                "seconds_per_epoch": self.seconds_per_epoch(),
                "train_seconds": seconds}


@dataclass(kw_only=True)
class Spec:
    """One experiment of :func:`drive`. The fields are where and how its runs run; a subclass adds the
    experiment's own and implements :meth:`load`, :meth:`runs`, :meth:`configure` and :meth:`results`,
    and, for ``time_budget``, :meth:`layers` and :meth:`epoch_seconds`.

    ``trainer(config, *data)`` trains one run and returns its history; it must be a module-level
    function, which ``parallel`` hands to a spawned process. ``given`` is the data the caller passed:
    what ``parallel``'s processes share (otherwise each loads its own, sparing the shared memory).
    ``speed_settings``: the :class:`~cbnorm.experiments.speed.SpeedSettings` fields of every run (e.g.
    ``{"compile": True}``)."""

    name: str = ""  # how errors name the experiment: table5, superclass, dcgan, ...
    data_dir: Optional[str] = None
    device: str = "auto"
    amp: bool = False
    threads: int = 0
    progress: bool = True
    speed_settings: Optional[Mapping[str, bool]] = None
    given: tuple = ()
    headline: tuple[str, str, str] = RunState.headline  # the --parallel display's metric: key, label, format

    @property
    def folder(self) -> str:
        """``results/<folder>/<scale>/``."""
        raise NotImplementedError

    @property
    def trainer(self) -> Callable:
        raise NotImplementedError

    def load(self) -> tuple:
        """The trainer's data arguments (``given`` when the caller passed them)."""
        raise NotImplementedError

    def prepare(self, root: Path, scale: Scale, data: tuple) -> None:
        """What the runs need before any starts (e.g. SCB-Norm's clusters); nothing by default."""

    def runs(self, scale: Scale, seeds: Sequence[int]) -> list[tuple[Hashable, str]]:
        """``(key, title)`` of every run, in order; with a time budget, a key is ``(layer key, lr, seed)``, or
        ``(layer key, seed)`` when :meth:`lrs` is empty."""
        raise NotImplementedError

    def configure(self, key: Hashable, scale: Scale, root: Path) -> object:
        """The config of the run ``key`` (its ``out`` under ``root / "runs"``)."""
        raise NotImplementedError

    def run_settings(self) -> dict:
        """The config fields of where and how every run runs, its speed settings among them; each resumes its
        folder."""
        return dict(data_dir=self.data_dir, device=self.device, amp=self.amp, threads=self.threads,
                    progress=self.progress, resume=True, **(self.speed_settings or {}))

    def layers(self, scale: Scale) -> list[tuple[str, str]]:
        """``(layer key, registry name)`` of the layers a time budget plans, in the table's order."""
        raise ValueError(f"--time-budget: the {self.name} experiment cannot time its runs; run it without "
                         f"--time-budget (choose --scale, --seeds and --epochs instead)")

    def lrs(self, scale: Scale) -> Sequence[float]:
        """The learning rates a time budget plans; ``()`` when the runs have none (keys ``(layer key, seed)``)."""
        raise NotImplementedError

    def epoch_seconds(self, scale: Scale, data: tuple, device, norms: Sequence[str]) -> dict:
        """Seconds per epoch of a run with each registry name in ``norms``, timed on ``device``."""
        raise NotImplementedError

    def results(self, done: Finished) -> tuple[str, dict, Callable[[], None]]:
        """``(table.md, summary.json's content, a function drawing the figures)``."""
        raise NotImplementedError


@dataclass(kw_only=True)
class LayerSeedSpec(Spec):
    """A spec with a run per (layer, seed) of its ``norms`` (``(label, registry name)``, the baseline first):
    keys ``(norm, seed)``, run folders ``runs/<norm>-seed<seed>``. A time budget plans its layers by registry
    name, without a learning-rate axis; a subclass times them (:meth:`Spec.epoch_seconds`)."""

    norms: Sequence[tuple[str, str]] = ()

    def runs(self, scale: Scale, seeds: Sequence[int]) -> list[tuple[tuple, str]]:
        return [((norm, seed), f"{label}, seed {seed}") for label, norm in self.norms for seed in seeds]

    def layers(self, scale: Scale) -> list[tuple[str, str]]:
        return [(norm, norm) for _, norm in self.norms]

    def lrs(self, scale: Scale) -> Sequence[float]:
        return ()

    @staticmethod
    def run_dir(root: Path, norm: str, seed: int) -> Path:
        return root / "runs" / f"{norm}-seed{seed}"

    def by_label(self, done: Finished) -> dict:
        """Each label's histories, one a seed that ran."""
        return {label: [done.histories[norm, s] for s in done.seeds if (norm, s) in done.histories]
                for label, norm in self.norms}

    def status(self, done: Finished, norm: str) -> str:
        """The status of the row of ``norm``'s runs (:meth:`Finished.status`)."""
        return done.status([(norm, seed) for seed in done.seeds])


def _plan(spec: Spec, scale: Scale, seeds: Sequence[int], data: tuple, minutes: float):
    from .planner import plan_runs
    from .speed import device_name

    layers = spec.layers(scale)
    where = resolve_device(spec.device)
    norms = list(dict.fromkeys(norm for _, norm in layers))
    print(f"timing the {spec.name} experiment's models with each layer on {device_name(where)} for the "
          "--time-budget plan")
    per_norm = spec.epoch_seconds(scale, data, where, norms)
    plan = plan_runs(None, {key: per_norm[norm] for key, norm in layers}, minutes * 60, seeds, scale.epochs,
                     [key for key, _ in layers], spec.lrs(scale))
    print(plan.describe())
    return plan


def drive(
    spec: Spec,
    scale: Scale,
    *,
    out: Union[str, os.PathLike] = ".",
    seeds: Optional[Sequence[int]] = None,
    epochs: Optional[int] = None,
    parallel: int = 1,
    time_budget: Optional[float] = None,
    command: Optional[str] = None,
) -> Path:
    """Run (or resume) every run of ``spec`` at ``scale`` and write its table, ``summary.json`` and figures.

    Returns the results folder. ``seeds`` and ``epochs`` override the scale's. ``parallel``: runs at
    once, each in its own process. ``time_budget`` (minutes): run only what the planner finds fits it,
    of seeds ``seeds`` or 0, 1, 2; a spec that cannot time its runs refuses it before anything runs.
    """
    if parallel < 1:
        raise ValueError(f"--parallel: expected a positive number of runs at once, got {parallel}")
    if time_budget:
        spec.layers(scale)  # refuses before the data loads when the experiment cannot be timed
    scale = dataclasses.replace(scale, epochs=epochs) if epochs else scale
    seeds = tuple(seeds) if seeds else (0, 1, 2) if time_budget else tuple(scale.seeds)
    command = command_line(command)
    data = spec.load()
    root = results_folder(out, spec.folder, scale.name)
    spec.prepare(root, scale, data)
    runs = spec.runs(scale, seeds)
    plan = None
    if time_budget:
        plan = _plan(spec, scale, seeds, data, time_budget)
        seeds = tuple(sorted({seed for *_, seed in plan.runs}))
        runs = [(key, title) for key, title in runs if key in plan.runs]

    def configure(key):
        return spec.configure(key, scale, root)

    if parallel > 1:
        histories, failures = run_parallel(runs, configure, parallel, spec.given, trainer=spec.trainer,
                                           headline=spec.headline)
    else:
        histories, failures = run_each(runs, lambda key: spec.trainer(configure(key), *data))
    done = Finished(scale, seeds, root, data, command, histories, failures, plan, parallel, spec.device, runs)
    table, results, figures = spec.results(done)
    table += "\n".join(timing_lines(results["seconds_per_epoch"], results["device_name"])) + "\n"
    return write_results(root, table, results, figures, failures)


_DRIVE_OPTIONS = ("out", "seeds", "epochs", "parallel", "time_budget", "command")


def drive_experiment(spec_class: type, scale: Union[str, Scale], scales: Mapping[str, Scale], *, data=None,
                     **options) -> Path:
    """:func:`drive` a ``spec_class`` built from ``options`` at ``scale`` (or the scale of that name in
    ``scales``). The options of :func:`drive` (``out``, ``seeds``, ``epochs``, ``parallel``, ``time_budget``,
    ``command``) go to it, the others are the spec's fields (``name``, ``data_dir``, ``device``, ``amp``,
    ``threads``, ``progress``, ``speed_settings`` and the experiment's own). ``data``: what the trainer takes
    after the config (a data set, or a tuple of them), not loaded again."""
    if isinstance(scale, str):
        if scale not in scales:
            raise ValueError(f"--scale {scale}: the {options.get('name')} experiment has the scales "
                             f"{', '.join(scales)}")
        scale = scales[scale]
    driving = {name: options.pop(name) for name in _DRIVE_OPTIONS if name in options}
    given = () if data is None else data if isinstance(data, tuple) else (data,)
    return drive(spec_class(given=given, **options), scale, **driving)
