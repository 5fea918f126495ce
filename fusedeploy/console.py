"""Shared Rich console and progress bars (stderr, so stdout stays parseable)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


@contextmanager
def _lazy_progress():
    """A Progress started only at its first update: an error before any work prints no empty bar line."""
    holder: list[Progress] = []

    def get() -> Progress:
        if not holder:
            holder.append(make_progress())
            holder[0].start()
        return holder[0]

    try:
        yield get
    finally:
        if holder:
            holder[0].stop()


@contextmanager
def progress_task(description: str, total: int):
    """Yield `advance(done, total, status="")` for a library callback."""
    with _lazy_progress() as get:
        task: list[int] = []

        def update(done: int, total_: int | None = None, status: str = "") -> None:
            if not task:
                task.append(get().add_task(description, total=total, status=""))
            get().update(task[0], completed=done, total=total_ or total, status=status)

        yield update


@contextmanager
def compression_progress():
    """Yield a `progress(kind, done, total, status)` callback drawing one bar per kind of step."""
    labels = {"iteration": "blocks removed", "score": "scoring candidates", "epoch": "distillation epoch",
              "heal": "healing steps"}
    with _lazy_progress() as get:
        tasks: dict[str, int] = {}

        def progress(kind: str, done: int, total: int, status: str = "") -> None:
            bar = get()
            if kind not in tasks:
                tasks[kind] = bar.add_task(labels.get(kind, kind), total=total, status="")
            bar.update(tasks[kind], completed=done, total=total, status=status)

        yield progress
