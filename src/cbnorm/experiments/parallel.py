"""Several runs of a reproduction at once, each in its own process on the same device.

    histories, failures = run_parallel(runs, configure, workers=4, data=data)

``runs`` are ``(key, title)`` pairs and ``configure(key)`` gives each run's :class:`TrainConfig`, as for
:func:`~cbnorm.experiments.runs.run_each`, which runs them one after another. Here up to ``workers``
runs train at once, each in a fresh (spawned) process that calls the same
:func:`~cbnorm.experiments.train.train` the sequential path calls: it writes its own run folder,
checkpoints every epoch and resumes from it as before, so a run computes the same numbers whichever
path runs it. A run that raises, or whose process dies, is recorded in ``failures`` and the others
go on. Each process's output goes to ``logs/<run folder name>.log`` beside the run folders, and one
screen shows every run's epoch, test accuracy and seconds per epoch, refreshed in place on a
terminal (in a log, each run's line as it changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, TextIO

__all__ = ["ProgressDisplay", "RunState", "run_parallel"]


@dataclass
class RunState:
    """One run of :func:`run_parallel`: ``status`` is waiting, running, done or failed; ``history`` the
    epochs its run folder holds so far (its ``metrics.json``)."""

    key: Hashable
    title: str
    config: object
    status: str = "waiting"
    process: object = None
    connection: object = None
    history: list = field(default_factory=list)
    error: Optional[str] = None
    headline: tuple[str, str, str] = ("test_acc", "test acc", "{:6.2%}")  # the metric shown: key, label, format

    def line(self, width: int = 32) -> str:
        """The run's line, its title padded to ``width`` characters."""
        epochs = self.config.epochs
        if not self.history:
            return f"{self.title:<{width}} {'':>13} {'':>15} {'':>12}  {self.status}"
        last = self.history[-1]
        key, label, form = self.headline
        value = next((row[key] for row in reversed(self.history) if key in row), None)  # FID: only some epochs
        shown = f"{label} {'—' if value is None else form.format(value)}"
        per_epoch = sum(row["seconds"] for row in self.history) / len(self.history)
        return (f"{self.title:<{width}} epoch {last['epoch']:>3}/{epochs:<3} {shown} "
                f"{per_epoch:7.1f} s/epoch  {self.status}" + (f": {self.error}" if self.error else ""))


class ProgressDisplay:
    """Every run's line on one screen, redrawn in place on a terminal; elsewhere (a log) each line as it changes."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream, self.shown = stream, []
        self.redraw = stream.isatty()

    def update(self, states: Sequence[RunState]) -> None:
        counts = {s: sum(state.status == s for state in states) for s in ("running", "done", "failed", "waiting")}
        width = max([32, *(len(state.title) for state in states)])  # one column, whatever the titles
        lines = [", ".join(f"{n} {s}" for s, n in counts.items())] + [state.line(width) for state in states]
        if lines == self.shown:
            return
        if not self.redraw:  # a log: the runs' lines that changed
            self.stream.write("".join(line + "\n" for line in lines[1:] if line not in self.shown))
        else:
            if self.shown:
                self.stream.write(f"\x1b[{len(self.shown)}F\x1b[J")  # back to the first line shown, clear below
            self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.shown = lines


def _train_in_child(trainer, config, data: tuple, connection, log: str) -> None:
    """A spawned process's work: ``trainer(config, *data)``, then ``("ok", history)`` or ``("failed", error)`` sent."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            connection.send(("ok", trainer(config, *data)))
        except BaseException as error:  # noqa: BLE001 - whatever stops the run is its failure, told to the parent
            traceback.print_exc()
            connection.send(("failed", f"{type(error).__name__}: {error}"))


def _message(connection) -> Optional[tuple[str, object]]:
    """What the child sent, if it has; ``None`` while it has not, or when it died without sending."""
    try:
        return connection.recv() if connection.poll() else None
    except EOFError:
        return None


def _read_history(out: str) -> list:
    from .metrics import read_metrics

    try:
        return read_metrics(out)[1]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def run_parallel(
    runs: Sequence[tuple[Hashable, str]],
    configure: Callable[[Hashable], object],
    workers: int,
    data=None,
    display: Optional[ProgressDisplay] = None,
    poll_seconds: float = 0.2,
    trainer: Optional[Callable] = None,
    headline: tuple[str, str, str] = RunState.headline,
) -> tuple[dict, dict]:
    """Train ``configure(key)`` for each ``(key, title)`` of ``runs``, ``workers`` processes at a time.

    Returns ``(histories, failures)`` by key, as :func:`~cbnorm.experiments.runs.run_each` does. Each
    process calls ``trainer(config, data)`` (default :func:`~cbnorm.experiments.train.train`), or
    ``trainer(config, *data)`` when ``data`` is a tuple (AdaMatch's source and target); ``trainer`` must be
    a module-level function, which a spawned process can import. ``data`` (e.g. a
    :class:`~cbnorm.experiments.data.Dataset`) reaches every process through shared memory (``/dev/shm``,
    often small in containers); without it (``None`` or ``()``) each process loads its data itself. The
    display shows the ``headline`` metric ``(key, label, format)`` of each run. An interrupt stops every
    process (their checkpoints stay).
    """
    import torch.multiprocessing as mp

    if trainer is None:
        from .train import train as trainer
    data = data if isinstance(data, tuple) else () if data is None else (data,)
    if workers < 1:
        raise ValueError(f"expected a positive number of parallel runs, got {workers}")
    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    display = display or ProgressDisplay()
    states = [RunState(key, title, dataclasses.replace(configure(key), progress=False), headline=headline)
              for key, title in runs]
    waiting, histories, failures = deque(states), {}, {}
    running: list[RunState] = []
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                state = waiting.popleft()
                log = Path(state.config.out).parent.parent / "logs" / f"{Path(state.config.out).name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                state.connection, child = context.Pipe(duplex=False)
                state.process = context.Process(target=_train_in_child,
                                            args=(trainer, state.config, data, child, str(log)))
                state.process.start()
                child.close()
                state.status = "running"
                running.append(state)
            for state in list(running):
                state.history = _read_history(state.config.out)
                message = _message(state.connection)
                if message is None and state.process.is_alive():
                    continue
                state.process.join()
                if message is None:
                    message = ("failed", f"its process ended with exit code {state.process.exitcode} "
                                         f"(see logs/{Path(state.config.out).name}.log)")
                state.status, result = message
                if state.status == "ok":
                    state.status, histories[state.key] = "done", result
                    state.history = result
                else:
                    state.error = failures[state.key] = result
                running.remove(state)
            display.update(states)
            if running:
                time.sleep(poll_seconds)
    finally:
        for state in running:  # an interrupt, or an error here: no process outlives the call
            state.process.terminate()
            state.process.join()
    return histories, failures

