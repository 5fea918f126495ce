"""The budgets a hardware profile can set: one table, read by the planner, the quality curve and the sign-off.

Each row names the profile's budget key, which way the figure must lie, the figure it limits (the key
under which candidates, curve points and profiled artifacts carry it), whether that figure is
projected onto the target or measured, and its unit. Everything that judges a figure against a budget
(`meets`), says how far a budget is missed (`shortfall`) or picks the least compression that meets
them all (`least_compression`) goes through this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar

from ..judge import at_least, at_most


@dataclass(frozen=True)
class Budget:
    name: str  # the key under the profile's `budgets:`
    op: str  # "<=": the figure must not exceed the budget; ">=": it must reach it
    figure: str  # the figure judged, as candidates / curve points / profiled artifacts name it
    basis: str  # "projected" onto the target from this host's measurements, or "measured" as it is
    unit: str
    label: str  # in messages: "memory 5.10/4 GB"
    digits: int  # decimals a figure is given to in messages

    def meets(self, figure: float, limit: float) -> bool:
        """NaN or infinite figures never meet a budget."""
        return at_most(figure, limit) if self.op == "<=" else at_least(figure, limit)

    def miss(self, figure: float, limit: float) -> float:
        """How far `figure` is past `limit` as a ratio (negative when it meets it with room)."""
        if self.op == "<=":
            return figure / limit - 1
        return limit / figure - 1 if figure else math.inf

    def describe(self, figure: float, limit: float) -> str:
        """'memory 5.10/4 GB': the figure against the budget, for a message."""
        return f"{self.label} {figure:.{self.digits}f}/{limit:g} {self.unit}"


BUDGETS: tuple[Budget, ...] = (
    #      profile key                  op    figure                   basis        unit     label        digits
    Budget("max_memory_gb",             "<=", "memory_gb",             "projected", "GB",    "memory",        2),
    Budget("min_decode_tokens_per_s",   ">=", "decode_tokens_per_s",   "projected", "tok/s", "decode",        1),
    Budget("max_time_to_first_token_s", "<=", "time_to_first_token_s", "projected", "s",     "first token",   2),
    Budget("max_perplexity_ratio",      "<=", "perplexity_ratio",      "measured",  "x dense", "perplexity",  2),
    Budget("max_accuracy_drop",         "<=", "accuracy_drop",         "measured",  "",      "accuracy drop", 3),
    Budget("min_zero_shot_retention",   ">=", "zero_shot_retention",   "measured",  "x dense", "zero-shot retention", 3),
    Budget("min_serving_tokens_per_s",  ">=", "serving_tokens_per_s",  "projected", "tok/s", "served output", 1),
)
BY_NAME = {b.name: b for b in BUDGETS}
# What the planner projects for every candidate before anything is built; every profile sets these.
PROJECTED = tuple(b for b in BUDGETS if b.figure in ("memory_gb", "decode_tokens_per_s", "time_to_first_token_s"))


def limits(budgets) -> dict[str, float]:
    """The budgets a profile sets (a Budgets model or a dict), by name; unset ones left out."""
    get = budgets.get if isinstance(budgets, Mapping) else (lambda name: getattr(budgets, name, None))
    return {b.name: get(b.name) for b in BUDGETS if get(b.name) is not None}


def meets(figures: Mapping[str, float], budgets) -> dict[str, bool]:
    """Per budget that is set and whose figure is known: does the figure meet it."""
    return {b.name: b.meets(figures[b.figure], lim) for name, lim in limits(budgets).items()
            for b in (BY_NAME[name],) if figures.get(b.figure) is not None}


def shortfall(figures: Mapping[str, float], budgets) -> float:
    """How far the worst budget is missed, as a ratio (0 when every budget is met)."""
    misses = [b.miss(figures[b.figure], lim) for name, lim in limits(budgets).items()
              for b in (BY_NAME[name],) if figures.get(b.figure) is not None]
    return max(0.0, *misses)


T = TypeVar("T")


def least_compression(options: Iterable[T], fits: Callable[[T], bool],
                      shortfall_of: Callable[[T], float]) -> tuple[T | None, T]:
    """The first option meeting every budget, options given from least to most compressed, and the closest.

    The closest is the option whose worst budget is missed by the smallest ratio, the least compressed
    among equals; it is what an error names when nothing fits.
    """
    options = list(options)
    chosen = next((o for o in options if fits(o)), None)
    return chosen, min(options, key=shortfall_of)
