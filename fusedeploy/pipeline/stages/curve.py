"""Stage 2b, curve: every kept step of the compression scored in the deployed runtime.

The dense artifact gives the perplexity every point is divided by and this host's efficiency
(the calibration of the planner's projection). Which point to deploy is chosen after this stage,
from its points and the profile's budgets, so new budgets never re-measure the curve.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ... import outputs
from . import model_folder, say

NAME = "curve"
INPUTS = ("compress", "model", "eval_data")  # eval_data: only when the text is a local file or folder
WRITES = ("dense-*", "curve.json", ".curve-*")


@dataclass(frozen=True)
class Config:
    precision: str
    text: dict  # curve.EvalText: spec, part, ctx, windows (the sign-off's own windows)
    prompt: int
    new_tokens: int
    runs: int
    runtime: str


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...models.loading import load_config, load_tokenizer, resolve_model
    from ...profiling.planner import ModelShape
    from ..curve import EvalText, host_efficiency, quality_points, runtime_perplexity
    from .export import export_artifact

    text, precision = EvalText(**config.text), config.precision
    source = resolve_model(str(inputs["model"]))
    shape = ModelShape.from_config(load_config(source))
    say(f"curve: dense {config.runtime} {precision} (perplexity and this host's efficiency)")
    dense = export_artifact(str(model_folder(inputs["model"])), config.runtime, precision, work / f"dense-{precision}")
    dense_ppl = runtime_perplexity(dense, load_tokenizer(source), text)
    eff, host, measured = host_efficiency(dense, shape, config.runtime, precision, config.prompt, config.new_tokens,
                                          config.runs)
    rows = quality_points(inputs["compress"].path / "model", config.runtime, precision, text, work, dense_ppl, say)
    outputs.remove_entry(dense)
    result = {"precision": precision, "dense_perplexity": dense_ppl, "points": rows,
              "efficiency": asdict(eff), "host": host.to_dict(), "dense_measured": measured["metrics"]}
    (work / "curve.json").write_text(json.dumps(result, indent=2))
    return result
