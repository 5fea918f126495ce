"""`fusedeploy build`: plan -> compress -> export -> verify -> profile -> report, one build folder.

Each step is a stage (see stages.py): re-running with the same inputs and
settings skips finished stages; an interrupted one resumes. A stage's key is
everything it reads -- settings, the profile's content, the folders of the
stages before it, the content of text files it is given -- so no stage can
return a result computed from other inputs (Olive caches passes the same way).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .. import formats, outputs, preflight
from ..builtin import DEFAULT_CALIB, DEFAULT_MODEL
from ..errors import UserError
from ..formats import Artifact
from .stages import Stage, relative_to_build as _relative, run_stage

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    profile: str
    model: str = DEFAULT_MODEL
    out: str = "build"
    recipe: str | None = None  # compression recipe: quick, cpu, paper
    method: str = "fusegpt"
    sparsity: float | None = None
    quant: str | None = None
    calib: str = DEFAULT_CALIB
    eval_data: str = "builtin"
    max_ppl_ratio: float | None = None  # overrides the profile's budgets.max_perplexity_ratio
    max_sparsity: float | None = None  # the quality curve: compress up to here, deploy the least that meets all
    eval_tasks: str | None = None  # lm-eval task YAML (or a folder of them) with local data
    max_accuracy_drop: float | None = None  # overrides the profile's budgets.max_accuracy_drop
    device: str | None = None  # compression device (default: cuda when present)
    dtype: str | None = None  # compression compute dtype (default: bf16 on cuda, fp32 on cpu)
    runtimes: tuple[str, ...] = ()  # default: the profile's runtime
    verify_windows: int = 4
    verify_ctx: int = 512
    profile_runs: int = 3
    prompt_tokens: int | None = None  # default: the profile's
    new_tokens: int = 32
    serve_load: bool | None = None  # serving load test: None = as the profile says (a serving section or budget)
    force: bool = False  # start over: empty the build folder (ours only) first

    @classmethod
    def quick(cls, **kw) -> BuildOptions:
        """The smoke recipe: small everything, for tests and a first look."""
        base = dict(recipe="quick", verify_windows=1, verify_ctx=128, profile_runs=3, prompt_tokens=32,
                    new_tokens=8)
        return cls(**{**base, **kw})


def _with_quality_budgets(profile, max_ppl_ratio: float | None, max_accuracy_drop: float | None):
    """The profile with `--max-ppl-ratio` / `--max-accuracy-drop` in place of its own quality budgets."""
    update = {}
    if max_ppl_ratio is not None:
        if not max_ppl_ratio >= 1:  # also refuses NaN
            raise UserError(f"--max-ppl-ratio must be at least 1 (the dense model's own perplexity), got {max_ppl_ratio}")
        update["max_perplexity_ratio"] = float(max_ppl_ratio)
    if max_accuracy_drop is not None:
        if not 0 <= max_accuracy_drop <= 1:
            raise UserError(f"--max-accuracy-drop is a fraction of accuracy in [0, 1] (0.02 = two points), "
                            f"got {max_accuracy_drop}")
        update["max_accuracy_drop"] = float(max_accuracy_drop)
    if not update:
        return profile
    return profile.model_copy(update={"budgets": profile.budgets.model_copy(update=update)})


def _curve_levels(shape, opts: BuildOptions) -> tuple[float, ...] | None:
    """Sparsities of the curve's points (k / blocks, k = 0 .. the deepest), or None without --max-sparsity."""
    from ..profiling.planner import removed_for

    if opts.max_sparsity is None:
        return None
    if opts.sparsity is not None:
        raise UserError("--sparsity fixes one point and --max-sparsity measures a curve to choose from; pass one")
    if not 0 < opts.max_sparsity < 1:  # also refuses NaN
        raise UserError(f"--max-sparsity must be in (0, 1), got {opts.max_sparsity}")
    deepest = removed_for(shape.blocks, opts.max_sparsity)
    if deepest >= shape.blocks:
        raise UserError(f"--max-sparsity {opts.max_sparsity:g} would remove all {shape.blocks} blocks; give at most "
                        f"{(shape.blocks - 1) / shape.blocks:.2f}")
    return tuple(k / shape.blocks for k in range(deepest + 1))


def _versions() -> dict:
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


REBUILT = "model"  # the export stage's copy of a curve point short of the deepest
STAGES = ("plan", "compress", "curve", "export", "verify", "tasks", "profile", "report")


