"""Stage 4c, zeroshot (optional): HellaSwag-style accuracy of the dense and the deployed model, and the retention.

The model scored for "deployed" is the PyTorch checkpoint the deployed artifact was exported from
(lm-eval through transformers, float32 on the CPU), not the GGUF or ONNX artifact in its runtime:
FuseDeploy wires no lm-eval backend for llama.cpp or ONNX Runtime. The record says so, and how
closely the artifact follows that checkpoint is the verify stage's figure.

Keyed on the data file's content (an input), the subset's size and seed, and the export stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import in_build, relative_to_build, say
from .verify import artifacts

NAME = "zeroshot"
INPUTS = ("export", "zero_shot", "model")  # zero_shot: the HellaSwag-format JSONL file
WRITES = ("zeroshot.json",)
DEVICE, DTYPE = "cpu", "float32"


@dataclass(frozen=True)
class Config:
    k: int  # blocks removed in the deployed model (0: nothing to compare)
    items: int  # the subset's size (fewer when the file holds fewer)
    seed: int  # the permutation's seed


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...evaluate.zero_shot import Subset, compare_zero_shot

    root = inputs["export"].path.parent
    compressed = None
    if config.k:  # the PyTorch model the deployed artifact was exported from
        deployed = next(a for a in artifacts(inputs["export"]).values() if a.variant == "compressed")
        compressed = in_build(root, deployed.reference)
    say(f"zeroshot: lm-eval on {config.items} items, dense and compressed")
    summary, detail = compare_zero_shot(inputs["model"], compressed, Subset(str(inputs["zero_shot"]), config.items,
                                                                            config.seed), device=DEVICE, dtype=DTYPE)
    for side in ("dense", "compressed"):  # a model inside the build is recorded relative to it (a build may move)
        summary[side] = {**summary[side], "model": relative_to_build(Path(summary[side]["model"]), root)}
    detail.update(dense=summary["dense"], compressed=summary["compressed"])
    (work / "zeroshot.json").write_text(json.dumps(detail, indent=2))
    return summary
