"""What every training loop of the harness shares: the device and its precision, RNG states, and the
run folder with its resumable checkpoint, metrics files and progress table.

    folder = RunFolder(out, asdict(config), resume=config.resume, run_control=RUN_CONTROL, table=TABLE)
    ...build the model and optimiser from the config...
    history = folder.restore(device, model=model, optimizer=optimizer)    # [] for a new run
    folder.start(description)                                             # config.json, header, rows so far
    for epoch in range(len(history) + 1, epochs + 1):
        row = {"epoch": epoch, ...}
        folder.save(row, device, model=model, optimizer=optimizer)        # atomic checkpoint, metrics, a row

A checkpoint holds ``config``, the ``state_dict()`` of every object passed by name, every RNG state
(``rng``) and the ``history``, written atomically after each epoch: a crash loses at most one epoch,
and a run continued with ``resume=True`` goes on exactly as if it had never stopped, as long as each
epoch draws its data order from ``(seed, epoch)`` (the loaders do) and everything else from the
global RNGs saved here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

import cbnorm

from .data import atomic_write
from .distributed import Ranks, gather_objects
from .metrics import COLUMNS, format_header, format_row, write_metrics

__all__ = ["RUN_CONTROL", "RunFolder", "RunSettings", "autocast", "check_fields", "clustered", "command_line",
           "config_diff", "grad_scaler", "keyed_generator", "option", "resolve_device", "results_folder", "rng_states",
           "run_each", "set_rng_states", "write_results"]

T = TypeVar("T")

# Config fields that may change when a run is resumed: they do not change what is computed.
RUN_CONTROL = frozenset({"data_dir", "device", "threads", "out", "resume", "progress", "eval_batch_size"})


def option(text: str, **kwargs):
    """A config dataclass field with its command-line help (``cbnorm`` makes one flag per field)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunSettings:
    """The fields of a run's config that say where and how it runs; a config dataclass inherits them."""

    device: str = option("auto (CUDA when present), cpu, cuda, ...", default="auto")
    amp: bool = option("mixed precision (bfloat16 autocast)", default=False)
    threads: int = option("CPU threads for torch (0: torch's default)", default=0)
    resume: bool = option("continue the run in --out from its checkpoint", default=False)
    progress: bool = option("progress bar within epochs", default=True)