def _export(model_dir: str, runtime: str, precision: str, dest: Path) -> Path:
    """Export one artifact into the export stage's work folder; one finished there earlier is reused.

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


def _in_build(root: Path, recorded: str) -> Path:
    """A path recorded by `_relative`; older builds recorded cwd-relative paths, used as they are."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    if (root / p).exists() or not p.exists():
        return root / p
    return p  # an older build's cwd-relative record


def _preflight(opts: BuildOptions, source, model_dir: Path, n_targets: int = 2) -> None:
    """Inputs readable (texts parse, the tokenizer loads), the build folder writable with room, before any compute."""
    from ..compress.calibration import SELF
    from ..data import HF_DATASETS
    from ..models.loading import load_tokenizer

    for path in (opts.model, opts.calib, opts.eval_data, model_dir, opts.eval_tasks):
        preflight.check_readable(path)
    for spec, purpose in ((opts.calib, "calib"), (opts.eval_data, "eval")):
        if spec not in HF_DATASETS and spec != SELF:  # a dataset name would need the network; self is generated
            preflight.check_text_source(spec, purpose, "--calib" if purpose == "calib" else "--eval-data")
    load_tokenizer(source)
    outputs.check_separate(opts.out, [opts.model, model_dir, opts.calib, opts.eval_data, opts.eval_tasks])
    preflight.check_writable(opts.out, preflight.weights_bytes(model_dir) * (1 + n_targets), folder=True)


def _text_inputs(**specs: str) -> dict[str, Path]:
    """The text sources that are local files or folders, so their content is part of a stage's key."""
    return {name: Path(spec) for name, spec in specs.items() if Path(spec).exists()}


def build(opts: BuildOptions, progress=None, compress_progress=None) -> dict:
    """Run every stage into `opts.out`; returns the report (with its sign-off).

    `progress(message)` announces each step; `compress_progress` is handed to
    `compress_model` for its per-iteration and per-epoch bars.
    """
    from ..models.loading import load_config, resolve_model
    from ..profiling.planner import ModelShape, plan
    from ..profiling.schema import load_profile

    say = progress or (lambda msg: log.info(msg))
    out = Path(opts.out)
    preflight.check_path_length(out)
    if opts.recipe is not None:
        from ..compress import RECIPES

        if opts.recipe not in RECIPES:
            raise UserError(f"unknown --recipe {opts.recipe!r}; choose from {', '.join(RECIPES)}")
    profile = _with_quality_budgets(load_profile(opts.profile), opts.max_ppl_ratio,
                                    opts.max_accuracy_drop).with_serving(opts.serve_load)
    if opts.device or opts.dtype:  # an unusable device or dtype fails before anything is written
        from ..models.loading import pick_device, pick_dtype

        pick_dtype(pick_device(opts.device), opts.dtype)
    source = resolve_model(opts.model)
    model_dir = Path(source.location)
    config = load_config(source)
    shape = ModelShape.from_config(config)
    runtimes = tuple(dict.fromkeys(formats.runtime(r).name for r in opts.runtimes)) or (profile.runtime,)
    input_model = {"model": model_dir / source.gguf_file if source.gguf_file else model_dir}
    levels = _curve_levels(shape, opts)
    plan(shape, profile, sparsity=levels[-1] if levels else opts.sparsity, quant=opts.quant)  # fails before any write
    from ..evaluate.tasks import check_tasks

    check_tasks(opts.eval_tasks, profile.budgets.max_accuracy_drop, opts.max_accuracy_drop is not None)
    _preflight(opts, source, model_dir, 2 * len(runtimes))
    with outputs.claim(out):
        outputs.claim_build_folder(out, STAGES, force=opts.force)
        return _run(opts, out, say, compress_progress, profile, source, model_dir, shape, runtimes, input_model)


