"""The quality-vs-sparsity curve of one iterative compression, and the least compression on it that meets every budget.

The compress stage ran to the deepest point with its steps kept (`compress.steps`): the model after k
removals is rebuilt bitwise as a run stopped at k would have left it. Every point is exported to the
deployed runtime and its perplexity measured there, on the same evaluation windows the sign-off
reads; its memory, decode speed and time to first token are the planner's projection, calibrated
with the efficiency the dense artifact reached on this host (measured here, in its own process).
The planner then takes the least compression whose point meets every budget, quality included.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..errors import BudgetsUnmet
from ..models.loading import save_tokenizer
from ..outputs import remove_entry
from ..profiling import budgets as budget_table
from ..profiling.planner import Candidate, estimate


@dataclass
class EvalText:
    """Which windows every point is scored on: the sign-off's own."""

    spec: str
    part: str | None
    ctx: int
    windows: int


@dataclass
class CurvePoint:
    """The planner's candidate after k removals, with its perplexity measured in the deployed runtime."""

    k: int
    removed_blocks: list[int]  # original numbering, in removal order
    perplexity: float
    perplexity_ratio: float
    candidate: Candidate  # the calibrated planner's projection at this sparsity and precision
    meets: dict[str, bool]  # every budget the profile sets that a point has a figure for

    sparsity = property(lambda self: self.candidate.sparsity)
    precision = property(lambda self: self.candidate.quant)
    memory_gb = property(lambda self: self.candidate.memory_gb)
    decode_tokens_per_s = property(lambda self: self.candidate.decode_tokens_per_s)
    time_to_first_token_s = property(lambda self: self.candidate.time_to_first_token_s)

    @property
    def fits(self) -> bool:
        return all(self.meets.values())

    def figures(self) -> dict[str, float]:
        return {**self.candidate.figures(), "perplexity_ratio": self.perplexity_ratio}

    def to_dict(self) -> dict:
        return {"k": self.k, "removed_blocks": self.removed_blocks, "sparsity": self.sparsity,
                "precision": self.precision, "perplexity": self.perplexity, "perplexity_ratio": self.perplexity_ratio,
                "memory_gb": self.memory_gb, "decode_tokens_per_s": self.decode_tokens_per_s,
                "time_to_first_token_s": self.time_to_first_token_s, "meets": dict(self.meets), "fits": self.fits}


def runtime_perplexity(artifact: Path, tokenizer, text: EvalText) -> float:
    """Perplexity of an artifact in its own runtime on the evaluation windows."""
    from ..data import eval_windows, load_text, text_part, tokenize
    from ..evaluate import perplexity

    raw = load_text(text.spec, purpose="eval")
    windows = eval_windows(tokenize(tokenizer, text_part(raw, text.part) if text.part else raw), text.ctx,
                           text.windows)
    backend = formats.Artifact.at(artifact).open(n_ctx=text.ctx)
    try:
        return float(perplexity(backend, windows).ppl)
    finally:
        if hasattr(backend, "close"):
            backend.close()


def _export_and_score(model_dir: Path, runtime: str, precision: str, tokenizer, text: EvalText, scratch: Path) -> float:
    rt = formats.runtime(runtime)
    artifact = rt.export(str(model_dir), scratch / "point", precision)
    try:
        return runtime_perplexity(artifact, tokenizer, text)
    finally:
        remove_entry(artifact)


def host_efficiency(dense_artifact: Path, shape, runtime: str, precision: str, prompt_tokens: int, new_tokens: int,
                    runs: int):
    """What fraction of this host's peaks the dense artifact reaches (planner.Efficiency), and its measurement."""
    from ..profiling.measure import calibrate_host, efficiency, measure_artifact

    host = calibrate_host()
    measured = measure_artifact(dense_artifact, prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs)
    eff = efficiency(shape, measured, host, runtime, precision, shape.blocks,
                     source=f"dense {runtime} {precision} measured on this host")
    return eff, host, measured


def quality_points(run_dir: Path, runtime: str, precision: str, text: EvalText, work: Path, dense_ppl: float,
                   say=lambda msg: None) -> list[dict]:
    """Perplexity in the deployed runtime after k = 0 (dense, given) .. the deepest kept step removals."""
    from ..compress import steps

    last = steps.step_report(run_dir, steps.available(run_dir)[-1])
    removed, blocks = last["removed_blocks"], last["blocks_before"]
    rows = [{"k": 0, "removed_blocks": [], "sparsity": 0.0, "precision": precision, "perplexity": dense_ppl,
             "perplexity_ratio": 1.0}]
    with tempfile.TemporaryDirectory(prefix=".curve-", dir=work) as scratch:
        scratch = Path(scratch)
        for k, model, tokenizer in steps.replay(run_dir):
            if k == 0:
                continue
            say(f"curve: {k} of {blocks} blocks removed")
            folder = scratch / "model"
            shutil.rmtree(folder, ignore_errors=True)
            model.save_pretrained(folder)
            save_tokenizer(tokenizer, folder)
            ppl = _export_and_score(folder, runtime, precision, tokenizer, text, scratch)
            rows.append({"k": k, "removed_blocks": removed[:k], "sparsity": k / blocks, "precision": precision,
                         "perplexity": ppl, "perplexity_ratio": ppl / dense_ppl})
    return rows


def project_points(rows: list[dict], shape, profile, precision: str, eff) -> list[CurvePoint]:
    """Each measured point with the calibrated planner's memory and speed, judged against every budget."""
    points = []
    for r in rows:
        c = estimate(shape, profile, r["sparsity"], precision, eff)
        point = CurvePoint(r["k"], r["removed_blocks"], r["perplexity"], r["perplexity_ratio"], c, {})
        point.meets = budget_table.meets(point.figures(), profile.budgets)
        points.append(point)
    return points


def least_compression(points: list[CurvePoint], profile) -> CurvePoint:
    """The point with the fewest removed blocks that meets every budget; BudgetsUnmet names the closest.

    The rule is the planner's (budgets.least_compression); the closest is the point whose worst budget
    is missed by the smallest ratio.
    """
    chosen, closest = budget_table.least_compression(
        sorted(points, key=lambda p: p.k), lambda p: p.fits,
        lambda p: budget_table.shortfall(p.figures(), profile.budgets))
    if chosen is not None:
        return chosen
    missed = ", ".join(name for name, ok in closest.meets.items() if not ok)
    raise BudgetsUnmet(
        f"no point of the quality curve (0..{max(p.k for p in points)} blocks removed) meets every budget; closest is "
        f"{closest.k} blocks removed (sparsity {closest.sparsity:.3f}): perplexity {closest.perplexity_ratio:.2f}x "
        f"dense, decode {closest.decode_tokens_per_s:.1f} tok/s, first token {closest.time_to_first_token_s:.2f} s, "
        f"memory {closest.memory_gb:.2f} GB (projected); misses {missed}")
