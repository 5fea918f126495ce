"""Shared Rich console and progress (stderr, so stdout stays parseable).

On a terminal, progress is Rich bars. Anywhere else (a CI log, `nohup`, `2> file`) bars
would print nothing until the end, so progress becomes plain lines instead, as pip and
llama.cpp do when not interactive: one when a step starts, one when it finishes, and one
at least every `PLAIN_EVERY_S` seconds in between (a heartbeat thread repeats the latest
state when the work itself reports nothing for that long, e.g. a long distillation epoch).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

PLAIN_EVERY_S = 30.0  # the longest a log goes without a progress line while work runs
COMPRESSION_LABELS = {"calibration": "writing calibration samples", "iteration": "blocks removed", "score": "scoring candidates",
                      "search": "searching block sets", "epoch": "distillation epoch",
                      "heal": "healing steps"}


def make_progress(console_: Console | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console_ or console, transient=False,
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class _Step:
    label: str
    done: int = 0
    total: int = 0
    status: str = ""
    started: float = 0.0  # when the step was first reported ...
    done0: int = 0  # ... and how far it was then: the rate (and estimate) counts from there
    reported_done: int | None = None  # `done` of the last line printed for this step


@dataclass
class PlainProgress:
    """Progress as plain log lines. `clock` and `write` are injectable so tests need no tty and no waiting."""

    write: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    every: float = PLAIN_EVERY_S
    steps: dict[str, _Step] = field(default_factory=dict)
    last_line: float | None = None
    current: str | None = None  # the step updated last: what a heartbeat repeats
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def line(self, step: _Step, now: float) -> str:
        elapsed = now - step.started
        if step.total and step.done >= step.total:
            eta = "done"
        elif step.done > step.done0 and elapsed > 0:
            eta = f"~{_duration(elapsed / (step.done - step.done0) * (step.total - step.done))} left"
        else:
            eta = "estimating"
        pct = f" ({100 * step.done // step.total}%)" if step.total else ""
        status = f"  {step.status}" if step.status else ""
        return f"{step.label}: {step.done}/{step.total}{pct}  elapsed {_duration(elapsed)}  {eta}{status}"

    def _emit(self, step: _Step, now: float) -> None:
        self.write(self.line(step, now))
        self.last_line = now
        step.reported_done = step.done

    def update(self, key: str, label: str, done: int, total: int, status: str = "") -> None:
        with self._lock:
            now = self.clock()
            step = self.steps.get(key)
            restarted = step is not None and (done < step.done or 0 < step.total <= step.done)
            if step is None or restarted:  # new, or begun again (the next iteration's epochs)
                step = self.steps[key] = _Step(label, started=now, done0=done)
                first = True
            else:
                first = False
            step.done, step.total, step.status = done, total, status
            self.current = key
            finished = total > 0 and done >= total and step.reported_done != done
            due = self.last_line is None or now - self.last_line >= self.every
            if first or finished or (due and step.reported_done != done):
                self._emit(step, now)

    def tick(self) -> None:
        """Repeat the latest state when nothing was printed for `every` seconds (called by the heartbeat)."""
        with self._lock:
            now = self.clock()
            if self.current is None or self.last_line is None or now - self.last_line < self.every:
                return
            step = self.steps[self.current]
            if step.total and step.done >= step.total:
                return
            self._emit(step, now)

    @contextmanager
    def heartbeat(self, poll_s: float = 1.0):
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(poll_s):
                self.tick()

        thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


@contextmanager
def _progress_sink(console_: Console | None = None, clock: Callable[[], float] = time.monotonic,
                   every: float = PLAIN_EVERY_S):
    """Yield `update(key, label, done, total, status)`: Rich bars on a terminal, plain lines elsewhere.

    The Rich display starts at the first update, so an error before any work prints no empty bar."""
    con = console_ or console
    if not con.is_terminal:
        plain = PlainProgress(lambda text: con.print(text, markup=False, highlight=False, soft_wrap=True),
                              clock=clock, every=every)
        with plain.heartbeat():
            yield plain.update
        return
    holder: list[Progress] = []
    tasks: dict[str, int] = {}

    def update(key: str, label: str, done: int, total: int, status: str = "") -> None:
        if not holder:
            holder.append(make_progress(con))
            holder[0].start()
        bar = holder[0]
        if key not in tasks:
            tasks[key] = bar.add_task(label, total=total, status="")
        bar.update(tasks[key], completed=done, total=total, status=status)

    try:
        yield update
    finally:
        if holder:
            holder[0].stop()


@contextmanager
def progress_task(description: str, total: int, **sink):
    """Yield `advance(done, total=None, status="")` for a library callback."""
    with _progress_sink(**sink) as update:
        def advance(done: int, total_: int | None = None, status: str = "") -> None:
            update(description, description, done, total_ or total, status)

        yield advance


@contextmanager
def compression_progress(**sink):
    """Yield a `progress(kind, done, total, status)` callback: one bar (or line series) per kind of step."""
    with _progress_sink(**sink) as update:
        def progress(kind: str, done: int, total: int, status: str = "") -> None:
            update(kind, COMPRESSION_LABELS.get(kind, kind), done, total, status)

        yield progress
