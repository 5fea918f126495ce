"""Parity of an exported artifact with its PyTorch reference, each in its real runtime.

Both sides score the same token windows (the reference's HF tokenizer, no
special tokens); the artifact runs in llama.cpp (GGUF) or ONNX Runtime
(ONNX folder). Tolerances depend on the artifact's precision and live with
it in `fusedeploy.formats`; a precision the catalogue does not know is an
error, never judged by the loosest limits.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fusedeploy.data import eval_windows, load_text, tokenize
from fusedeploy.data import text_part as data_part
from fusedeploy.errors import UserError
from fusedeploy.evaluate import TorchBackend, window_nll
from fusedeploy.formats import Artifact
from fusedeploy.judge import at_least, at_most, finite


@dataclass
class VerifyResult:
    artifact: str
    runtime: str
    export_type: str
    precision: str
    windows: int
    ctx: int
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    top1_agreement: float
    ppl_artifact: float
    ppl_reference: float
    ppl_ratio: float
    tolerances: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verify_artifact(artifact: str | os.PathLike, reference: str, text_spec: str = "builtin", ctx: int = 512,
                    max_windows: int | None = 4, progress=None, text_part: str | None = None) -> VerifyResult:
    """Run `artifact` and the PyTorch `reference` on the same windows of `text_spec` and compare.

    `text_part="eval"` reads only the evaluation part of a text that calibration also uses (data.split).
    """
    from fusedeploy.models.loading import load_model

    path = Path(artifact)
    if not path.exists():
        raise UserError(f"artifact not found: {artifact}")
    art = Artifact.at(path, reference=reference)
    limits = art.spec.limits
    model, tokenizer, _ = load_model(reference, device="cpu", dtype="float32")
    text = load_text(text_spec, purpose="eval")
    windows = eval_windows(tokenize(tokenizer, data_part(text, text_part) if text_part else text), ctx, max_windows)
    backend = art.open(n_ctx=ctx)
    ref = TorchBackend(model)
    max_abs = max_rel = 0.0
    abs_sum, count, agree = 0.0, 0, 0
    nll_a = nll_r = 0.0
    scored = 0
    nonfinite = {"artifact": 0, "reference": 0}  # logits that are NaN or infinite, per side
    try:
        for i, window in enumerate(windows):
            ids = window.tolist()
            a, r = backend.logits(ids), ref.logits(ids)
            if a.shape != r.shape:
                raise UserError(f"artifact returns logits of shape {a.shape}, reference {r.shape}: "
                                "different vocabulary?")
            nonfinite["artifact"] += int(a.size - np.isfinite(a).sum())
            nonfinite["reference"] += int(r.size - np.isfinite(r).sum())
            diff = np.abs(a - r)
            # the maxima are of the finite part; NaN/Inf is counted in `nonfinite` and fails on its own
            finite_diff = diff[np.isfinite(diff)]
            window_max = float(finite_diff.max()) if finite_diff.size else 0.0
            finite_ref = np.abs(r[np.isfinite(r)])
            max_abs = max(max_abs, window_max)
            max_rel = max(max_rel, window_max / max(float(finite_ref.max()) if finite_ref.size else 0.0, 1e-6))
            abs_sum += float(diff.sum())
            count += diff.size
            agree += int((a.argmax(-1) == r.argmax(-1)).sum())
            na, n = window_nll(a, window)
            nr, _ = window_nll(r, window)
            nll_a += na
            nll_r += nr
            scored += n
            if progress:
                progress(i + 1, len(windows))
    finally:
        if hasattr(backend, "close"):
            backend.close()
    ppl_a, ppl_r = float(np.exp(nll_a / scored)), float(np.exp(nll_r / scored))
    result = VerifyResult(
        artifact=str(path), runtime=art.runtime, export_type=art.precision, precision=art.spec.tolerance,
        windows=len(windows), ctx=int(windows.shape[1]), max_abs_diff=max_abs, max_rel_diff=max_rel,
        mean_abs_diff=abs_sum / count, top1_agreement=agree / (len(windows) * windows.shape[1]),
        ppl_artifact=ppl_a, ppl_reference=ppl_r, ppl_ratio=ppl_a / ppl_r, tolerances=limits)
    total = int(windows.numel()) * int(a.shape[-1])
    for side, bad in nonfinite.items():
        if bad:  # NaN/Inf is a failure with its own reason, never hidden by max() or `nan > limit`
            result.failures.append(f"{bad} of {total} {side} logits are NaN or infinite")
    if not at_most(result.max_rel_diff, limits["max_rel_diff"]):
        result.failures.append(f"max relative logit diff {result.max_rel_diff:.3g} > {limits['max_rel_diff']}")
    if not at_most(result.mean_abs_diff, limits["mean_abs_diff"]):
        result.failures.append(f"mean |logit diff| {result.mean_abs_diff:.3g} > {limits['mean_abs_diff']}")
    if not at_least(result.top1_agreement, limits["top1_min"]):
        result.failures.append(f"top-1 agreement {result.top1_agreement:.3f} < {limits['top1_min']}")
    if not at_most(result.ppl_ratio, limits["ppl_ratio_max"]):
        why = "not a finite number" if not finite(result.ppl_ratio) else f"> {limits['ppl_ratio_max']}"
        result.failures.append(f"perplexity ratio {result.ppl_ratio:.4f} {why}")
    return result