def _run(opts, out, say, compress_progress, profile, source, model_dir, shape, runtimes, input_model) -> dict:
    """The stages, in order, inside a claimed build folder."""
    from ..data.split import BuildTexts
    from ..profiling.planner import plan

    split = BuildTexts(opts.calib, opts.eval_data)  # one source for both: calibration and evaluation halves
    levels = _curve_levels(shape, opts)
    curve_mode = levels is not None

    # 1. plan: before any compute is spent. With a curve: the table over every point, at the highest
    # precision that can meet the budgets at the deepest point.
    def do_plan(work: Path) -> dict:
        if curve_mode:
            quant = plan(shape, profile, sparsity=levels[-1], quant=opts.quant).chosen.quant
            result = plan(shape, profile, quant=quant, sparsities=levels)
        else:
            result = plan(shape, profile, sparsity=opts.sparsity, quant=opts.quant)
        (work / "plan.json").write_text(json.dumps(result.to_dict(), indent=2))
        return result.to_dict()

    say("plan")
    planned = run_stage(out, Stage("plan", do_plan, {"profile": profile.model_dump(), "sparsity": opts.sparsity,
                                                      "max_sparsity": opts.max_sparsity, "quant": opts.quant,
                                                      "shape": shape.__dict__}, input_model))
    chosen = dict(planned["outputs"]["chosen"])
    deepest = round(levels[-1] * shape.blocks) if curve_mode else chosen["removed_blocks"]

    # 2. compress (+ fold): skipped in substance when the plan needs no block removal
    def do_compress(work: Path) -> dict:
        if deepest == 0:
            return {"model_dir": str(model_dir), "compressed": False}
        from ..compress import compress_model, has_resumable_state, load_recipe

        target = work / "model"
        with outputs.claim(target):  # clears a half-written checkpoint of a killed run
            if outputs.is_ours(target):  # killed after the checkpoint was written: reuse it
                summary = json.loads((target / "compression.json").read_text())
            else:
                summary = compress_model(opts.model, target, deepest / shape.blocks, method=opts.method,
                                         calib=opts.calib, calib_part=split.calib, settings=load_recipe(opts.recipe),
                                         resume=has_resumable_state(target), progress=compress_progress,
                                         device=opts.device, dtype=opts.dtype, keep_steps=curve_mode)
            outputs.mark(target, "compressed-model")
        return {"model_dir": "model", "compressed": True, "removed_blocks": summary.get("removed_blocks")}

    say(f"compress: {deepest} of {shape.blocks} blocks, {opts.method}"
        + (" (keeping every step for the quality curve)" if curve_mode else ""))
    compressed = run_stage(out, Stage("compress", do_compress, {"sparsity": deepest / shape.blocks,
                                                                "method": opts.method, "recipe": opts.recipe,
                                                                "calib": opts.calib, "calib_part": split.calib,
                                                                "device": opts.device, "dtype": opts.dtype,
                                                                "keep_steps": curve_mode},
                                      {**input_model, **_text_inputs(calib=opts.calib)}))
    c_out = compressed["outputs"]
    eval_text = dict(spec=opts.eval_data, part=split.eval, ctx=opts.verify_ctx, windows=opts.verify_windows)
    prompt = opts.prompt_tokens or profile.prompt_tokens

    # 2b. the quality curve: every point scored in the deployed runtime; the least compression meeting all
    curve = None
    if curve_mode:  # deepest >= 1: the compress stage ran
        curve = _curve_stage(out, say, profile, shape, model_dir, chosen["quant"], eval_text, prompt, opts,
                             input_model)
        chosen = _choose_on_curve(curve, profile, shape)
    k = chosen["removed_blocks"] if c_out["compressed"] else 0
    compressed_run = out / "compress" / c_out["model_dir"] if k else None

    # 3. export: the compressed model and, beside it, the dense one at the same precision. A curve's
    # chosen point short of the deepest is rebuilt exactly from the run's steps into the export folder.
    rebuilt = 0 < k < deepest
    variants = ([("compressed", REBUILT if rebuilt else compressed_run), ("dense", model_dir)] if k
                else [("compressed", model_dir)])  # nothing removed: the deployed artifact is the dense model
    targets = []
    for runtime in runtimes:
        precision = formats.peer(profile.runtime, chosen["quant"], runtime)
        for variant, folder in variants:
            name = f"{variant}-{formats.runtime(runtime).file_format}-{precision}"
            targets.append((name, variant, runtime, precision, folder))

    def do_export(work: Path) -> dict:
        if rebuilt:
            _materialize(compressed_run, k, work / REBUILT)
        made = {}
        for name, variant, runtime, precision, folder in targets:
            say(f"export {name}")
            source, reference = (work / REBUILT, out / "export" / REBUILT) if folder == REBUILT else (folder, folder)
            path = _export(str(source), runtime, precision, work / name)
            made[name] = Artifact(path, runtime, precision, variant, _relative(Path(reference), out)).to_dict(root=work)
        return made

    exported = run_stage(out, Stage("export", do_export, {"targets": [t[:4] for t in targets], "k": k},
                                    {"compressed": out / "compress", **input_model}))
    artifacts = {name: Artifact.from_dict(a, root=out / "export") for name, a in exported["outputs"].items()}
    compressed_dir = out / "export" / REBUILT if rebuilt else (compressed_run or model_dir)

    # 4. verify each artifact against its own PyTorch model
    def do_verify(work: Path) -> dict:
        from exporters.verify import verify_artifact

        results = {}
        for name, a in artifacts.items():
            say(f"verify {name}")
            r = verify_artifact(a.path, str(_in_build(out, a.reference)), opts.eval_data, ctx=opts.verify_ctx,
                                max_windows=opts.verify_windows, text_part=split.eval)
            results[name] = {**r.to_dict(), "passed": r.passed}
        (work / "verify.json").write_text(json.dumps(results, indent=2, default=str))
        return results

    verified = run_stage(out, Stage("verify", do_verify, {"data": opts.eval_data, "part": split.eval,
                                                          "ctx": opts.verify_ctx,
                                                          "windows": opts.verify_windows},
                                    {"export": out / "export", **_text_inputs(eval_data=opts.eval_data)}))

    # 4b. task accuracy (optional): lm-eval on the dense and the deployed PyTorch models
    tasks = None
    if opts.eval_tasks is not None:
        def do_tasks(work: Path) -> dict:
            from ..evaluate.tasks import compare_models

            say("tasks: lm-eval on the dense and the compressed model")
            result = compare_models(opts.model, compressed_dir if k else None, opts.eval_tasks)
            (work / "tasks.json").write_text(json.dumps(result, indent=2))
            return result

        tasks = run_stage(out, Stage("tasks", do_tasks, {"k": k},
                                     {"export": out / "export", "tasks": Path(opts.eval_tasks), **input_model}))

    # 5. profile: every artifact in its runtime, in its own process; dense beside compressed

    def do_profile(work: Path) -> dict:
        from ..profiling.measure import calibrate_host, measure_artifact, project

        host = calibrate_host()
        results = {"host": host.to_dict(), "artifacts": {}}
        for name, a in artifacts.items():
            say(f"profile {name}")
            measured = measure_artifact(a.path, prompt_tokens=prompt, new_tokens=opts.new_tokens,
                                        runs=opts.profile_runs)
            kept = shape.blocks - (k if a.variant == "compressed" else 0)
            kv_bytes = shape.kv_bytes_per_token(kept, a.runtime)
            results["artifacts"][name] = {"measured": measured,
                                          "projected": project(measured, host, profile, kv_bytes, a.size_bytes)}
        if profile.serving is not None:  # the load test, of the deployed artifact only; its settings are in the key
            from ..serve.load_step import serving_step

            name = next(n for n, a in artifacts.items() if a.variant == "compressed" and a.runtime == profile.runtime)
            say(f"serve {name} under load: {profile.serving.concurrency} clients, {profile.serving.duration_s:g} s")
            served = serving_step(artifacts[name].path, profile, host, work / "serve.log")
            results["serving"] = {"artifact": name, **served}
        (work / "profile.json").write_text(json.dumps(results, indent=2))
        return results

    # The projection reads the whole profile (hardware figures, context, batch), the plan's
    # removed blocks and each runtime's KV-cache width, so all of them are in the key.
    profiled = run_stage(out, Stage("profile", do_profile, {
        "prompt_tokens": prompt, "new_tokens": opts.new_tokens, "runs": opts.profile_runs,
        "profile": profile.model_dump(), "shape": shape.__dict__,
        "kv_bytes": {r: formats.runtime(r).kv_bytes for r in runtimes}},
        {"export": out / "export", "plan": out / "plan"}))

    # 6. report
    stage_manifests = [m for m in (planned, compressed, curve, exported, verified, tasks, profiled) if m]

    def do_report(work: Path) -> dict:
        from ..profiling.report import projection_check, signoff, write_report

        rows = []
        for name, a in artifacts.items():
            p = profiled["outputs"]["artifacts"][name]
            rows.append({"name": name, **a.to_dict(root=out / "export"), "verify": verified["outputs"][name], **p})
        deployed = next(r for r in rows if r["variant"] == "compressed" and r["runtime"] == profile.runtime)
        report = {
            "model": opts.model, "profile": profile.model_dump(), "plan": planned["outputs"],
            "compression": {**c_out, "deployed_removed_blocks": k}, "artifacts": rows,
            "host": profiled["outputs"]["host"],
            "settings": {k_: v for k_, v in opts.__dict__.items()},
            "stages": {m["stage"]: {"wall_s": m["wall_s"], "skipped": m.get("skipped", False)} for m in stage_manifests},
            "versions": _versions(), "machine": {"platform": platform.platform(), **profiled["outputs"]["host"]},
        }
        dense = next((r for r in rows if r["variant"] == "dense" and r["runtime"] == deployed["runtime"]
                      and r["precision"] == deployed["precision"]), None)
        report["evaluation_text"] = split.describe(deployed["verify"])
        if curve is not None:
            report["quality_curve"] = {"points": chosen["curve_points"], "chosen_k": k,
                                       "efficiency": curve["outputs"]["efficiency"],
                                       "note": "perplexity measured in the deployed runtime on the evaluation "
                                               "text; speed and memory projected by the calibrated planner"}
        if tasks is not None:
            report["task_accuracy"] = tasks["outputs"]
        report["serving"] = profiled["outputs"].get("serving")
        report["projection"] = projection_check(shape, profile, deployed, dense or deployed, k, prompt,
                                                opts.new_tokens, report["host"])
        report["signoff"] = signoff(report["profile"], deployed, [r["verify"] for r in rows], dense=dense,
                                    tasks=report.get("task_accuracy"), serving=report["serving"])
        write_report(report, work)
        return {"result": report["signoff"]["result"], "files": ["report.json", "report.html", "report.md"]}

    # The report prints the profile and every option, and judges by the profile's budgets. Where the
    # build lives and how the profile was named are not content: moving a build re-runs nothing.
    settings = {k_: v for k_, v in opts.__dict__.items() if k_ not in ("out", "profile")}
    run_stage(out, Stage("report", do_report, {"profile": profile.model_dump(), "settings": settings},
                         {name: out / name for name in STAGES[:-1] if (out / name).exists()}))
    return json.loads((out / "report" / "report.json").read_text())


