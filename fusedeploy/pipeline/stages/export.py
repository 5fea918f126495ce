"""Stage 3, export: the deployed model and, beside it, the dense one at the same precision, per runtime.

A curve's chosen point short of the deepest is first rebuilt, exactly, from the compression run's
kept steps into this stage's folder (`model/`), and exported from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ... import formats, outputs
from ...formats import Artifact
from . import model_folder, relative_to_build, say

log = logging.getLogger(__name__)
NAME = "export"
INPUTS = ("compressed", "model")  # compressed: the compress stage
WRITES = ("model", "compressed-*", "dense-*")  # REBUILT and the targets' names
REBUILT = "model"  # this stage's copy of a curve point short of the deepest


@dataclass(frozen=True)
class Config:
    targets: tuple[tuple[str, str, str, str], ...]  # (name, variant, runtime, precision) per artifact
    k: int  # blocks removed in the deployed model (0: the deployed artifact is the dense model)


def export_artifact(model_dir: str, runtime: str, precision: str, dest: Path) -> Path:
    """Export one artifact into a stage's work folder; one finished there earlier is reused.

    Exports are atomic, so a file at its final name is complete: a build
    killed mid-export resumes with the artifacts it had already written.
    """
    rt = formats.runtime(runtime)
    target = dest if not rt.suffix or dest.suffix == rt.suffix else dest.with_name(dest.name + rt.suffix)
    with outputs.claim(target):  # clears half-written temporaries of a killed export
        if outputs.is_ours(target):
            log.info("export %s already finished; reused", target.name)
            return target
        path = rt.export(model_dir, target, precision)
        outputs.mark(path, f"{rt.name}-export")
        return path


def materialize(run_dir: Path, k: int, dest: Path) -> None:
    """The checkpoint after k removals, rebuilt from the run's steps (bitwise what a run stopped at k writes)."""
    from ...compress import steps
    from ...compress.driver import write_output

    with outputs.claim(dest):
        if not outputs.is_ours(dest):  # a killed export stage may have finished it already
            model, tokenizer = steps.rebuild(run_dir, k)
            write_output(model, tokenizer, steps.step_report(run_dir, k), dest)


def run(config: Config, inputs: dict, work: Path) -> dict:
    compress = inputs["compressed"]
    root = compress.path.parent
    deepest = len(compress.outputs.get("removed_blocks") or [])
    k = config.k
    compressed_run = compress.path / compress.outputs["model_dir"] if k else None
    rebuilt = 0 < k < deepest
    if rebuilt:
        materialize(compressed_run, k, work / REBUILT)
    dense = model_folder(inputs["model"])
    made = {}
    for name, variant, runtime, precision in config.targets:
        say(f"export {name}")
        if variant == "dense" or not k:  # nothing removed: the deployed artifact is the dense model
            source = reference = dense
        elif rebuilt:
            source, reference = work / REBUILT, root / NAME / REBUILT
        else:
            source = reference = compressed_run
        path = export_artifact(str(source), runtime, precision, work / name)
        made[name] = Artifact(path, runtime, precision, variant, relative_to_build(reference, root)).to_dict(root=work)
    return made
