"""Stage 4c, zeroshot (optional): HellaSwag-style accuracy of the deployed artifact and its dense peer, in their runtime.

Both are served by `fusedeploy serve` and scored by lm-eval's `local-completions` model on the
runtime's own prompt log-probabilities (docs/serving.md, "Scoring with lm-eval through the
server"): the deployed compressed artifact and the dense artifact exported beside it at the same
runtime and precision, so that the retention, like the perplexity ratio, is compression's effect
at the deployed precision. Nothing removed: the deployed artifact is the dense model, scored once.

Keyed on the data file's content (an input), the subset's size and seed, the runtime and the export stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import in_build, relative_to_build, say
from .verify import artifacts

NAME = "zeroshot"
INPUTS = ("export", "zero_shot")  # zero_shot: the HellaSwag-format JSONL file
WRITES = ("zeroshot.json",)


@dataclass(frozen=True)
class Config:
    items: int  # the subset's size (fewer when the file holds fewer)
    seed: int  # the permutation's seed
    runtime: str  # the deployed artifact's runtime (the profile's); it and its dense peer are scored there


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...evaluate.zero_shot import Subset, artifact_side, compare

    root = inputs["export"].path.parent
    exported = artifacts(inputs["export"])
    name, deployed = next((n, a) for n, a in exported.items() if a.variant == "compressed"
                          and a.runtime == config.runtime)
    peer = next(((n, a) for n, a in exported.items() if a.variant == "dense" and a.runtime == deployed.runtime
                 and a.precision == deployed.precision), None)
    tokenizer = in_build(root, deployed.reference)  # compression keeps the tokenizer: one for both
    say(f"zeroshot: lm-eval on {config.items} items through fusedeploy serve, {name}"
        + (f" and {peer[0]}" if peer else ""))
    compressed = artifact_side(deployed, name, "deployed artifact", tokenizer)
    if peer is None:  # nothing removed: the deployed artifact is the dense model
        dense, compressed = artifact_side(deployed, name, "deployed artifact (the dense model)", tokenizer), None
    else:
        dense = artifact_side(peer[1], peer[0], "dense artifact", tokenizer)
    summary, detail = compare(dense, compressed, Subset(str(inputs["zero_shot"]), config.items, config.seed))
    for side in ("dense", "compressed"):  # recorded relative to the build (a build may move)
        summary[side] = {**summary[side], "model": relative_to_build(Path(summary[side]["model"]), root)}
    detail.update(dense=summary["dense"], compressed=summary["compressed"])
    (work / "zeroshot.json").write_text(json.dumps(detail, indent=2))
    return {**summary, "artifact_scored": True, "deployed_artifact": name,
            "dense_artifact": peer[0] if peer else name}
