"""Stopping a compress run at a chosen point, as a Ctrl-C or a killed process would.

The resume tests need a run that dies after its state is saved and before it finishes; the
progress callback is the one place every method reports through, so it is where they stop it.
"""

from __future__ import annotations


class Interrupt(Exception):
    """Raised from the progress callback; a test expects it with `pytest.raises(Interrupt)`."""


def stop_at(kind: str, done: int | None = None):
    """A progress callback that raises `Interrupt` at the first `kind` event numbered `done`
    (any number when `done` is None)."""

    def progress(event, count, total, status=""):
        if event == kind and (done is None or count == done):
            raise Interrupt

    return progress
