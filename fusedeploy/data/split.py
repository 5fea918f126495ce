"""One text, two disjoint parts: calibration and evaluation never read the same words.

When a build calibrates and evaluates on the same source, a model distilled on that text would be
judged on it too and look better than it is. The text is cut once, at a line break near a fixed
fraction, so the two parts share no character and hence no token window. The cut depends only on
the text, so every stage and every re-run cuts it the same way.
"""

from __future__ import annotations

from ..errors import UserError

EVAL_FRACTION = 0.2  # the tail of the text that only evaluation reads
PARTS = ("calib", "eval")


def cut_point(text: str, eval_fraction: float = EVAL_FRACTION) -> int:
    """Index where the evaluation part starts: the first line start at or after the fraction."""
    target = int(len(text) * (1 - eval_fraction))
    nl = text.find("\n", target)
    return len(text) if nl < 0 else nl + 1


def text_part(text: str, part: str, eval_fraction: float = EVAL_FRACTION) -> str:
    if part not in PARTS:
        raise UserError(f"unknown text part {part!r}; choose from {', '.join(PARTS)}")
    cut = cut_point(text, eval_fraction)
    return text[:cut] if part == "calib" else text[cut:]


def describe(text: str, part: str, eval_fraction: float = EVAL_FRACTION) -> dict:
    """What a report says about the text a number came from."""
    cut = cut_point(text, eval_fraction)
    lo, hi = (0, cut) if part == "calib" else (cut, len(text))
    return {"part": part, "chars": [lo, hi], "of_chars": len(text)}