def check_fields(config, checks: Iterable[tuple[str, bool, str]]) -> None:
    """Raise :class:`ValueError` for the first ``(field, ok, expected)`` of ``checks`` that is not ok."""
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{type(config).__name__}: expected {name} to be {expected}, got {getattr(config, name)!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA (the ``LOCAL_RANK`` device) when present, else the CPU; any other name as torch reads it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool, dtype: Optional[torch.dtype] = None):
    """Mixed precision on ``device``: ``dtype``, by default float16 on CUDA and bfloat16 elsewhere."""
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def grad_scaler(enabled: bool):
    """Loss scaling for float16 autocast (CUDA); a no-op scaler otherwise."""
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def clustered(ids: Optional[Tensor]):
    """:func:`cbnorm.cluster_context` for ``ids``; nothing when they are ``None``."""
    return contextlib.nullcontext() if ids is None else cbnorm.cluster_context(ids)


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator that depends only on ``keys`` (e.g. ``(seed, epoch)``): what a resumed run redraws."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def rng_states(device: torch.device) -> dict:
    """Every global RNG state (torch, CUDA on ``device``, numpy, python), storable with ``weights_only``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def config_diff(saved: dict, config: dict, run_control: Iterable[str] = ()) -> list[str]:
    """The fields (outside ``run_control``) where ``config`` differs from a saved config."""
    skip = set(run_control)
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in config.items() if k not in skip and saved.get(k) != v]


class RunFolder:
    """One run's folder: ``config.json``, ``metrics.csv``/``metrics.json`` and ``checkpoint.pt``.

    Opening a folder that holds a checkpoint raises :class:`FileExistsError` unless ``resume``, and
    :class:`ValueError` if ``config`` differs from the saved one outside ``run_control`` (fields that
    do not change what is computed). ``columns`` are the ``metrics.csv`` columns, ``table`` the
    progress table (see :func:`~cbnorm.experiments.metrics.format_row`); of several ``ranks`` only rank 0
    writes or prints, and each resumes with its own RNG states.
    """

    def __init__(
        self,
        out: Union[str, os.PathLike],
        config: dict,
        *,
        resume: bool,
        run_control: Iterable[str] = (),
        columns: Sequence[str] = COLUMNS,
        table: Optional[Sequence[tuple]] = None,
        ranks: Optional[Ranks] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.out = Path(out)
        self.path = self.out / "checkpoint.pt"
        self.ranks = ranks or Ranks()
        is_main = self.ranks.is_main
        self.config, self.resume, self.columns, self.table, self.is_main = config, resume, columns, table, is_main
        self.log = log if is_main else (lambda *args, **kwargs: None)
        self.history: list[dict] = []
        self._checkpoint = None
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.out} already holds a run ({self.path}); pass --resume to continue it "
                                      f"or choose another --out")
            self._checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
            changed = config_diff(self._checkpoint["config"], config, run_control)
            if changed:
                raise ValueError(f"cannot resume {self.out} with a different config: {'; '.join(changed)}")

    @property
    def saved(self) -> Optional[dict]:
        """The checkpoint being resumed (before :meth:`restore`), else ``None``."""
        return self._checkpoint

    def restore(self, device: torch.device, **stateful) -> list[dict]:
        """Load the checkpoint into the objects named as in :meth:`save`, and the RNG states; the history so far."""
        if self._checkpoint is not None:
            for name, obj in stateful.items():
                obj.load_state_dict(self._checkpoint[name])
            per_rank = self._checkpoint.get("rng_ranks") or []  # a run resumed on as many ranks gets each its own
            same = len(per_rank) == self.ranks.world_size
            set_rng_states(per_rank[self.ranks.rank] if same else self._checkpoint["rng"], device)
            self.history = self._checkpoint["history"]
            self._checkpoint = None
        return self.history

    def start(self, description: str) -> None:
        """Write ``config.json`` and the metrics so far; print the description, the header and the rows so far."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            content = json.dumps(self.config, indent=1) + "\n"
            atomic_write(self.out / "config.json", lambda f: f.write(content.encode()))
            write_metrics(self.out, self.config, self.history, self.columns)
        self.log(description)
        if self.history:
            self.log(f"resumed after epoch {len(self.history)}")
        elif self.resume:
            self.log(f"no checkpoint in {self.out}: starting at epoch 1")
        self.log(format_header(self.table))
        for row in self.history:
            self.log(format_row(row, self.table))

    def save(self, row: dict, device: torch.device, **stateful) -> None:
        """Append ``row`` to the history, then save the checkpoint (atomically), the metrics, and print the row.
        Under several ranks every rank calls this (their RNG states are gathered); rank 0 writes."""
        self.history.append(row)
        rng = gather_objects(rng_states(device), self.ranks)
        if not self.is_main:
            return
        state = {"config": self.config, **{name: obj.state_dict() for name, obj in stateful.items()},
                 "rng": rng[0], "rng_ranks": rng if self.ranks.distributed else None, "history": self.history}
        atomic_write(self.path, lambda f: torch.save(state, f))
        write_metrics(self.out, self.config, self.history, self.columns)
        self.log(format_row(row, self.table))


# -- reproductions: many runs, one table -----------------------------------------------------------


def results_folder(out: Union[str, os.PathLike], experiment: str, scale: str) -> Path:
    """``OUT/results/<experiment>/<scale>/``, created: where a reproduction writes its runs, table and figures."""
    root = Path(out) / "results" / experiment / scale
    root.mkdir(parents=True, exist_ok=True)
    return root


def command_line(command: Optional[str] = None) -> str:
    """The command that produced a reproduction's results, for its table: ``command``, else this process's."""
    return command or "cbnorm " + " ".join(sys.argv[1:])


def run_each(runs: Sequence[tuple[Hashable, str]], start: Callable[[Hashable], T]) -> tuple[dict, dict]:
    """``start(key)`` for each ``(key, title)`` in turn, after a ``[i/n] title`` line; returns
    ``(results, failures)`` by key.

    One failed run must not lose the others: its error, as ``"TypeName: message"``, goes into
    ``failures`` for the table, and the next run starts. (An interrupt still stops them all.)
    """
    results, failures = {}, {}
    for i, (key, title) in enumerate(runs, 1):
        print(f"\n[{i}/{len(runs)}] {title}")
        try:
            results[key] = start(key)
        except Exception as error:
            failures[key] = f"{type(error).__name__}: {error}"
            print(f"run failed: {failures[key]}")
    return results, failures


def write_results(root: Path, table: str, results: dict, figures: Callable[[], None]) -> Path:
    """A reproduction's ``table.md`` and ``summary.json``, then its figures (``figures()``); prints the
    table and returns ``root``."""
    (root / "table.md").write_text(table)
    (root / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    figures()
    print(f"\n{table}\nresults in {root}")
    return root
