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
def progress_task(description: str, total: int):
    """Yield `advance(done, total, status="")` for a library callback."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")

        def update(done: int, total_: int | None = None, status: str = "") -> None:
            progress.update(task, completed=done, total=total_ or total, status=status)

        yield update
