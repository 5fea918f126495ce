"""Stage 4b, tasks (optional): lm-eval accuracy of the dense and the deployed PyTorch models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import in_build, say
from .verify import artifacts

NAME = "tasks"
INPUTS = ("export", "tasks", "model")  # tasks: the lm-eval task YAML or folder
WRITES = ("tasks.json",)


@dataclass(frozen=True)
class Config:
    k: int  # blocks removed in the deployed model (0: nothing to compare)


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...evaluate.tasks import compare_models

    compressed = None
    if config.k:  # the PyTorch model the deployed artifact was exported from
        deployed = next(a for a in artifacts(inputs["export"]).values() if a.variant == "compressed")
        compressed = in_build(inputs["export"].path.parent, deployed.reference)
    say("tasks: lm-eval on the dense and the compressed model")
    result = compare_models(str(inputs["model"]), compressed, str(inputs["tasks"]))
    (work / "tasks.json").write_text(json.dumps(result, indent=2))
    return result