def _curve_stage(out: Path, say, profile, shape, model_dir: Path, precision: str, eval_text: dict, prompt: int,
                 opts: BuildOptions, input_model: dict) -> dict:
    """Score every kept step in the deployed runtime; the host's efficiency from the dense artifact."""
    from dataclasses import asdict

    from .curve import EvalText, host_efficiency, quality_points, runtime_perplexity

    text = EvalText(**eval_text)

    def do_curve(work: Path) -> dict:
        say(f"curve: dense {profile.runtime} {precision} (perplexity and this host's efficiency)")
        dense = _export(str(model_dir), profile.runtime, precision, work / f"dense-{precision}")
        from ..models.loading import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(opts.model))
        dense_ppl = runtime_perplexity(dense, tokenizer, text)
        eff, host, measured = host_efficiency(dense, shape, profile.runtime, precision, prompt, opts.new_tokens,
                                              opts.profile_runs)
        rows = quality_points(out / "compress" / "model", profile.runtime, precision, text, work, dense_ppl, say)
        outputs.remove_entry(dense)
        result = {"precision": precision, "dense_perplexity": dense_ppl, "points": rows,
                  "efficiency": asdict(eff), "host": host.to_dict(), "dense_measured": measured["metrics"]}
        (work / "curve.json").write_text(json.dumps(result, indent=2))
        return result

    return run_stage(out, Stage("curve", do_curve, {"precision": precision, "text": eval_text, "prompt": prompt,
                                                    "new_tokens": opts.new_tokens, "runs": opts.profile_runs,
                                                    "runtime": profile.runtime},
                                {"compress": out / "compress", **input_model,
                                 **_text_inputs(eval_data=opts.eval_data)}))


def _choose_on_curve(curve: dict, profile, shape) -> dict:
    """The plan's choice made again on measured quality: the least compression meeting every budget."""
    from ..profiling.planner import Efficiency
    from .curve import least_compression, project_points

    c = curve["outputs"]
    points = project_points(c["points"], shape, profile, c["precision"], Efficiency(**c["efficiency"]))
    best = least_compression(points, profile)  # BudgetsUnmet (exit 1) names the closest point
    return {"sparsity": best.sparsity, "removed_blocks": best.k, "kept_blocks": shape.blocks - best.k,
            "quant": best.precision, "curve_points": [p.to_dict() for p in points]}


def _materialize(run_dir: Path, k: int, dest: Path) -> None:
    """The checkpoint after k removals, rebuilt from the run's steps (bitwise what a run stopped at k writes)."""
    from ..compress import steps
    from ..compress.driver import write_output

    with outputs.claim(dest):
        if not outputs.is_ours(dest):  # a killed export stage may have finished it already
            model, tokenizer = steps.rebuild(run_dir, k)
            write_output(model, tokenizer, steps.step_report(run_dir, k), dest)
