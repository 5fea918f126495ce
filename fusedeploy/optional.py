"""Optional dependencies: whether one is usable with what is installed, and what to install if not.

Optimum's ONNX exporter (`optimum-onnx`) is outside the core: its releases
lag transformers (0.1.0 declares `transformers<4.58`), and only
`export onnx --engine optimum` and reading the folders it writes need it.
"""

from __future__ import annotations

import importlib.metadata

from .errors import UserError

OPTIMUM_DIST = "optimum-onnx"
OPTIMUM_EXTRA = "fusedeploy[optimum]"


def _unmet_requirement(dist: str) -> str | None:
    """The first requirement of `dist` that the installed packages do not meet, as text; None if all are met."""
    from packaging.requirements import Requirement

    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{req} (not installed)"
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            return f"{req} (installed: {req.name} {have})"
    return None


def require_optimum(why: str) -> None:
    """A one-line UserError, before any work, unless an Optimum ONNX exporter that fits this environment is installed."""
    try:
        version = importlib.metadata.version(OPTIMUM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{why} needs Optimum's ONNX exporter, which is not installed: pip install '{OPTIMUM_EXTRA}' "
                        "(it needs an optimum-onnx release that supports the installed transformers), "
                        "or use the default --engine genai") from None
    unmet = _unmet_requirement(OPTIMUM_DIST)
    if unmet:
        raise UserError(f"{why} needs Optimum's ONNX exporter, but {OPTIMUM_DIST} {version} requires {unmet}; "
                        f"install a release that supports it (pip install -U '{OPTIMUM_EXTRA}') "
                        "or use the default --engine genai")
