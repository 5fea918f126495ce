"""Stage 6, report: report.json, report.md and report.html with the sign-off, from the earlier stages' folders.

Its key holds the profile's content and every build option but where the build lives and how the
profile was named: moving a build, or naming the same profile by its file, re-runs nothing.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .verify import artifacts as exported

NAME = "report"
# Every earlier stage's folder that exists. One this build did not run (a curve or tasks folder left
# by an earlier build with other options) is keyed but not reported: the options say what counts.
INPUTS = ("plan", "compress", "curve", "export", "verify", "tasks", "zeroshot", "profile")
WRITES = ("report.json", "report.md", "report.html")
CURVE_NOTE = ("perplexity measured in the deployed runtime on the evaluation text; speed and memory projected by "
              "the calibrated planner")


@dataclass(frozen=True)
class Config:
    profile: dict
    settings: dict  # every BuildOptions field but `out` and `profile`


def versions() -> dict:
    names = ["fusedeploy", "torch", "transformers", "optimum", "onnxruntime", "onnxruntime_genai", "onnx", "gguf",
             "llama_cpp_python"]
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[n] = None
    out["python"] = platform.python_version()
    return out


def zero_shot_record(scored: dict, deployed: dict) -> dict:
    """The zeroshot stage's figures, with a note on what was scored: the deployed artifact in its runtime."""
    if scored["dense_artifact"] == scored["deployed_artifact"]:
        note = (f"Nothing was removed: the deployed artifact `{deployed['name']}` is the dense model, scored once in "
                f"{deployed['runtime']} for both rows.")
    else:
        note = (f"Both are the build's artifacts at {deployed['runtime']} {deployed['precision']}, each served by "
                "`fusedeploy serve` and scored by lm-eval on the runtime's own prompt log-probabilities: the "
                "retention is compression's effect at the deployed precision.")
    return {**scored, "deployed_runtime": deployed["runtime"], "deployed_precision": deployed["precision"],
            "note": note}


def run(config: Config, inputs: dict, work: Path) -> dict:
    from ...data.split import BuildTexts
    from ...profiling.planner import Efficiency, ModelShape
    from ...profiling.report import projection_check, signoff, write_report
    from ...profiling.schema import Profile
    from ..curve import project_points

    opts, profile = config.settings, Profile.model_validate(config.profile)
    plan, export, verified, profiled = inputs["plan"], inputs["export"], inputs["verify"], inputs["profile"]
    shape = ModelShape(**plan.settings["shape"])
    k = export.settings["k"]
    rows = []
    for name, a in exported(export).items():
        rows.append({"name": name, **a.to_dict(root=export.path), "verify": verified.outputs[name],
                     **profiled.outputs["artifacts"][name]})
    deployed = next(r for r in rows if r["variant"] == "compressed" and r["runtime"] == profile.runtime)
    ran = [inputs[n] for n in INPUTS if n in inputs and not isinstance(inputs[n], Path)]
    report = {
        "model": opts["model"], "profile": config.profile, "plan": plan.outputs,
        "compression": {**inputs["compress"].outputs, "deployed_removed_blocks": k}, "artifacts": rows,
        "host": profiled.outputs["host"],
        "settings": {**opts, "profile": profile.name, "out": str(plan.path.parent)},
        "stages": {m.manifest["stage"]: {"wall_s": m.manifest["wall_s"], "skipped": m.skipped} for m in ran},
        "versions": versions(), "machine": {"platform": platform.platform(), **profiled.outputs["host"]},
    }
    dense = next((r for r in rows if r["variant"] == "dense" and r["runtime"] == deployed["runtime"]
                  and r["precision"] == deployed["precision"]), None)
    report["evaluation_text"] = BuildTexts(opts["calib"], opts["eval_data"]).describe(deployed["verify"])
    if opts["max_sparsity"] is not None:
        c = inputs["curve"].outputs
        points = project_points(c["points"], shape, profile, c["precision"], Efficiency(**c["efficiency"]))
        report["quality_curve"] = {"points": [p.to_dict() for p in points], "chosen_k": k,
                                   "efficiency": c["efficiency"], "note": CURVE_NOTE}
    if opts["eval_tasks"] is not None:
        report["task_accuracy"] = inputs["tasks"].outputs
    if opts.get("zero_shot") is not None:
        report["zero_shot"] = zero_shot_record(inputs["zeroshot"].outputs, deployed)
    report["serving"] = profiled.outputs.get("serving")
    prompt = opts["prompt_tokens"] or profile.prompt_tokens
    report["projection"] = projection_check(shape, profile, deployed, dense or deployed, k, prompt,
                                            opts["new_tokens"], report["host"])
    report["signoff"] = signoff(report["profile"], deployed, [r["verify"] for r in rows], dense=dense,
                                tasks=report.get("task_accuracy"), serving=report["serving"],
                                zero_shot=report.get("zero_shot"))
    write_report(report, work)
    return {"result": report["signoff"]["result"], "files": ["report.json", "report.html", "report.md"]}
