"""Stage 1, plan: the candidates projected onto the profile before any compute is spent.

With a quality curve (`max_sparsity`), the table runs over every point of the curve at the highest
precision that can meet the budgets at the deepest point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

NAME = "plan"
INPUTS = ("model",)  # the model's files: its shape is in the config, its content in the key
WRITES = ("plan.json",)


@dataclass(frozen=True)
class Config:
    profile: dict  # Profile.model_dump(): every figure and budget the projection reads
    sparsity: float | None
    max_sparsity: float | None
    quant: str | None
    shape: dict  # ModelShape fields


def curve_levels(blocks: int, max_sparsity: float | None) -> tuple[float, ...] | None:
    """Sparsities of the curve's points (k / blocks, k = 0 .. the deepest), or None without a curve.

    The build's preflight has checked `max_sparsity` (flow.check_curve)."""
    from ...profiling.planner import removed_for

    if max_sparsity is None:
        return None
    return tuple(k / blocks for k in range(removed_for(blocks, max_sparsity) + 1))


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...profiling.planner import ModelShape, plan
    from ...profiling.schema import Profile

    shape, profile = ModelShape(**config.shape), Profile.model_validate(config.profile)
    levels = curve_levels(shape.blocks, config.max_sparsity)
    if levels:
        quant = plan(shape, profile, sparsity=levels[-1], quant=config.quant).chosen.quant
        result = plan(shape, profile, quant=quant, sparsities=levels)
    else:
        result = plan(shape, profile, sparsity=config.sparsity, quant=config.quant)
    (work / "plan.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result.to_dict()
