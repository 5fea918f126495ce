"""Stage 2, compress (+ fold): remove `sparsity` of the blocks; nothing to do when the plan removes none.

With a quality curve the run keeps every step, so that any point short of the deepest can be rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ... import outputs
from . import compress_progress, host_memory, model_folder

NAME = "compress"
INPUTS = ("model", "calib")  # calib: only when the calibration text is a local file or folder
WRITES = ("model", "model.state")  # the checkpoint and its resumable state


@dataclass(frozen=True)
class Config:
    sparsity: float  # removed blocks / blocks (the curve's deepest point)
    method: str
    recipe: str | None
    calib: str
    calib_part: str | None  # "calib" when calibration and evaluation share one text
    device: str | None
    dtype: str | None
    keep_steps: bool


def run(config: Config, inputs: dict, work: Path) -> dict:
    model = inputs["model"]
    if config.sparsity == 0:
        return {"model_dir": str(model_folder(model)), "compressed": False}
    from ...compress import CompressJob, compress_model, has_resumable_state, load_recipe

    target = work / "model"
    with outputs.claim(target):  # clears a half-written checkpoint of a killed run
        if outputs.is_ours(target):  # killed after the checkpoint was written: reuse it
            summary = json.loads((target / "compression.json").read_text())
        else:
            job = CompressJob(str(model), target, config.sparsity, method=config.method, calib=config.calib,
                              calib_part=config.calib_part, settings=load_recipe(config.recipe),
                              resume=has_resumable_state(target), device=config.device, dtype=config.dtype,
                              keep_steps=config.keep_steps, max_host_memory=host_memory())
            summary = compress_model(job, progress=compress_progress())
        outputs.mark(target, "compressed-model")
    return {"model_dir": "model", "compressed": True, "removed_blocks": summary.get("removed_blocks")}
