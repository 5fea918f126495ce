"""Stage 4, verify: each artifact against the PyTorch model it was exported from (logits, top-1, perplexity)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...formats import Artifact
from . import in_build, say

NAME = "verify"
INPUTS = ("export", "eval_data")  # eval_data: only when the text is a local file or folder
WRITES = ("verify.json",)


@dataclass(frozen=True)
class Config:
    data: str  # the evaluation text
    part: str | None  # "eval" when calibration and evaluation share one text
    ctx: int
    windows: int


def artifacts(export) -> dict[str, Artifact]:
    """The export stage's artifacts by name (`export`: its Upstream)."""
    return {name: Artifact.from_dict(a, root=export.path) for name, a in export.outputs.items()}


def run(config: Config, inputs: dict, work: Path) -> dict:
    from exporters.verify import verify_artifact

    root = inputs["export"].path.parent
    results = {}
    for name, a in artifacts(inputs["export"]).items():
        say(f"verify {name}")
        r = verify_artifact(a.path, str(in_build(root, a.reference)), config.data, ctx=config.ctx,
                            max_windows=config.windows, text_part=config.part)
        results[name] = {**r.to_dict(), "passed": r.passed}
    (work / "verify.json").write_text(json.dumps(results, indent=2, default=str))
    return results
