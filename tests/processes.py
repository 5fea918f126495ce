"""Child processes read safely: a child can exit between being listed and having its command line read."""

from __future__ import annotations

from typing import Callable

import psutil


def children_where(pid: int, wanted: Callable[[list[str]], bool]) -> list[psutil.Process]:
    """Live processes under `pid` whose argv satisfies `wanted`; children that already exited are skipped."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in kids:
        try:
            if wanted(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:  # includes ZombieProcess: exited, not yet reaped
            continue
    return found
