"""Comparisons that treat NaN and infinity as failures.

`nan > limit` is False and `max(0.0, nan)` is 0.0, so plain comparisons pass
a broken measurement. Every PASS/FAIL in verify, the planner and the sign-off
goes through these.
"""

from __future__ import annotations

import math


def finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def at_most(value, limit: float) -> bool:
    """value <= limit, and value is a finite number (an infinite limit means no limit)."""
    return finite(value) and float(value) <= limit


def at_least(value, limit: float) -> bool:
    """value >= limit, and value is a finite number."""
    return finite(value) and float(value) >= limit


def reason(name: str, value, op: str, limit: float) -> str:
    """Why a check failed, in words: the non-finite case named as such."""
    if not finite(value):
        return f"{name} is {value} (not a finite number)"
    return f"{name} {float(value):.4g} is not {op} {limit:g}"
