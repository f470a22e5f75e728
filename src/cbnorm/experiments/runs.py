"""What every training loop of the harness shares: the device and its precision, RNG states, and the
run folder with its resumable checkpoint, metrics files and progress table.

    folder = RunFolder(out, asdict(config), resume=config.resume, overwrite=config.overwrite,
                       run_control=RUN_CONTROL, table=TABLE)                # locks the folder
    ...build the model and optimiser from the config...
    history = folder.restore(device, model=model, optimizer=optimizer)    # [] for a new run
    folder.start(description)                                             # config.json, header, rows so far
    for epoch in range(len(history) + 1, epochs + 1):
        row = {"epoch": epoch, ...}
        folder.save(row, device, model=model, optimizer=optimizer)        # atomic checkpoint, metrics, a row

A checkpoint holds ``config``, the ``state_dict()`` of every object passed by name, every RNG state
(``rng``) and the ``history``, written atomically after each epoch, the one it replaces kept as
``checkpoint-previous.pt`` (used if the latest is damaged): a crash loses at most one epoch,
and a run continued with ``resume=True`` goes on exactly as if it had never stopped, as long as each
epoch draws its data order from ``(seed, epoch)`` (the loaders do) and everything else from the
global RNGs saved here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import sys
import weakref
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

import cbnorm

from .config import RUN_CONTROL, RunSettings, check_fields, option
from .data import atomic_write
from .distributed import Ranks, gather_objects
from .metrics import COLUMNS, format_header, format_row, write_metrics

__all__ = ["RUN_CONTROL", "RunFolder", "RunSettings", "RunsFailed", "autocast", "check_fields", "clustered",
           "command_line", "config_diff", "has_checkpoint", "keyed_generator", "option",
           "resolve_device", "results_folder", "rng_states", "run_each", "set_rng_states", "write_results"]

T = TypeVar("T")


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
    """The fields (outside ``run_control``) where ``config`` differs from a saved config. A field the saved
    config lacks (one added to the config class since) is not compared."""
    skip = set(run_control)
    return [f"{k}: {saved[k]!r} -> {v!r}" for k, v in config.items() if k not in skip and k in saved and saved[k] != v]


CHECKPOINT, PREVIOUS_CHECKPOINT, LOCK = "checkpoint.pt", "checkpoint-previous.pt", "run.lock"
_OWN_FILES = {"config.json", "metrics.csv", "metrics.json", LOCK}  # what a run writes before its first checkpoint
# Everything the harness's runs write into their folder: what --overwrite replaces, nothing else.
_RUN_OUTPUTS = (CHECKPOINT, PREVIOUS_CHECKPOINT, "config.json", "metrics.csv", "metrics.json", "inference.json",
                "snapshots", "samples")


def has_checkpoint(out: Union[str, os.PathLike]) -> bool:
    """Whether the run folder ``out`` holds a checkpoint to resume (the latest or the previous epoch's)."""
    return (Path(out) / CHECKPOINT).exists() or (Path(out) / PREVIOUS_CHECKPOINT).exists()


def _saved_run(out: Path) -> tuple[Optional[dict], list[dict]]:
    """``(config, history)`` of the ``metrics.json`` in ``out``; ``(None, [])`` when there is none to read."""
    try:
        content = json.loads((out / "metrics.json").read_text())
        return content["config"], list(content["history"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _acquire_lock(out: Path, log: Callable[[str], None]) -> dict:
    """Create ``out/run.lock`` holding this process's pid and host; refuse when another live process holds it.

    A lock left by a process that is no longer running (on this host) is taken over; one held by this
    very process (a run opened again after an exception or Ctrl-C in the same session) is kept.
    """
    path, me = out / LOCK, {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, me["host"]  # unreadable: no process can be holding it for long
            if (pid, host) == (me["pid"], me["host"]):
                return me
            if pid is not None and (host != me["host"] or _alive(pid)):
                raise FileExistsError(
                    f"{out} is in use by another run (process {pid} on {host}, see {path}); wait for it to end or "
                    f"choose another --out. If that process is gone, delete {path}") from None
            log(f"taking over the lock of a run that is no longer running ({path}, process {pid})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return me


def _release_lock(path: Path, owner: dict) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()) == owner:
            path.unlink()


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:limit]}"


class RunFolder:
    """One run's folder: ``config.json``, ``metrics.csv``/``metrics.json``, ``checkpoint.pt`` (and the
    previous epoch's, ``checkpoint-previous.pt``) and ``run.lock`` while the run is open.

    What is in the folder is never replaced silently:

    * a checkpoint is continued with ``resume``, replaced with ``overwrite``, and otherwise raises
      :class:`FileExistsError`; resuming with a config that differs from the saved one outside
      ``run_control`` (fields that do not change what is computed) raises :class:`ValueError`, except
      more ``epochs`` when ``epochs_fixed`` is ``None`` (the reason the epoch count may not change, such
      as a schedule that spans the epochs);
    * a folder with results but no checkpoint (e.g. a committed run), or with files of its own, raises
      :class:`FileExistsError` unless ``overwrite``; with ``resume``, a finished run (all its epochs in
      ``metrics.json``, the same config) is reused as it is (:attr:`finished`);
    * a damaged checkpoint is reported in one line and the previous epoch's is used; when neither
      loads, :class:`ValueError` says so;
    * ``run.lock`` (pid and host) refuses a second process writing into the same folder; a lock left by
      a process that has died is taken over.

    ``columns`` are the ``metrics.csv`` columns, ``table`` the progress table (see
    :func:`~cbnorm.experiments.metrics.format_row`); of several ``ranks`` only rank 0 locks, writes or
    prints, and each resumes with its own RNG states. :meth:`close` (or leaving a ``with`` block)
    releases the lock, as does the end of the process.
    """

    def __init__(
        self,
        out: Union[str, os.PathLike],
        config: dict,
        *,
        resume: bool,
        overwrite: bool = False,
        run_control: Iterable[str] = (),
        epochs_fixed: Optional[str] = "its schedule may depend on the number of epochs",
        columns: Sequence[str] = COLUMNS,
        table: Optional[Sequence[tuple]] = None,
        ranks: Optional[Ranks] = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if resume and overwrite:
            raise ValueError("expected one of resume (continue the run) and overwrite (replace it), got both")
        self.out = Path(out)
        self.path, self.previous = self.out / CHECKPOINT, self.out / PREVIOUS_CHECKPOINT
        self.ranks = ranks or Ranks()
        is_main = self.ranks.is_main
        self.config, self.resume, self.columns, self.table, self.is_main = config, resume, columns, table, is_main
        self.log = log if is_main else (lambda *args, **kwargs: None)
        self.history: list[dict] = []
        self.finished = False  # a finished run without a checkpoint, reused: nothing to train or write
        self._checkpoint = None
        self._keep_previous = True  # whether checkpoint.pt is sound, to be kept as the previous one
        self._unlock = lambda: None
        created = is_main and not self.out.exists()
        if is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            owner = _acquire_lock(self.out, self.log)
            self._unlock = weakref.finalize(self, _release_lock, self.out / LOCK, owner)
        try:
            self._open(overwrite, set(run_control), epochs_fixed)
        except BaseException:
            self.close()
            if created:
                with contextlib.suppress(OSError):
                    self.out.rmdir()  # only if we made it and nothing was written
            raise

    def _open(self, overwrite: bool, run_control: set, epochs_fixed: Optional[str]) -> None:
        out = self.out
        if overwrite:
            replaced = [out / name for name in _RUN_OUTPUTS if (out / name).exists()]
            if replaced and self.is_main:
                self.log(f"--overwrite: replacing {', '.join(p.name for p in replaced)} in {out}")
                for path in replaced:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            return
        if has_checkpoint(out):
            if not self.resume:
                raise FileExistsError(f"{out} already holds a run ({self.path}); pass --resume to continue it, "
                                      f"--overwrite to replace it, or choose another --out")
            self._checkpoint = self._load()
            self._check_config(self._checkpoint["config"], len(self._checkpoint["history"]), run_control, epochs_fixed)
            return
        saved, done = _saved_run(out)
        if self.resume and saved is not None and done and len(done) == self.config.get("epochs") \
                and not config_diff(saved, self.config, run_control):
            self.history, self.finished = done, True
            self.log(f"{out}: a finished run ({len(done)} epochs) without a checkpoint; reused as it is")
            return
        if done:
            raise FileExistsError(f"{out} holds the results of a run ({len(done)} epochs in metrics.json) but no "
                                  f"checkpoint to continue from; pass --overwrite to replace them or choose another "
                                  f"--out")
        entries = out.iterdir() if out.is_dir() else ()  # other ranks may look before rank 0 has made it
        others = sorted(p.name for p in entries if p.name not in _OWN_FILES and not p.name.endswith(".part"))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(f"{out} is not empty ({shown}) and holds no run; pass --overwrite to write into it "
                                  f"or choose another --out")

    def _load(self) -> dict:
        """The checkpoint, else the previous epoch's (saying why in one line); :class:`ValueError` if neither loads."""
        errors = []
        for path in (self.path, self.previous):
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not (isinstance(state, dict) and {"config", "history", "rng"} <= set(state)):
                    raise ValueError("not a checkpoint written by cbnorm")
            except Exception as error:  # truncated, empty, garbage: any failure means this file cannot be used
                errors.append(f"{path} ({_first_line(error)})")
                continue
            if errors:
                self.log(f"{errors[0]} is damaged; continuing from {path.name} (after epoch {len(state['history'])})")
                self._keep_previous = False
            return state
        raise ValueError(f"no readable checkpoint in {self.out}: {'; '.join(errors)}; pass --overwrite to start the "
                         f"run again")

    def _check_config(self, saved: dict, epochs_done: int, run_control: set, epochs_fixed: Optional[str]) -> None:
        changed = config_diff(saved, self.config, run_control | {"epochs"})
        if changed:
            raise ValueError(f"cannot resume {self.out} with a different config: {'; '.join(changed)}")
        before, after = saved.get("epochs"), self.config.get("epochs")
        if before == after:
            return
        if epochs_fixed is not None:
            raise ValueError(f"cannot resume {self.out} with epochs {before} -> {after}: {epochs_fixed}; "
                             f"start a new run (another --out, or --overwrite)")
        if after < epochs_done:
            raise ValueError(f"cannot resume {self.out} with epochs {before} -> {after}: it has trained {epochs_done}")
        self.log(f"epochs {before} -> {after}")

    def close(self) -> None:
        """Release the folder's lock (once; also done when the object is collected or the process ends)."""
        self._unlock()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def saved(self) -> Optional[dict]:
        """The checkpoint being resumed (before :meth:`restore`), else ``None``."""
        return self._checkpoint

    def restore(self, device: torch.device, **stateful) -> list[dict]:
        """Load the checkpoint into the objects named as in :meth:`save`, and the RNG states; the history so far.

        A loss scaler the checkpoint holds no state of (the run had no float16 autocast until now, or was saved
        before scalers were checkpointed) starts afresh; any other object missing is a :class:`ValueError`,
        raised before anything is loaded."""
        if self._checkpoint is not None:
            fresh = {name for name, obj in stateful.items()
                     if isinstance(obj, torch.amp.GradScaler) and not self._checkpoint.get(name)}
            missing = sorted(set(stateful) - set(self._checkpoint) - fresh)
            if missing:
                raise ValueError(f"cannot resume {self.out}: expected its checkpoint to hold {sorted(stateful)}, "
                                 f"got no {', '.join(missing)}; pass --overwrite to start the run again")
            for name, obj in stateful.items():
                if name not in fresh:
                    obj.load_state_dict(self._checkpoint[name])
            per_rank = self._checkpoint.get("rng_ranks") or []  # a run resumed on as many ranks gets each its own
            same = len(per_rank) == self.ranks.world_size
            set_rng_states(per_rank[self.ranks.rank] if same else self._checkpoint["rng"], device)
            self.history = self._checkpoint["history"]
            self._checkpoint = None
        return self.history

    def start(self, description: str) -> None:
        """Write ``config.json`` and the metrics so far; print the description, the header and the rows so far."""
        if self.is_main and not self.finished:
            content = json.dumps(self.config, indent=1) + "\n"
            atomic_write(self.out / "config.json", lambda f: f.write(content.encode()))
            write_metrics(self.out, self.config, self.history, self.columns)
        self.log(description)
        if self.history and not self.finished:
            self.log(f"resumed after epoch {len(self.history)}")
        elif self.resume and not self.history:
            self.log(f"no checkpoint in {self.out}: starting at epoch 1")
        self.log(format_header(self.table))
        for row in self.history:
            self.log(format_row(row, self.table))

    def save(self, row: dict, device: torch.device, **stateful) -> None:
        """Append ``row`` to the history, then save the checkpoint (atomically, the one it replaces kept as
        ``checkpoint-previous.pt``), the metrics, and print the row. Under several ranks every rank calls
        this (their RNG states are gathered); rank 0 writes."""
        self.history.append(row)
        rng = gather_objects(rng_states(device), self.ranks)
        if not self.is_main:
            return
        state = {"config": self.config, **{name: obj.state_dict() for name, obj in stateful.items()},
                 "rng": rng[0], "rng_ranks": rng if self.ranks.distributed else None, "history": self.history}
        atomic_write(self.path, lambda f: torch.save(state, f), backup=self.previous if self._keep_previous else None)
        self._keep_previous = True
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
    ``failures`` for the table, and the next run starts. An interrupt, or a missing module (which
    every run would miss alike), stops them all.
    """
    results, failures = {}, {}
    for i, (key, title) in enumerate(runs, 1):
        print(f"\n[{i}/{len(runs)}] {title}")
        try:
            results[key] = start(key)
        except ModuleNotFoundError:
            raise
        except Exception as error:
            failures[key] = f"{type(error).__name__}: {error}"
            print(f"run failed: {failures[key]}")
    return results, failures


class RunsFailed(RuntimeError):
    """Some runs of a reproduction failed; its table and figures were written all the same (``root``)."""

    def __init__(self, root: Path, failures: dict) -> None:
        key, error = next(iter(failures.items()))
        runs = "1 run" if len(failures) == 1 else f"{len(failures)} runs"
        super().__init__(f"{runs} failed (see {root / 'table.md'}); the first, {key}: {error}")
        self.root, self.failures = root, failures


def write_results(root: Path, table: str, results: dict, figures: Callable[[], None],
                  failures: Optional[dict] = None) -> Path:
    """A reproduction's ``table.md`` and ``summary.json``, then its figures (``figures()``); prints the
    table and returns ``root``. Then, if any run failed (``failures``, as from :func:`run_each`), raises
    :class:`RunsFailed`: a command that lost runs must not look successful."""
    (root / "table.md").write_text(table)
    (root / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    figures()
    print(f"\n{table}\nresults in {root}")
    if failures:
        raise RunsFailed(root, failures)
    return root
